"""Qwen2.5-VL's vision attention in one kernel call per layer on GPUs.

The vision tower attends within windows (28 of its 32 layers) and within images (the other 4).
transformers' ``sdpa`` setting runs that as one SDPA call per window, each after a split: for
two 512 images, about 1,400 small calls per forward, which leave a GPU mostly idle (measured:
most of the VLM's 115 ms prefill on an H200). Its flash-attention settings pass the window
boundaries (``cu_seqlens``) to one variable-length call instead, but need the flash-attn
package. :func:`use_fast_vision_attention` registers :func:`vision_attention` under a name the
vision tower treats as flash attention, so it receives the boundaries, and sets it for the vision
tower only (the language model keeps its own setting):
- on CUDA: in float16/bfloat16 on Ampere or newer PyTorch's own variable-length flash attention
  (``torch.nn.attention.varlen.varlen_attn``, torch 2.10+), else one SDPA call with a
  block-diagonal mask (the same attention: every token sees its own window only); neither reads
  a device value on the host, so the prefill can be captured as a CUDA graph (``prefill.py``);
- elsewhere: the very calls transformers' ``sdpa`` setting makes, window by window, so CPU
  results do not change by one bit (tests compare them).
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

NAME = "coz_flash_varlen"  # "flash" in the name: the vision tower passes cu_seqlens in one call

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch < 2.10
    varlen_attn = None
# torch 2.10's varlen_attn has no ``scale`` (it always uses 1/sqrt(head_dim)); later ones do
VARLEN_TAKES_SCALE = varlen_attn is not None and "scale" in inspect.signature(varlen_attn).parameters


def vision_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None = None, scaling: float | None = None,
                     dropout: float = 0.0, cu_seq_lens_q: torch.Tensor | None = None,
                     max_length_q: int | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of the vision tower's ``query``/``key``/``value`` [1, heads, T, D] within the spans
    of ``cu_seq_lens_q``; returns ([1, T, heads, D], None) as transformers' attention functions do."""
    if cu_seq_lens_q is None:
        raise ValueError(f"{NAME} is the Qwen2.5-VL vision tower's attention; it needs cu_seq_lens_q")
    head_dim = query.shape[-1]
    default_scale = scaling is None or abs(scaling - head_dim**-0.5) < 1e-12
    if query.is_cuda:
        if (query.dtype in (torch.float16, torch.bfloat16) and varlen_attn is not None and flash_runs_on(query.device)
                and (default_scale or VARLEN_TAKES_SCALE) and max_length_q is not None):
            q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, D]
            spans = cu_seq_lens_q.to(device=query.device, dtype=torch.int32)
            extra = {} if default_scale else {"scale": scaling}
            return varlen_attn(q, k, v, spans, spans, max_length_q, max_length_q, **extra).unsqueeze(0), None
        return block_diagonal_attention(query, key, value, cu_seq_lens_q, scaling), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    pieces = zip(*(t.split(lengths, dim=2) for t in (query, key, value)))
    outs = [sdpa_attention_forward(module, q, k, v, attention_mask=None, scaling=scaling, dropout=dropout,
                                   is_causal=False)[0] for q, k, v in pieces]
    return torch.cat(outs, dim=1), None


def flash_runs_on(device: torch.device) -> bool:
    """Whether PyTorch's flash attention (``varlen_attn``) runs on this CUDA device: Ampere (compute
    capability 8.0) or newer; older GPUs (Turing, Pascal) take :func:`block_diagonal_attention`."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def block_diagonal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                             spans: torch.Tensor, scaling: float | None) -> torch.Tensor:
    """One SDPA call in which each token attends to its own span of ``spans`` only: [1, T, heads, D]."""
    # index_fill_, not ``window[i] = 1``: assigning a number copies it from the host, which a CUDA
    # graph capture refuses
    window = torch.zeros(query.shape[2], dtype=torch.int32, device=query.device)
    window = window.index_fill_(0, spans[1:-1].long(), 1).cumsum(0)
    mask = window[:, None] == window[None, :]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scaling)
    return out.transpose(1, 2).contiguous()


def use_fast_vision_attention(model: Any) -> bool:
    """Give ``model``'s vision tower :func:`vision_attention`; False where this transformers
    cannot (4.x: its vision tower does not dispatch through ``AttentionInterface``)."""
    try:
        from transformers import AttentionInterface
    except ImportError:
        return False
    vision = getattr(model.config, "vision_config", None)
    if vision is None or not hasattr(model, "set_attn_implementation"):
        return False
    if getattr(vision, "_attn_implementation", None) not in ("sdpa", NAME):
        return False  # eager or a real flash attention: what the caller asked for
    AttentionInterface.register(NAME, vision_attention)
    model.set_attn_implementation({"vision_config": NAME})
    return model.config.vision_config._attn_implementation == NAME
