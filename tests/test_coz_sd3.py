"""CoZ's one-step SD3 SR model on tiny SD3-shaped models saved in the real layouts."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from coz_core.prompt.base import FixedPrompts
from coz_core.sr.base import SRBackbone, SRRequest
from coz_core.sr.coz_sd3 import CoZSD3Backbone
from coz_core.sr.coz_weights import apply_vae_encoder, merge_adaln_lora
from coz_core.sr.sd3_loading import SD3Precision, load_sd3_medium
from coz_core.zoom import ChainConfig, run_chain
from tests.sd3_fixtures import FP32, TinySD3, adaln_linears

PROMPTS = ["a cat", "zoom dog"]


def images(batch: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(batch, 3, size // 4, size // 4, generator=g)
    return torch.nn.functional.interpolate(base, size=(size, size), mode="bilinear", align_corners=False)


def hooked_transformer(tiny: TinySD3):
    """The transformer with CoZ's LoRA applied unmerged, as the reference does: W x + up(down(x))."""
    model = load_sd3_medium(tiny.folder, text_encoders=(), precision=FP32).transformer
    pairs = [(tiny.lora_list[i].float(), tiny.lora_list[i + 1].float()) for i in range(0, len(tiny.lora_list), 2)]
    for linear, (up, down) in zip(adaln_linears(model), pairs, strict=True):
        linear.register_forward_hook(lambda m, args, out, up=up, down=down: out + args[0] @ down.T @ up.T)
    return model


def reference_step(tiny: TinySD3, x01: torch.Tensor, prompts: list[str], noise: torch.Tensor | None) -> torch.Tensor:
    """The reference formula written out with diffusers' own SD3 prompt encoding and a PEFT VAE."""
    parts = tiny.parts
    pipe = StableDiffusion3Pipeline(
        transformer=hooked_transformer(tiny),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(tiny.folder / "scheduler"),
        vae=tiny.peft_vae, text_encoder=parts["clip_l"], tokenizer=_tok(tiny, "tokenizer"),
        text_encoder_2=parts["clip_g"], tokenizer_2=_tok(tiny, "tokenizer_2"), text_encoder_3=parts["t5"],
        tokenizer_3=_tok(tiny, "tokenizer_3"))
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=512)
        pipe.scheduler.set_timesteps(1)
        t = pipe.scheduler.timesteps[0]
        assert float(t) == 1000.0
        dist = tiny.peft_vae.encode(x01 * 2 - 1).latent_dist
        z = dist.mean if noise is None else dist.mean + dist.std * noise
        z = z * tiny.peft_vae.config.scaling_factor
        v = pipe.transformer(hidden_states=z, timestep=t.expand(z.shape[0]), encoder_hidden_states=embeds,
                             pooled_projections=pooled, return_dict=False)[0]
        z0 = z - v
        out = tiny.peft_vae.decode(z0 / tiny.peft_vae.config.scaling_factor + tiny.peft_vae.config.shift_factor).sample
    return (out.clamp(-1, 1) + 1) / 2


def _tok(tiny: TinySD3, sub: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny.folder / sub))


# --- weights --------------------------------------------------------------------------------------

def test_merged_lora_equals_unmerged_computation(tiny):
    merged = load_sd3_medium(tiny.folder, text_encoders=(), precision=FP32).transformer
    base = load_sd3_medium(tiny.folder, text_encoders=(), precision=FP32).transformer
    assert merge_adaln_lora(merged, tiny.lora_pkl) == 5  # 3 blocks: 3 norm1 + 2 norm1_context
    hooked = hooked_transformer(tiny)
    g = torch.Generator().manual_seed(3)
    args = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([1000.0]),
                encoder_hidden_states=torch.randn(1, 20, 32, generator=g),
                pooled_projections=torch.randn(1, 24, generator=g), return_dict=False)
    with torch.no_grad():
        a, b, c = merged(**args)[0], hooked(**args)[0], base(**args)[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - c).abs().max() > 1e-2  # the LoRA matters


def test_vae_encoder_merge_equals_peft(tiny):
    vae = load_sd3_medium(tiny.folder, text_encoders=(), precision=FP32).vae
    plain = vae.encode(images(1) * 2 - 1).latent_dist.mean
    apply_vae_encoder(vae, tiny.vae_pt)
    x = images(1) * 2 - 1
    with torch.no_grad():
        ours, peft = vae.encode(x).latent_dist.parameters, tiny.peft_vae.encode(x).latent_dist.parameters
    torch.testing.assert_close(ours, peft, rtol=1e-4, atol=1e-5)
    assert (ours.chunk(2, 1)[0] - plain).abs().max() > 1e-2


# --- the step ----------------------------------------------------------------------------------------

def test_backbone_protocol(backbone):
    assert isinstance(backbone, SRBackbone)
    assert backbone.size_multiple == 16 and backbone.uses_prompt


def test_step_equals_reference_formula_deterministic(tiny, backbone):
    x = images(2)
    ours = backbone(SRRequest(x, x, PROMPTS))
    ref = reference_step(tiny, x, PROMPTS, None)
    assert ours.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # both batch elements processed with their prompts


def test_step_equals_reference_formula_sampled(tiny):
    model = CoZSD3Backbone.from_files(tiny.folder, tiny.lora_pkl, tiny.vae_pt, precision=FP32, latent_mode="sample")
    x = images(1)
    ours = model(SRRequest(x, x, PROMPTS[:1], seed=7))
    assert torch.equal(ours, model(SRRequest(x, x, PROMPTS[:1], seed=7)))
    assert not torch.equal(ours, model(SRRequest(x, x, PROMPTS[:1], seed=8)))
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, reference_step(tiny, x, PROMPTS[:1], noise), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["single+separate", "incl_clips+t5", "fp8"])
def test_single_files_match_the_folder(tiny, backbone, layout):
    kw = dict(precision=FP32, latent_mode="mean", tokenizers=tiny.folder, config_dir=tiny.folder)
    if layout == "single+separate":
        model = CoZSD3Backbone.from_files(tiny.single, tiny.lora_pkl, tiny.vae_pt, clip_l=tiny.clip_l,
                                          clip_g=tiny.clip_g, t5=tiny.t5, **kw)
    elif layout == "incl_clips+t5":
        model = CoZSD3Backbone.from_files(tiny.single_clips, tiny.lora_pkl, tiny.vae_pt, t5=tiny.t5, **kw)
    else:
        model = CoZSD3Backbone.from_files(tiny.single_fp8, tiny.lora_pkl, tiny.vae_pt, **kw)  # fp8 kept: t5_fp8=None
        assert (model.text_encoder.models["t5"].encoder.block[0].layer[0].SelfAttention.q.stored_weight.dtype
                == torch.float8_e4m3fn)
    x = images(2)
    ours, ref = model(SRRequest(x, x, PROMPTS)), backbone(SRRequest(x, x, PROMPTS))
    if layout == "fp8":  # T5 weights rounded to float8: close, not equal
        assert (ours - ref).abs().mean() < 5e-3 and (ours - ref).abs().max() < 0.1
    else:
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)


def test_without_t5_and_with_precomputed_embeddings(tiny, backbone):
    no_t5 = CoZSD3Backbone.from_files(tiny.folder, tiny.lora_pkl, tiny.vae_pt, precision=FP32, latent_mode="mean",
                                      text_encoders=("clip_l", "clip_g"))
    pipe = StableDiffusion3Pipeline(transformer=backbone.transformer, scheduler=None, vae=None,
                                    text_encoder=tiny.parts["clip_l"], tokenizer=_tok(tiny, "tokenizer"),
                                    text_encoder_2=tiny.parts["clip_g"], tokenizer_2=_tok(tiny, "tokenizer_2"),
                                    text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=False,
                                                  max_sequence_length=512)
    cond = no_t5.text_encoder(PROMPTS)
    torch.testing.assert_close(cond.prompt_embeds, embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond.pooled, pooled, rtol=1e-5, atol=1e-5)
    assert cond.prompt_embeds.shape == (2, 77 + 512, 32)

    # embeddings only: no text encoders loaded; the same result as encoding the prompts
    bare = CoZSD3Backbone.from_files(tiny.folder, tiny.lora_pkl, tiny.vae_pt, precision=FP32, latent_mode="mean",
                                     text_encoders=())
    x = images(2)
    full = backbone.text_encoder(PROMPTS)
    torch.testing.assert_close(bare(SRRequest(x, x, conditioning=full)), backbone(SRRequest(x, x, PROMPTS)),
                               rtol=1e-6, atol=1e-6)
    comfy = [[full.prompt_embeds[:1], {"pooled_output": full.pooled[:1]}]]
    one = bare(SRRequest(x, x, conditioning=comfy))
    torch.testing.assert_close(one[0], backbone(SRRequest(x[:1], x[:1], PROMPTS[:1]))[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="precomputed"):
        bare(SRRequest(x, x, PROMPTS))


def test_repeated_prompts_are_encoded_once(tiny, backbone):
    calls = []
    hook = backbone.text_encoder.models["t5"].register_forward_hook(lambda *a: calls.append(1))
    try:
        backbone.text_encoder.cache.clear()
        first = backbone.text_encoder(["a cat", "a cat"])
        second = backbone.text_encoder(["a cat"])
    finally:
        hook.remove()
    assert len(calls) == 1
    torch.testing.assert_close(second.prompt_embeds[0], first.prompt_embeds[1])


def test_reduced_precision_runs_close(tiny, backbone):
    bf16 = CoZSD3Backbone.from_files(tiny.folder, tiny.lora_pkl, tiny.vae_pt, latent_mode="mean",
                                     precision=SD3Precision(torch.bfloat16, torch.bfloat16, torch.bfloat16,
                                                            torch.bfloat16))
    x = images(1)
    out = bf16(SRRequest(x, x, PROMPTS[:1]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - backbone(SRRequest(x, x, PROMPTS[:1]))).abs().mean() < 0.03


def test_odd_sizes_are_padded_and_restored(backbone):
    x = images(1, 40)[..., :37, :45]
    out = backbone(SRRequest(x, x, ["a cat"]))
    assert out.shape == x.shape


def test_chain_end_to_end_with_tiny_sd3(backbone):
    image = images(1, 64)
    result = run_chain(image, backbone, ChainConfig(steps=2, zoom=2.0, size=(32, 32), color="none"),
                       prompt_source=FixedPrompts(["a cat", "zoom dog"]))
    assert len(result.steps) == 3
    assert all(s.image.shape == (1, 3, 32, 32) and torch.isfinite(s.image).all() for s in result.steps)
    assert result.prompts == [["a cat"], ["zoom dog"]]


def test_comfyui_style_tokenizer_folders(tiny, backbone, tmp_path):
    """One plain CLIP BPE folder (vocab.json + merges.txt, like ComfyUI's sd1_tokenizer) serves both CLIPs."""
    import json

    clip_dir = tmp_path / "sd1_tokenizer"
    clip_dir.mkdir()
    vocab = json.loads((tiny.folder / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    (clip_dir / "vocab.json").write_text(json.dumps(vocab))
    (clip_dir / "merges.txt").write_text("#version: 0.2\n")
    model = CoZSD3Backbone.from_files(
        tiny.single_clips, tiny.lora_pkl, tiny.vae_pt, t5=tiny.t5, precision=FP32, latent_mode="mean",
        config_dir=tiny.folder, tokenizers={"clip_l": clip_dir, "clip_g": clip_dir, "t5": tiny.folder / "tokenizer_3"})
    assert model.text_encoder.tokenizer("clip_g").pad_token == "!"
    ours, ref = model.text_encoder(PROMPTS), backbone.text_encoder(PROMPTS)
    torch.testing.assert_close(ours.prompt_embeds, ref.prompt_embeds, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.pooled, ref.pooled, rtol=1e-6, atol=1e-6)


def test_transformer_weights_stored_in_fp8(tiny, backbone):
    fp8 = CoZSD3Backbone.from_files(tiny.folder, tiny.lora_pkl, tiny.vae_pt, latent_mode="mean", transformer_fp8=True,
                                    precision=SD3Precision(torch.bfloat16, torch.float32, torch.float32, torch.float32))
    linear = fp8.transformer.transformer_blocks[0].norm1.linear
    assert linear.weight is None and linear.stored_weight.dtype == torch.float8_e4m3fn
    x = images(1)
    out = fp8(SRRequest(x, x, PROMPTS[:1]))
    assert torch.isfinite(out).all()
    assert (out - backbone(SRRequest(x, x, PROMPTS[:1]))).abs().mean() < 0.05
