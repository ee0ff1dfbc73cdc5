"""Zoom Loop Start / Zoom Loop End: the chain as a loop whose body is any nodes.

Built on ComfyUI's node expansion. Start makes scale 0 (first pass) and the zoomed input of
step k; the body turns it into scale k; End collects it and, until the last step, returns a copy
of the body (every node downstream of Start and upstream of End, with Start and End) as an
expanded graph whose new Start gets the loop state through a hidden input. The state keeps only
what the outputs need (one tensor per scale, shared, plus the prompts); nothing is copied per
iteration. Names and the socket type carry the "CoZ" prefix, so ComfyUI's own loop nodes
(newer releases) and other packs' loops live beside these.
"""
from __future__ import annotations

import torch

from ..coz_core.imageops import resize
from ..coz_core.zoom import center_in_crop, crop, initial_plan, prepare_input, scale_zero, zoom_box, zoom_in
from . import host
from .common import CHAIN, ZOOM_BOXES, ZOOM_LOOP, image_in, image_out, match_size, zoom_inputs


class ZoomLoopState:
    """What one iteration hands to the next (a plain object: ComfyUI never hashes or copies it)."""

    def __init__(self, start_id: str, steps: int, size: tuple[int, int], step: int,
                 target: tuple[float, float], scales: tuple[torch.Tensor, ...], prompts: tuple[str, ...],
                 masks: tuple[torch.Tensor, ...] | None = None, boxes: tuple = ()):
        self.start_id = start_id  # the Start node of the running iteration
        self.steps = steps
        self.size = size  # (width, height)
        self.step = step  # k: the step the body is computing now
        self.target = target  # zoom target in scale k-1, 0..1
        self.scales = scales  # IMAGE [B, H, W, C] of scales 0..k-1
        self.prompts = prompts  # prompt STRING of steps 1..k-1
        self.masks = masks  # MASK [B, H, W] of scales 0..k-1 when a mask rides along, else None
        self.boxes = boxes  # coz_core.zoom.Box: the region of the input each scale shows (up to k once handed)

    def __repr__(self) -> str:
        return f"ZoomLoopState(step {self.step}/{self.steps}, {len(self.scales)} scales)"


class ZoomLoopStart:
    DESCRIPTION = ("Start of a Chain-of-Zoom loop. Wire its outputs into the nodes of one zoom step "
                   "(e.g. CoZ VLM Prompt -> CoZ SR Step -> CoZ Color Fix, or ComfyUI's Upscale Image "
                   "(using Model) on 'region') and the step's result into CoZ Zoom Loop End: "
                   "the nodes in between run once per step.")
    CATEGORY = CHAIN
    FUNCTION = "start"
    RETURN_TYPES = (ZOOM_LOOP, "IMAGE", "IMAGE", "IMAGE", "INT", "MASK")
    RETURN_NAMES = ("loop", "previous", "zoomed", "region", "step", "mask_region")
    OUTPUT_TOOLTIPS = (
        "Connect to CoZ Zoom Loop End.",
        "The previous scale (scale 0 on the first step): the VLM's first image.",
        "The zoomed input of this step: the crop of the previous scale resized to the process size "
        "(the input of CoZ SR Step).",
        "The same crop at its native resolution (for upscale models that magnify by their own factor).",
        "The step being computed, 1..steps.",
        "The same crop of the previous scale's mask, at its native resolution (for CoZ Bilateral "
        "Upsampler, guided by the new scale; empty without a mask).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE", {"tooltip": "The picture to zoom into (every image of the batch is zoomed)."}),
                **zoom_inputs(),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "A mask or depth map (0..1) of the input image to carry through "
                                             "the zoom: crop it with 'mask_region', upsample it in the body "
                                             "and give it to Zoom Loop End's 'mask'. Load Image's empty 64x64 "
                                             "mask (an image without alpha) counts as no mask."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID", "state": (ZOOM_LOOP,)},
        }

    def start(self, image, steps, zoom, width, height, center_x, center_y, mask=None, unique_id=None,
              state=None):
        size = (int(width), int(height))
        if state is None:  # the first iteration: scale 0
            picture = prepare_input(image_in(image))
            first, shown, target = scale_zero(picture, size, (center_x, center_y))
            if mask is not None and is_placeholder_mask(mask, picture):
                mask = None
            masks = None if mask is None else (mask_zero(mask, picture, size, (center_x, center_y)),)
            state = ZoomLoopState(unique_id, int(steps), size, 1, target, (image_out(first),), (), masks, (shown,))
        previous = state.scales[-1]
        box = zoom_box(size, zoom, state.target)
        _, zoomed = zoom_in(image_in(previous), box)
        region = previous[:, box[1]:box[3], box[0]:box[2]]  # a view of the kept scale: no new memory
        if state.masks is None:
            mask_region = torch.zeros(1, 1, 1).expand(1, box[3] - box[1], box[2] - box[0])  # no memory
        else:
            mask_region = crop(state.masks[-1], box).clone()
        boxes = state.boxes + (state.boxes[-1].sub(box, size),)  # the region of the input step k shows
        handed = ZoomLoopState(unique_id, state.steps, size, state.step, center_in_crop(state.target, box, size),
                               state.scales, state.prompts, state.masks, boxes)
        return handed, previous, image_out(zoomed), region, state.step, mask_region


class ZoomLoopEnd:
    DESCRIPTION = ("End of a Chain-of-Zoom loop: takes the step's result (the new scale) and runs the "
                   "loop body again until every step is done. Outputs the last scale, all scales as "
                   "one batch (scale 0 first) and the prompts of the steps.")
    CATEGORY = CHAIN
    FUNCTION = "end"
    RETURN_TYPES = ("IMAGE", "IMAGE", "STRING", "MASK", ZOOM_BOXES)
    RETURN_NAMES = ("image", "scales", "prompts", "masks", "boxes")
    OUTPUT_TOOLTIPS = (
        "The last scale: the most magnified image.",
        "Every scale, scale 0 first (steps + 1 images per input image).",
        "The prompt of every step, one line each.",
        "The carried mask at every scale, like 'scales' (zeros when Zoom Loop Start got no mask).",
        "The region of the input image each scale shows (for CoZ Zoom Video).",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "loop": (ZOOM_LOOP, {"tooltip": "From CoZ Zoom Loop Start."}),
                "image": ("IMAGE", {"tooltip": "The step's result: the new scale. Resized to the process "
                                               "size if the body made another size."}),
            },
            "optional": {
                "prompt": ("STRING", {"forceInput": True, "tooltip":
                                      "The step's prompt (from CoZ VLM Prompt), collected for the prompts output."}),
                "mask": ("MASK", {"tooltip": "The step's mask at the new scale (e.g. CoZ Bilateral Upsampler's "
                                             "output from Zoom Loop Start's 'mask_region'); resized if needed."}),
            },
            "hidden": {"dynprompt": "DYNPROMPT", "unique_id": "UNIQUE_ID"},
        }

    def end(self, loop: ZoomLoopState, image, prompt=None, mask=None, dynprompt=None, unique_id=None):
        width, height = loop.size
        batch = loop.scales[0].shape[0]
        if image.shape[0] != batch:
            raise ValueError(f"the loop body returned {image.shape[0]} images for a batch of {batch}")
        if tuple(image.shape[1:3]) != (height, width):
            image = image_out(match_size(image_in(image), (height, width)))
        scales = loop.scales + (image,)
        prompts = loop.prompts + ((prompt or "").strip(),)
        masks = loop.masks
        if masks is not None:
            if mask is None:
                raise ValueError("Zoom Loop Start carries a mask: connect the step's mask to Zoom Loop End's 'mask'")
            masks = masks + (fit_mask(mask, batch, (height, width)),)
        host.Progress(loop.steps).update(loop.step, preview=image)
        if loop.step >= loop.steps:
            all_masks = (torch.cat(masks) if masks is not None
                         else torch.zeros(1, 1, 1).expand(len(scales) * batch, height, width))
            return image, torch.cat(scales), "\n".join(prompts), all_masks, loop.boxes
        state = ZoomLoopState(loop.start_id, loop.steps, loop.size, loop.step + 1, loop.target, scales, prompts,
                              masks, loop.boxes)
        graph, outputs = self._body(dynprompt, unique_id, state)
        return {"result": outputs, "expand": graph}

    # --- node expansion ---------------------------------------------------------------------

    def _body(self, dynprompt, unique_id: str, state: ZoomLoopState) -> tuple[dict, tuple]:
        """The next iteration as an expanded graph, and the links to its End's outputs."""
        upstream: dict[str, list[str]] = {}  # node -> the nodes that consume it, above End
        pending = [unique_id]
        while pending:
            node_id = pending.pop()
            for value in dynprompt.get_node(node_id).get("inputs", {}).values():
                if _is_link(value):
                    parent = value[0]
                    if parent not in upstream:
                        upstream[parent] = []
                        pending.append(parent)
                    upstream[parent].append(node_id)
        body = {state.start_id, unique_id}  # everything downstream of Start and upstream of End
        pending = [state.start_id]
        while pending:
            for child in upstream.get(pending.pop(), []):
                if child not in body:
                    body.add(child)
                    pending.append(child)

        # fresh ids: this End's id (unique in the run) + the node's id in the user's graph
        prefix = f"{unique_id}.{state.step}."
        new_id = {n: prefix + dynprompt.get_display_node_id(n) for n in body}
        graph = {}
        for node_id in body:
            node = dynprompt.get_node(node_id)
            inputs = {key: [new_id[value[0]], value[1]] if _is_link(value) and value[0] in body else value
                      for key, value in node["inputs"].items()}
            graph[new_id[node_id]] = {"class_type": node["class_type"], "inputs": inputs,
                                      "override_display_id": dynprompt.get_display_node_id(node_id)}
        graph[new_id[state.start_id]]["inputs"]["state"] = state
        end = new_id[unique_id]
        return graph, tuple([end, i] for i in range(len(self.RETURN_TYPES)))


def mask_zero(mask: torch.Tensor, picture: torch.Tensor, size: tuple[int, int],
              center: tuple[float, float]) -> torch.Tensor:
    """Scale 0 of a MASK [B, H, W] of the input image: resized like the image (Lanczos) and cropped."""
    mask = mask.unsqueeze(0) if mask.ndim == 2 else mask
    if tuple(mask.shape[-2:]) != tuple(picture.shape[-2:]):
        raise ValueError(f"the mask is {mask.shape[-1]}x{mask.shape[-2]} but the image is "
                         f"{picture.shape[-1]}x{picture.shape[-2]}; give a mask of the image's size")
    mask = fit_mask(mask, picture.shape[0], tuple(mask.shape[-2:]))
    resized, box = initial_plan((picture.shape[-1], picture.shape[-2]), size, center)
    scaled = resize(mask.float(), (resized[1], resized[0]), "lanczos").clamp(0, 1)
    return crop(scaled, box).contiguous()


def is_placeholder_mask(mask: torch.Tensor, picture: torch.Tensor) -> bool:
    """ComfyUI's Load Image gives a 64x64 mask of zeros for an image without alpha: no mask at all."""
    return (tuple(mask.shape[-2:]) == (64, 64) != tuple(picture.shape[-2:])
            and not bool(mask.any()))


def fit_mask(mask: torch.Tensor, batch: int, size_hw: tuple[int, int]) -> torch.Tensor:
    """A MASK as [batch, H, W] float at ``size_hw`` (one mask is repeated over the batch)."""
    mask = (mask.unsqueeze(0) if mask.ndim == 2 else mask).float()
    if mask.shape[0] == 1 and batch > 1:
        mask = mask.expand(batch, -1, -1)
    if mask.shape[0] != batch:
        raise ValueError(f"got {mask.shape[0]} masks for a batch of {batch}")
    if tuple(mask.shape[-2:]) != tuple(size_hw):
        mask = resize(mask, size_hw, "bilinear").clamp(0, 1)
    return mask.cpu()


def _is_link(value) -> bool:
    """A link in ComfyUI's API format: [node id, output index]."""
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], (int, float)))


NODE_CLASS_MAPPINGS = {"CoZZoomLoopStart": ZoomLoopStart, "CoZZoomLoopEnd": ZoomLoopEnd}
NODE_DISPLAY_NAME_MAPPINGS = {"CoZZoomLoopStart": "CoZ Zoom Loop Start", "CoZZoomLoopEnd": "CoZ Zoom Loop End"}
