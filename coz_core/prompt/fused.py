"""Qwen2.5-VL with its q/k/v and its gate/up projections as one matrix product each.

Decoding one token multiplies each weight matrix by one vector, so a token costs about the time
to read the weights, plus a fixed cost per product. transformers runs seven products per layer,
three of them small (k and v: 256 outputs each); fused, the attention reads one [2560, 2048]
matrix instead of three and the MLP one [22016, 2048] instead of two (measured on an H200: 272
tokens/s as loaded, 316 fused). The vision tower's MLPs are fused too, and its patch embedding
(a Conv3d whose kernel is its input) runs as a matrix product. The fused matrices replace
the separate ones (the same memory); the arithmetic is the same, rounded as the library's matrix
product rounds a wider output. Used on the fast GPU path (``QwenVL._greedy``), where a decoded
token's time is the GPU's.
"""
from __future__ import annotations

import inspect
import sys
import types
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FusedLinear(nn.Module):
    """Linear layers of one input as one product; ``forward`` returns their outputs, split."""

    def __init__(self, parts: Sequence[nn.Linear]):
        super().__init__()
        biases = [p.bias for p in parts]
        if any(b is None for b in biases) and any(b is not None for b in biases):
            raise ValueError("the fused projections must all have a bias or all have none")
        self.sizes = [p.out_features for p in parts]
        # not inference tensors, even when fused under inference mode (the fast path): those
        # cannot be used once the model is moved (ComfyUI offloads it), even in inference mode
        with torch.inference_mode(False):
            self.weight = nn.Parameter(torch.cat([p.weight.detach() for p in parts]), requires_grad=False)
            self.bias = None if biases[0] is None else \
                nn.Parameter(torch.cat([b.detach() for b in biases]), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


def _mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_up_proj(x)
    return self.down_proj(self.act_fn(gate) * up)


def _patch_embed_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """The vision patch embedding (a Conv3d whose kernel is its stride and its input) as the matrix product it is."""
    weight = self.proj.weight
    return F.linear(hidden_states.to(weight.dtype).reshape(-1, weight[0].numel()), weight.reshape(weight.shape[0], -1))


def _attention_forward(self: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None, cache: Any = None,
                       position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                       **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers 5.x ``Qwen2_5_VLAttention.forward`` with the three projections as one."""
    library = sys.modules[type(self).__module__]
    bsz, q_len, _ = hidden_states.size()
    query, key, value = (t.view(bsz, q_len, -1, self.head_dim).transpose(1, 2) for t in self.qkv_proj(hidden_states))
    cos, sin = position_embeddings
    query, key = library.apply_rotary_pos_emb(query, key, cos, sin)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    attention: Callable = library.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, library.eager_attention_forward)
    out, weights = attention(self, query, key, value, attention_mask,
                             dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                             sliding_window=self.sliding_window, position_ids=position_ids, **kwargs)
    return self.o_proj(out.reshape(bsz, q_len, -1).contiguous()), weights


def _known_attention(attention: nn.Module) -> bool:
    """Whether ``attention``'s own forward is the one :func:`_attention_forward` mirrors."""
    library = sys.modules.get(type(attention).__module__)
    forward = inspect.signature(type(attention).forward).parameters
    return (type(attention).__name__ == "Qwen2_5_VLAttention" and "cache" in forward
            and all(hasattr(library, name) for name in ("apply_rotary_pos_emb", "ALL_ATTENTION_FUNCTIONS",
                                                        "eager_attention_forward")))


def _fuse_mlp(mlp: nn.Module) -> None:
    mlp.gate_up_proj = FusedLinear([mlp.gate_proj, mlp.up_proj])
    del mlp.gate_proj, mlp.up_proj
    mlp.forward = types.MethodType(_mlp_forward, mlp)


def is_fused(model: Any) -> bool:
    """Whether :func:`fuse_projections` has fused ``model``."""
    return all(hasattr(layer.self_attn, "qkv_proj") for layer in model.model.language_model.layers)


def fuse_projections(model: Any) -> bool:
    """Fuse the projections of every layer of ``model``'s language model and vision tower, in
    place (once; a second call does nothing). False where this transformers' layers are not the
    ones mirrored here (the model is left as it was)."""
    layers, visual = model.model.language_model.layers, model.model.visual
    if is_fused(model):
        return True
    if not (all(_known_attention(layer.self_attn) and hasattr(layer.mlp, "gate_proj") for layer in layers)
            and all(hasattr(block.mlp, "gate_proj") for block in visual.blocks)
            and isinstance(getattr(visual.patch_embed, "proj", None), nn.Conv3d)
            and visual.patch_embed.proj.kernel_size == visual.patch_embed.proj.stride):
        return False
    for layer in layers:
        attention = layer.self_attn
        attention.qkv_proj = FusedLinear([attention.q_proj, attention.k_proj, attention.v_proj])
        del attention.q_proj, attention.k_proj, attention.v_proj
        attention.forward = types.MethodType(_attention_forward, attention)
        _fuse_mlp(layer.mlp)
    for block in visual.blocks:
        _fuse_mlp(block.mlp)
    visual.patch_embed.forward = types.MethodType(_patch_embed_forward, visual.patch_embed)
    return True
