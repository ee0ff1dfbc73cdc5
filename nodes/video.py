"""Zoom Video: the frames of a continuous zoom through a chain's scales (coz_core.video)."""
from __future__ import annotations

import torch

from ..coz_core.video import VideoConfig, ZoomVideo
from . import host
from .common import VIDEO, ZOOM_BOXES, image_in

DIRECTIONS = {"zoom_in": "in", "zoom_out": "out", "ping_pong": "pingpong"}
CHUNK = 16  # frames rendered per progress update


class ZoomVideoNode:
    DESCRIPTION = ("A continuous zoom video through the scales of a CoZ chain: every frame comes from the "
                   "sharpest scale that covers it, the next scale fades in softly where it takes over, and "
                   "the zoom runs at a steady perceived speed with easing at both ends. Returns the frames "
                   "as an IMAGE batch for Create Video -> Save Video (or any video combine node).")
    CATEGORY = VIDEO
    FUNCTION = "render"
    RETURN_TYPES = ("IMAGE", "FLOAT")
    RETURN_NAMES = ("frames", "fps")
    OUTPUT_TOOLTIPS = (
        "The video's frames, [frames, height, width, 3]; a batch of several images gives their videos "
        "one after another.",
        "The frame rate set here, to wire into Create Video's fps.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "scales": ("IMAGE", {"tooltip": "Every scale of the chain, scale 0 first: the 'scales' output of "
                                                "CoZ Zoom Chain or CoZ Zoom Loop End."}),
                "boxes": (ZOOM_BOXES, {"tooltip": "The region of the input image each scale shows: the 'boxes' "
                                                  "output of the same node."}),
                "frames_per_step": ("INT", {"default": 45, "min": 1, "max": 10000, "tooltip":
                                            "Frames of each zoom step: steps x this + 1 frames per pass "
                                            "(45 at 30 fps: 1.5 s per step)."}),
                "fps": ("FLOAT", {"default": 30.0, "min": 1.0, "max": 120.0, "step": 1.0, "tooltip":
                                  "Frame rate of the video, passed on to the fps output."}),
                "direction": (list(DIRECTIONS), {"default": "zoom_in", "tooltip":
                                                 "zoom_in: scale 0 to the deepest scale; zoom_out: backwards; "
                                                 "ping_pong: in and back out, made to loop seamlessly."}),
                "ease": ("FLOAT", {"default": 0.2, "min": 0.0, "max": 0.5, "step": 0.01, "tooltip":
                                   "Fraction of the zoom spent speeding up at the start (and as much slowing "
                                   "down at the end); 0 is a constant speed throughout."}),
                "blend": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                    "Fraction of each step over which the next, sharper scale fades in where it "
                                    "covers the frame; 0 switches scales at once."}),
            },
        }

    def render(self, scales, boxes, frames_per_step, fps, direction, ease, blend):
        boxes = list(boxes)
        if not boxes or scales.shape[0] % len(boxes):
            raise ValueError(f"got {scales.shape[0]} scale images for {len(boxes)} boxes: connect the 'scales' "
                             "and 'boxes' outputs of the same chain node")
        batch = scales.shape[0] // len(boxes)
        device = host.torch_device()
        # the chain's batch is scale-major (scale 0 of every image, then scale 1, ...)
        per_scale = [image_in(scales[k * batch:(k + 1) * batch]).to(device) for k in range(len(boxes))]
        config = VideoConfig(frames_per_step=int(frames_per_step), ease=float(ease), blend=float(blend),
                             direction=DIRECTIONS[direction])
        video = ZoomVideo(per_scale, boxes, config)
        count = len(video)
        width, height = video.size
        out = torch.empty(batch * count, height, width, 3)  # the only full-size allocation
        progress = host.Progress(-(-count // CHUNK))
        for n, (start, chunk) in enumerate(video.chunks(CHUNK), 1):
            frames = chunk.permute(1, 0, 3, 4, 2).cpu()  # [B, T, h, w, 3]
            for b in range(batch):
                out[b * count + start:b * count + start + frames.shape[1]] = frames[b]
            progress.update(n, preview=frames[0, -1:])
        return out, float(fps)


NODE_CLASS_MAPPINGS = {"CoZZoomVideo": ZoomVideoNode}
NODE_DISPLAY_NAME_MAPPINGS = {"CoZZoomVideo": "CoZ Zoom Video"}
