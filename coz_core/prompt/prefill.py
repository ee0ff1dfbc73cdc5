"""Qwen2.5-VL's forward pass over the prompt (the prefill), with no host sync until its logits.

Run as ``model(**batch)`` on a GPU, the forward reads device values on the host about 20 times:
the image grid (``tolist()``) for the vision positions, windows and feature split, the longest
window (``item()``), the image-token count check, the static cache's query offset. A forward that
reads device values cannot be captured as a CUDA graph. Here everything those reads give is
computed from the inputs while they are still on the CPU, with transformers' own functions
(``vision_utils``, ``get_rope_index``), and copied to the device first; then the very computation
``model(**batch)`` makes runs without a read: the vision tower, its features written over the
image tokens' embeddings, the language model. On the CPU the logits are bit-identical to
``model(**batch)`` (tests compare them). On CUDA :class:`CapturedPrefill` captures it (measured on
an H200: the reads removed alone changed nothing, the host's launches set the pace; captured,
75 ms became 35 ms).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from .. import cuda_graph


def prompt_positions(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[4, B, L] positions of the prompts as generate builds them: text row, then the 3 rope rows."""
    ids = batch["input_ids"]
    text = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape)
    extra = {k: batch[k] for k in ("attention_mask", "image_grid_thw", "mm_token_type_ids") if k in batch}
    rope, deltas = model.model.get_rope_index(ids, **extra)
    model.model.rope_deltas = deltas  # as generate leaves it
    return torch.cat([text[None], rope.to(text.device)], dim=0)


def available() -> bool:
    """Whether this transformers takes the vision tower's index tensors precomputed (5.2x)."""
    try:
        from transformers import vision_utils

        return hasattr(vision_utils, "get_vision_window_index")
    except ImportError:
        return False


def vision_indices(visual: Any, grid_thw: torch.Tensor) -> dict[str, Any]:
    """What the vision tower derives from the image grid (CPU), as the keyword arguments it takes precomputed."""
    from transformers.utils.generic import get_max_seqlen
    from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index

    config, merge = visual.config, visual.spatial_merge_size
    cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid_thw, config)
    window_index, cu_window = get_vision_window_index(grid_thw, spatial_merge_size=merge,
                                                      window_size=visual.window_size, patch_size=visual.patch_size)
    return {"position_ids": get_vision_position_ids(grid_thw, merge), "cu_seqlens": cu_seqlens,
            "max_seqlen": max_seqlen, "window_index": window_index, "cu_window_seqlens": cu_window,
            "max_window_seqlen": get_max_seqlen(cu_window, config, kwarg_name="max_window_seqlen")}


@dataclass
class Prompt:
    """One prompt's tensors on the device, ready for :func:`run` (built by :func:`prepare`)."""

    input_ids: torch.Tensor  # [B, L]
    positions: torch.Tensor  # [4, B, L]
    pixel_values: torch.Tensor | None
    grid_thw: torch.Tensor | None  # on the CPU: the vision tower reads none of it (all precomputed)
    image_tokens: torch.Tensor | None  # where the image features go in the B * L sequence positions
    vision: dict[str, Any]  # vision_indices on the device


def prepare(model: Any, inputs: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> Prompt:
    """The inputs of unpadded prompts (from ``QwenVL.inputs``, on the CPU; several of one length
    stacked) moved to ``device`` with everything :func:`run` needs; raises when the image tokens
    and the images disagree."""
    ids = inputs["input_ids"].cpu()
    if "attention_mask" in inputs and not bool(inputs["attention_mask"].all()):
        raise ValueError("the prefill takes unpadded sequences; use generate for padded batches")
    cpu = {k: v.cpu() for k, v in inputs.items() if k in ("attention_mask", "image_grid_thw", "mm_token_type_ids")}
    positions = prompt_positions(model, {"input_ids": ids, **cpu})
    pixels, grid, tokens, vision = inputs.get("pixel_values"), cpu.get("image_grid_thw"), None, {}
    if pixels is not None:
        visual = model.model.visual
        tokens = (ids.flatten() == model.config.image_token_id).nonzero()[:, 0]
        features = int(grid.prod(-1).sum()) // visual.spatial_merge_size ** 2
        if tokens.numel() != features:
            raise ValueError(f"the prompt holds {tokens.numel()} image tokens for {features} image features")
        vision = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                  for k, v in vision_indices(visual, grid).items()}
        pixels, tokens = pixels.to(device, dtype), tokens.to(device)
    return Prompt(ids.to(device), positions.to(device), pixels, grid, tokens, vision)


def run(model: Any, prompt: Prompt, cache: Any = None, **options: Any) -> Any:
    """``model(**inputs)`` of the prompt into ``cache`` (empty: reset by the caller; ``options``:
    use_cache, logits_to_keep...)."""
    embeds = model.model.get_input_embeddings()(prompt.input_ids)
    if prompt.pixel_values is not None:
        visual = model.model.visual
        features = visual(prompt.pixel_values.type(visual.dtype), grid_thw=prompt.grid_thw,
                          **prompt.vision).pooler_output
        b, length, width = embeds.shape  # the features in order: prompt by prompt, as the image tokens
        flat = embeds.reshape(1, b * length, width)
        embeds = flat.index_copy(1, prompt.image_tokens, features[None].to(embeds.dtype)).view(b, length, width)
    with _empty(cache):
        return model(inputs_embeds=embeds, position_ids=prompt.positions, cache=cache, **options)


@contextmanager
def _empty(cache: Any) -> Iterator[None]:
    """A static cache's query offset is a device counter; the mask code compares it with 0 on the
    host. The cache is empty here, so it answers 0 from the host while the prompt runs."""
    if cache is None or not hasattr(cache, "get_query_offset"):
        yield
        return
    cache.get_query_offset = lambda layer_idx=0: 0
    try:
        yield
    finally:
        del cache.get_query_offset


class CapturedPrefill:
    """:func:`run` into one static ``cache``, captured as a CUDA graph and replayed (CUDA).

    Eager, the prefill launches about 1,300 kernels one by one from Python, and the host, not the
    GPU, sets its pace (measured on an H200: 31 ms of kernels in 54 to 76 ms). A CoZ chain asks the
    same question of same-sized images at every step, so every prompt has the same shapes: the
    graph captured for the first is replayed for the others, the prompt copied into its inputs.
    Another shape, another attention setting, moved weights or another cache length gets a new
    capture (the key); the caller resets the cache before every call, as for :func:`run`. A prompt
    whose prefill cannot be captured (e.g. an attention setting that reads device values on the
    host) gets None, with a warning, and its key is not tried again: the caller runs it eagerly."""

    WARMUP = 2

    def __init__(self, model: Any, cache: Any):
        self.model, self.cache = model, cache
        self.graph: torch.cuda.CUDAGraph | None = None
        self.key: tuple | None = None
        self.inputs: Prompt | None = None  # the graph's input buffers
        self.logits: torch.Tensor | None = None  # its output buffer: the last position's logits [1, vocab]
        self.captures = 0
        self.failed: set[tuple] = set()  # keys whose capture failed

    def _key(self, prompt: Prompt) -> tuple:
        shapes = tuple(t.shape for t in _tensors(prompt))
        numbers = tuple((k, v) for k, v in sorted(prompt.vision.items()) if not isinstance(v, torch.Tensor))
        config = self.model.config  # the attention functions the forward dispatches to (the graph keeps its own)
        attention = tuple(getattr(c, "_attn_implementation", None)
                          for c in (config, getattr(config, "vision_config", None),
                                    getattr(config, "text_config", None)))
        return shapes, numbers, attention, addresses(self.model, self.cache)

    def _run(self) -> torch.Tensor:
        return run(self.model, self.inputs, cache=self.cache, use_cache=True, logits_to_keep=1).logits[:, -1]

    def __call__(self, prompt: Prompt) -> torch.Tensor | None:
        """The logits [1, vocab] of the prompt's last position (a buffer the next call overwrites),
        or None where this prompt's shape cannot be captured."""
        key = self._key(prompt)
        if key in self.failed:
            return None
        if self.graph is not None and key == self.key:
            for mine, theirs in zip(_tensors(self.inputs), _tensors(prompt)):
                mine.copy_(theirs)
            self.graph.replay()
            return self.logits
        self.graph, self.inputs = None, prompt  # the prompt's own tensors become the buffers
        try:
            return self._capture()
        except cuda_graph.CaptureError as exc:
            self.graph, self.inputs, self.logits = None, None, None
            self.failed |= {key, self._key(prompt)}  # the warm-up may have created the cache's tensors
            self.cache.reset()
            cuda_graph.warn_uncaptured("the VLM prefill", exc, "prompts of this shape run eagerly")
            return None

    def _capture(self) -> torch.Tensor:
        def reset_and_run() -> torch.Tensor:
            self.cache.reset()
            return self._run()

        cuda_graph.warm_up(reset_and_run, self.WARMUP)  # the first fills the static cache's lazy tensors
        self.cache.reset()
        self.graph, self.logits = cuda_graph.capture(self._run)
        self.key = self._key(self.inputs)  # after the warm-up: the cache's tensors exist
        self.captures += 1
        return self.logits


def addresses(model: Any, cache: Any) -> tuple:
    """Where ``model``'s weights and ``cache``'s tensors are: what a CUDA graph of them holds."""
    layers = getattr(cache, "layers", [])
    return (tuple(p.data_ptr() for p in model.parameters())
            + tuple(t.data_ptr() for layer in layers for t in (getattr(layer, "keys", None),
                                                                getattr(layer, "values", None)) if t is not None))


def _tensors(prompt: Prompt) -> list[torch.Tensor]:
    """The prompt's device tensors, in a fixed order (the graph's inputs)."""
    out = [prompt.input_ids, prompt.positions, prompt.pixel_values, prompt.image_tokens]
    out += [v for _, v in sorted(prompt.vision.items()) if isinstance(v, torch.Tensor)]
    return [t for t in out if t is not None]
