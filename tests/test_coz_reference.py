"""The ``reference`` precision preset against upstream's computation, rebuilt here as upstream writes it.

Upstream (bryanswkim/Chain-of-Zoom, osediff_sd3.py + lora/lora_layers.py, inference_coz.py):
- the pipeline is loaded in float16 (``StableDiffusion3Pipeline.from_pretrained(torch_dtype=float16)``,
  so T5 keeps ``wo`` in float32), then the transformer and the VAE are moved to float32;
- ``inject_lora`` replaces every Linear under a module whose class is named AdaLayerNormZero by a
  ``LoraInjectedLinear`` (float32 linear + lora_down/lora_up, dropout 0, scale 1) whose forward is
  ``(linear(x.float()) + dropout(lora_up(selector(lora_down(x.float())))) * scale).half()``, with
  the list from model_20001.pkl popped in order (up, down) after ``.float()``;
- the VAE encoder gets PEFT LoRA ``default_encoder`` and the float16 state dict;
- ``encode_prompt``: CLIP hidden_states[-2] and output [0] cast to float16, T5 [0], concat, pad;
  the embeddings then go to the transformer in float32; t = the scheduler's single timestep.
The tiny SD3 is saved in float32 (the real SD3-medium files are float16, for which upstream's
float16 load then float32 move is exact): the transformer is read here in float32 directly.
"""
from __future__ import annotations

import dataclasses
import os
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
from torch import nn
from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

from coz_core.policy import sd3_precision
from coz_core.sr.base import SRRequest
from coz_core.sr.coz_sd3 import CoZSD3Backbone
from coz_core.sr.sd3_loading import SD3Precision
from coz_core.sr.sd3_text import SD3Conditioning

PROMPT = "a cat zoom"


class LoraInjectedLinear(nn.Module):
    """lora/lora_layers.py, as upstream writes it (inference: dropout p=0, selector identity)."""

    def __init__(self, in_features, out_features, bias=False, r=4, dropout_p=0.0, scale=1.0):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias)
        self.lora_down = nn.Linear(in_features, r, bias=False)
        self.dropout = nn.Dropout(dropout_p)
        self.lora_up = nn.Linear(r, out_features, bias=False)
        self.scale = scale
        self.selector = nn.Identity()

    def forward(self, input):
        return (self.linear(input.float())
                + self.dropout(self.lora_up(self.selector(self.lora_down(input.float())))) * self.scale).half()


def inject_lora(model: nn.Module, lora_path) -> None:
    """osediff_sd3.inject_lora with ``loras`` given (its _find_modules search, modules() order)."""
    model.requires_grad_(False)
    model.train()
    loras = [t.float() for t in torch.load(lora_path, map_location="cpu", weights_only=True)]
    found = []
    for ancestor in [m for m in model.modules() if m.__class__.__name__ in {"AdaLayerNormZero"}]:
        for fullname, module in ancestor.named_modules():
            if isinstance(module, nn.Linear):
                *path, name = fullname.split(".")
                parent = ancestor
                while path:
                    parent = parent.get_submodule(path.pop(0))
                if not isinstance(parent, LoraInjectedLinear):
                    found.append((parent, name, module))
    for parent, name, child in found:
        tmp = LoraInjectedLinear(child.in_features, child.out_features, child.bias is not None, r=4)
        tmp.linear.weight = nn.Parameter(child.weight.float())
        if child.bias is not None:
            tmp.linear.bias = nn.Parameter(child.bias.float())
        tmp.to(dtype=torch.float)
        parent._modules[name] = tmp
        tmp.lora_up.weight = nn.Parameter(loras.pop(0))
        tmp.lora_down.weight = nn.Parameter(loras.pop(0))
    assert not loras


def upstream_encode_prompt(pipe, prompt: str):
    dtype = torch.float16
    ids = pipe.tokenizer([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    e1 = pipe.text_encoder(ids, output_hidden_states=True)
    pool1, h1 = e1[0].to(dtype), e1.hidden_states[-2].to(dtype)
    ids = pipe.tokenizer_2([prompt], padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt").input_ids
    e2 = pipe.text_encoder_2(ids, output_hidden_states=True)
    pool2, h2 = e2[0].to(dtype), e2.hidden_states[-2].to(dtype)
    ids = pipe.tokenizer_3([prompt], padding="max_length", max_length=512, truncation=True, add_special_tokens=True,
                           return_tensors="pt").input_ids
    t5 = pipe.text_encoder_3(ids)[0].to(dtype)
    clip = torch.nn.functional.pad(torch.cat([h1, h2], dim=-1), (0, t5.shape[-1] - h1.shape[-1] - h2.shape[-1]))
    return torch.cat([clip, t5], dim=-2), torch.cat([pool1, pool2], dim=-1)


@pytest.fixture(scope="module")
def upstream(tiny):
    """The pipeline's parts as ``StableDiffusion3Pipeline.from_pretrained(torch_dtype=float16)`` loads
    them (the fixture folder's model_index is minimal, so part by part with the same loaders)."""
    f = tiny.folder
    pipe = SimpleNamespace(
        tokenizer=CLIPTokenizer.from_pretrained(str(f / "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(f / "tokenizer_2")),
        tokenizer_3=AutoTokenizer.from_pretrained(str(f / "tokenizer_3")),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(str(f / "text_encoder"), dtype=torch.float16),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(str(f / "text_encoder_2"), dtype=torch.float16),
        text_encoder_3=T5EncoderModel.from_pretrained(str(f / "text_encoder_3"), dtype=torch.float16),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(str(f / "scheduler")),
    )
    assert pipe.text_encoder_3.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    transformer = SD3Transformer2DModel.from_pretrained(str(f / "transformer"), torch_dtype=torch.float32)
    inject_lora(transformer, tiny.lora_pkl)
    pipe.scheduler.set_timesteps(1)
    return pipe, transformer


def reference_backbone(tiny, adaln_lora: str | None = None) -> CoZSD3Backbone:
    precision = sd3_precision("reference", torch.device("cpu"))
    if adaln_lora is not None:
        precision = dataclasses.replace(precision, adaln_lora=adaln_lora)
    return CoZSD3Backbone.from_files(tiny.folder, tiny.lora_pkl, tiny.vae_pt, precision=precision, latent_mode="mean")


@pytest.fixture(scope="module")
def ours(tiny):
    return reference_backbone(tiny)


def test_reference_text_encoding_is_upstreams(upstream, ours):
    pipe, _ = upstream
    t5 = ours.text_encoder.models["t5"]
    assert t5.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert t5.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.float16
    with torch.no_grad():
        want_seq, want_pooled = upstream_encode_prompt(pipe, PROMPT)
        got = ours.text_encoder([PROMPT])
    assert torch.equal(got.prompt_embeds, want_seq.float())
    assert torch.equal(got.pooled, want_pooled.float())


def _velocity_inputs(upstream):
    pipe, _ = upstream
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        seq, pooled = upstream_encode_prompt(pipe, PROMPT)
    return torch.randn(1, 4, 4, 4, generator=g) * 1.5, seq.float(), pooled.float()


def test_reference_velocity_matches_upstream_to_float32_rounding(upstream, ours, tiny):
    pipe, transformer = upstream
    z, seq, pooled = _velocity_inputs(upstream)
    t = pipe.scheduler.timesteps[0].expand(1)
    with torch.no_grad():
        want = transformer(hidden_states=z, timestep=t, pooled_projections=pooled, encoder_hidden_states=seq,
                           return_dict=False)[0]
        got = ours.velocity(z, SD3Conditioning(seq, pooled))
        merged = reference_backbone(tiny, "merged").velocity(z, SD3Conditioning(seq, pooled))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # the fast default (merged float32 weights, no float16 rounding) departs from upstream by this much:
    rel = ((merged - want).norm() / want.norm()).item()
    print(f"\nmerged vs upstream velocity: relative L2 {rel:.2e}, max abs {(merged - want).abs().max().item():.2e}; "
          f"reference vs upstream: max abs {(got - want).abs().max().item():.2e}")
    assert 1e-6 < rel < 1e-2


def test_reference_step_matches_upstream(upstream, ours, tiny):
    pipe, transformer = upstream
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)),
                                        size=(32, 32), mode="bilinear", align_corners=False)
    vae = tiny.peft_vae
    with torch.no_grad():
        seq, pooled = upstream_encode_prompt(pipe, PROMPT)
        z = vae.encode(x * 2 - 1).latent_dist.mean * vae.config.scaling_factor
        v = transformer(hidden_states=z, timestep=pipe.scheduler.timesteps[0].expand(1),
                        encoder_hidden_states=seq.float(), pooled_projections=pooled.float(), return_dict=False)[0]
        want = (vae.decode((z - v) / vae.config.scaling_factor + vae.config.shift_factor).sample.clamp(-1, 1) + 1) / 2
        got = ours(SRRequest(x, x, [PROMPT]))
    # the VAE encoder LoRA is merged (PEFT computes it unmerged): float32 rounding only
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reference_needs_the_float32_transformer(tiny):
    with pytest.raises(ValueError, match="float32"):
        CoZSD3Backbone.from_files(tiny.folder, tiny.lora_pkl, tiny.vae_pt, text_encoders=(),
                                  precision=SD3Precision(transformer=torch.bfloat16, adaln_lora="reference"))
