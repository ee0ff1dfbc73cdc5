"""Greedy decoding of Qwen2.5-VL through a static KV cache, without transformers' generate loop.

Reference semantics: ``model.generate(**inputs, do_sample=False, repetition_penalty=p,
min_new_tokens=m, max_new_tokens=n)`` of the installed transformers (5.x), batch 1, no padding:
- positions: the prompt's multimodal rope positions come from ``get_rope_index`` (what
  ``_prepare_position_ids_for_generation`` computes), stacked under the text positions as the
  [4, 1, L] tensor generate passes; every new token continues each of the four rows by one
  (``_update_model_kwargs_for_generation``: ``position_ids[..., -1:] + 1``);
- scores: the last logits in float32; the repetition penalty of ``RepetitionPenaltyLogitsProcessor``
  (each id seen in the prompt or the answer once: score < 0 ? score * p : score / p), kept as a
  boolean table of seen ids on the device (scatter of repeated ids writes the same value once);
  end tokens masked to -inf until ``min_new_tokens`` (``MinNewTokensLengthLogitsProcessor``);
  argmax;
- stop: at the first end token (kept in the answer), or at ``max_new_tokens``.

Departures, for speed: the tokens stay on the device and end tokens are looked for every
``CHECK_EVERY`` tokens (one host sync each), then the answer is cut after the first one, so a
few tokens past the end may be computed and dropped; the one-token decoding forward is compiled
once per model (``torch.compile``, ``reduce-overhead``: CUDA graphs) and replayed for every
token of every later call. Sampling is not handled here (generate does it).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

CHECK_EVERY = 8  # decoded tokens between two looks (host syncs) for an end token


# generation settings whose logits processors (or search) this loop does not reproduce
_OTHER_SETTINGS = ("sequence_bias", "bad_words_ids", "forced_bos_token_id", "forced_eos_token_id",
                   "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens", "stop_strings")


def handles(config: Any) -> bool:
    """Whether :func:`greedy_decode` is what generate does with this GenerationConfig (else use generate)."""
    if any(getattr(config, name, None) is not None for name in _OTHER_SETTINGS):
        return False
    counts = ("no_repeat_ngram_size", "min_length")
    return (not any(getattr(config, name, None) or 0 for name in counts)
            and (getattr(config, "num_beams", None) or 1) == 1
            and getattr(config, "guidance_scale", None) in (None, 1))


def compile_step(model: Any, backend: str | None) -> Callable[..., Any]:
    """The model's one-token forward, compiled with ``backend`` (None: not compiled)."""
    if backend is None:
        return model.__call__
    mode = "reduce-overhead" if backend == "inductor" else None
    return torch.compile(model.__call__, backend=backend, mode=mode, fullgraph=True, dynamic=False)


def prompt_positions(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[4, 1, L] positions of the prompt as generate builds them: text row, then the 3 rope rows."""
    ids = batch["input_ids"]
    text = torch.arange(ids.shape[1], device=ids.device)[None]
    extra = {k: batch[k] for k in ("attention_mask", "image_grid_thw", "mm_token_type_ids") if k in batch}
    rope, deltas = model.model.get_rope_index(ids, **extra)
    model.model.rope_deltas = deltas  # as generate leaves it
    return torch.cat([text[None], rope.to(text.device)], dim=0)


@torch.inference_mode()
def greedy_decode(
    model: Any,
    batch: dict[str, torch.Tensor],
    cache: Any,
    step: Callable[..., Any],
    max_new_tokens: int,
    repetition_penalty: float = 1.0,
    min_new_tokens: int = 0,
    eos_token_ids: list[int] | tuple[int, ...] = (),
) -> torch.Tensor:
    """The new token ids [n] of greedy decoding (see the module docstring), ``cache`` reset by the caller.

    ``batch``: the model inputs on the model's device (input_ids [1, L], attention_mask of ones,
    pixel_values, image_grid_thw, mm_token_type_ids where the model takes it); ``step``: from
    :func:`compile_step`."""
    ids = batch["input_ids"]
    if ids.shape[0] != 1 or ("attention_mask" in batch and not bool(batch["attention_mask"].all())):
        raise ValueError("greedy_decode takes one unpadded sequence; use generate for padded batches")
    device = ids.device
    positions = prompt_positions(model, batch)
    out = model(**batch, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
    logits = out.logits[:, -1].float()
    vocab = logits.shape[-1]
    penalize = float(repetition_penalty) != 1.0
    seen = torch.zeros(1, vocab + 1, dtype=torch.bool, device=device)  # last column: ids past the vocab
    seen.scatter_(1, ids.clamp(max=vocab), True)
    seen = seen[:, :vocab]
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=device)
    tokens = torch.empty(max_new_tokens, dtype=torch.long, device=device)
    last = positions[..., -1:]  # [4, 1, 1]
    produced = 0
    for n in range(max_new_tokens):
        if n:
            last = last + 1
            torch.compiler.cudagraph_mark_step_begin()
            logits = step(input_ids=tokens[n - 1].view(1, 1), position_ids=last, cache=cache,
                          use_cache=True).logits[:, -1].float()
        if penalize:
            logits = torch.where(seen, torch.where(logits < 0, logits * repetition_penalty,
                                                   logits / repetition_penalty), logits)
        if n < min_new_tokens and eos.numel():
            logits = logits.index_fill(1, eos, float("-inf"))
        token = logits.argmax(dim=-1)
        tokens[n] = token[0]
        if penalize:
            seen.index_fill_(1, token, True)
        produced = n + 1
        if eos.numel() and (produced % CHECK_EVERY == 0) and bool(torch.isin(tokens[:produced], eos).any()):
            break
    tokens = tokens[:produced]
    if eos.numel():
        hits = torch.isin(tokens, eos).nonzero()
        if hits.numel():
            tokens = tokens[: int(hits[0, 0]) + 1]
    return tokens
