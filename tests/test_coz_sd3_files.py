"""Bad and converted weight files for the CoZ SD3 model, and tiled processing."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil
from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

from coz_core.checkpoints import CheckpointError, load_pickle_safely, read_safetensors
from coz_core.sr.coz_sd3 import CoZSD3Backbone, TileSettings
from coz_core.sr.coz_weights import apply_vae_encoder, convert_coz_weights, merge_adaln_lora
from coz_core.sr.sd3_loading import detect_sd3_file, load_sd3_medium
from coz_core.sr.base import SRRequest
from coz_core.tiling import tile_starts, tiled_map
from tests.sd3_fixtures import FP32



def bare_transformer(tiny):
    return load_sd3_medium(tiny.folder, text_encoders=(), precision=FP32).transformer


# --- CoZ weight files ------------------------------------------------------------------------

def test_conversion_to_safetensors_loads_identically(tiny, tmp_path):
    lora_st, vae_st = convert_coz_weights(tiny.lora_pkl, tiny.vae_pt, tmp_path)
    named = load_file(str(lora_st))
    assert "transformer_blocks.0.norm1_context.linear.lora_up.weight" in named
    assert "transformer_blocks.2.norm1_context.linear.lora_up.weight" not in named  # last block: continuous norm
    a, b = bare_transformer(tiny), bare_transformer(tiny)
    merge_adaln_lora(a, tiny.lora_pkl)
    merge_adaln_lora(b, lora_st)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    va = load_sd3_medium(tiny.folder, text_encoders=(), precision=FP32).vae
    vb = load_sd3_medium(tiny.folder, text_encoders=(), precision=FP32).vae
    apply_vae_encoder(va, tiny.vae_pt)
    apply_vae_encoder(vb, vae_st)
    assert all(torch.equal(x, y) for x, y in zip(va.state_dict().values(), vb.state_dict().values()))


def test_wrong_lora_count_and_shape(tiny, tmp_path):
    short = tmp_path / "short.pkl"
    torch.save(tiny.lora_list[:-2], short)
    with pytest.raises(CheckpointError, match=r"4 LoRA layers \(8 tensors\).*5 AdaLayerNormZero"):
        merge_adaln_lora(bare_transformer(tiny), short)
    bad = list(tiny.lora_list)
    bad[3] = torch.zeros(4, 7)
    shaped = tmp_path / "shaped.pkl"
    torch.save(bad, shaped)
    with pytest.raises(CheckpointError, match=r"layer 1 \(transformer_blocks.0.norm1_context.linear.*\(4, 7\)"):
        merge_adaln_lora(bare_transformer(tiny), shaped)
    odd = tmp_path / "odd.pkl"
    torch.save(tiny.lora_list[:-1], odd)
    with pytest.raises(CheckpointError, match="odd"):
        merge_adaln_lora(bare_transformer(tiny), odd)


@dataclass
class Sneaky:
    payload: str = "not a tensor"


def test_pickles_that_are_not_plain_tensors_are_refused(tmp_path):
    path = tmp_path / "model_20001.pkl"
    torch.save([Sneaky(), torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_pickle_safely(path)


def test_truncated_files(tiny, tmp_path):
    for src in (tiny.lora_pkl, tiny.single):
        cut = tmp_path / src.name
        data = src.read_bytes()
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=str(cut.name)):
            read_safetensors(cut) if cut.suffix == ".safetensors" else load_pickle_safely(cut)
    with pytest.raises(CheckpointError, match="no such file"):
        load_pickle_safely(tmp_path / "missing.pt")


def test_vae_file_without_lora_or_mismatched(tiny, tmp_path):
    vae = load_sd3_medium(tiny.folder, text_encoders=(), precision=FP32).vae
    plain = tmp_path / "plain.pt"
    torch.save(vae.encoder.state_dict(), plain)
    with pytest.raises(CheckpointError, match="not CoZ's SR_VAE"):
        apply_vae_encoder(vae, plain)
    state = torch.load(tiny.vae_pt, weights_only=True)
    state["conv_in.base_layer.weight"] = state["conv_in.base_layer.weight"][:4]
    state["conv_in.lora_B.default_encoder.weight"] = state["conv_in.lora_B.default_encoder.weight"][:4]
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"do not fit.*conv_in.weight"):
        apply_vae_encoder(vae, bad)


# --- wrong model families ---------------------------------------------------------------------------

def _rewrite(src, dst, change):
    tensors = load_file(str(src))
    change(tensors)
    save_file(tensors, str(dst))
    return dst


def test_wrong_families_are_refused(tiny, tmp_path):
    sdxl = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3),
               "conditioner.embedders.1.model.positional_embedding": torch.zeros(2, 2)}, str(sdxl))
    with pytest.raises(CheckpointError, match="SDXL"):
        load_sd3_medium(sdxl, config_dir=tiny.folder)

    def add_attn2(t):
        t["model.diffusion_model.joint_blocks.0.x_block.attn2.qkv.weight"] = torch.zeros(48, 16)
    sd35 = _rewrite(tiny.single, tmp_path / "sd3.5_medium.safetensors", add_attn2)
    with pytest.raises(CheckpointError, match="3.5"):
        detect_sd3_file(sd35, tiny.folder)

    def drop_block(t):
        for k in [k for k in t if ".joint_blocks.2." in k]:
            del t[k]
    short = _rewrite(tiny.single, tmp_path / "short.safetensors", drop_block)
    with pytest.raises(CheckpointError, match="2 blocks"):
        detect_sd3_file(short, tiny.folder)
    with pytest.raises(CheckpointError, match="not a CLIP text model"):
        load_sd3_medium(tiny.single, clip_l=tiny.t5, clip_g=tiny.clip_g, config_dir=tiny.folder)
    with pytest.raises(CheckpointError, match=r"clip_l weights do not match.*wrong shape"):
        load_sd3_medium(tiny.single, clip_l=tiny.clip_g, clip_g=tiny.clip_g, text_encoders=("clip_l", "clip_g"),
                        config_dir=tiny.folder)
    ckpt = tmp_path / "sd3_medium.ckpt"
    ckpt.write_bytes(b"0")
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_sd3_medium(ckpt, config_dir=tiny.folder)
    with pytest.raises(CheckpointError, match="has no t5 text encoder"):
        load_sd3_medium(tiny.single_clips, config_dir=tiny.folder)


def test_folder_of_another_family_is_refused(tiny, tmp_path):
    folder = tmp_path / "sd35"
    shutil.copytree(tiny.folder, folder)
    cfg = folder / "transformer" / "config.json"
    cfg.write_text(cfg.read_text().replace('"num_layers"', '"dual_attention_layers": [0], "num_layers"'))
    with pytest.raises(CheckpointError, match="3.5"):
        load_sd3_medium(folder)


def test_missing_tokenizer_says_what_to_do(tiny):
    model = CoZSD3Backbone.from_files(tiny.single_clips, None, None, t5=tiny.t5, config_dir=tiny.folder, precision=FP32)
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        model(SRRequest(x, x, ["a cat"]))


# --- tiling ----------------------------------------------------------------------------------------

def test_tile_starts_cover_with_overlap():
    for length, tile, overlap, align in [(100, 32, 8, 1), (96, 32, 16, 8), (33, 32, 4, 1), (512, 128, 32, 2)]:
        starts = tile_starts(length, tile, overlap, align)
        assert starts[0] == 0 and starts[-1] + tile == length
        assert all(s % align == 0 for s in starts[:-1])
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


def test_tiled_equals_untiled_for_local_functions():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 40, 56, generator=g)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)

    def upscale(t):  # a local map that also changes channels and size, like a VAE decoder
        return torch.nn.functional.interpolate(conv(t), scale_factor=2, mode="nearest")

    with torch.no_grad():
        whole = upscale(x)
        tiled = tiled_map(upscale, x, tile=16, overlap=8, scale=2)  # margin 2 >= the conv's reach 1
    assert tiled.shape == whole.shape
    torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-6)


def test_tiled_vae_and_latents_are_close_and_seamless(tiny):
    whole = CoZSD3Backbone.from_files(tiny.folder, tiny.lora_pkl, tiny.vae_pt, precision=FP32, latent_mode="mean",
                                      text_encoders=())
    tiled = CoZSD3Backbone(whole.transformer, whole.vae, None, latent_mode="mean",
                           tiles=TileSettings(vae=64, vae_overlap=32, latent=64, latent_overlap=32))
    cond = (torch.randn(1, 20, 32), torch.randn(1, 24))
    x = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 12), size=(96, 96), mode="bicubic").clamp(0, 1)
    a, b = whole(SRRequest(x, x, conditioning=cond)), tiled(SRRequest(x, x, conditioning=cond))
    # the VAE's group norms and the transformer's attention see only a tile: close, not equal
    assert (a - b).abs().mean() < 0.02
    # no seam: the tiled result is as smooth across tile borders as the untiled one
    def step(img):
        return (img[..., :, 1:] - img[..., :, :-1]).abs().mean(dim=(0, 1, 2))
    assert step(b).max() < 1.5 * step(a).max() + 1e-3


def test_context_tiles_equal_the_whole_image_within_the_model_reach():
    """Disjoint tiles with context (the upscale models' strategy): exact when the reach is covered."""
    from coz_core.tiling import context_tiled_map

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 3, 5, padding=2)  # reach: 2 cells
    def fn(t):  # a x2 model with a bounded reach
        return conv(t).repeat_interleave(2, -2).repeat_interleave(2, -1)

    x = torch.rand(1, 3, 37, 50)
    with torch.no_grad():
        whole = fn(x)
        torch.testing.assert_close(context_tiled_map(fn, x, 16, 2, scale=2), whole, rtol=0, atol=1e-6)
        assert (context_tiled_map(fn, x, 16, 1, scale=2) - whole).abs().max() > 1e-3  # too little context shows
