"""The other file layouts users have: Wan2GP's merged CoZ files and ComfyUI's text-encoder layouts.

Every file is written here from its source's own conventions, never by the pack:
- Wan2GP (deepbeepmeep/Wan2GP, postprocessing/chain_of_zoom): ``CoZ_sd3_medium_srlora_bf16`` is a
  diffusers-keyed SD3 transformer with CoZ's LoRA merged (W + up @ down), bfloat16, loaded with
  unused keys ignored and the positional table regenerated (``sd3_transformer.py``); the VAE file
  is a whole diffusers AutoencoderKL with CoZ's encoder LoRA merged (merged here with PEFT's own
  ``merge``), bfloat16.
- ComfyUI (comfy/ops.py ``scaled_fp8_ops``, comfy/sd.py ``load_text_encoder_state_dicts``,
  comfy/utils.py ``clip_text_transformers_convert``): scaled fp8 = float8 weight + float32 scalar
  ``scale_weight``, effective weight = weight x scale, marker ``scaled_fp8``; OpenCLIP keys; a bare
  ``text_projection`` stored transposed.
With ``COMFYUI_PATH`` set, ComfyUI's own conversion function is run on the OpenCLIP file as well.
"""
from __future__ import annotations

import copy
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

from coz_core.checkpoints import CheckpointError
from coz_core.sr.coz_sd3 import CoZSD3Backbone
from coz_core.sr.sd3_loading import FP8, SD3Precision, UpcastLinear, load_sd3_medium
from tests.sd3_fixtures import FP32, TRANSFORMER, TinySD3, save_single_file

BF16 = SD3Precision(transformer=torch.bfloat16, vae=torch.bfloat16, text=torch.float32, t5=torch.float32)


# --- Wan2GP --------------------------------------------------------------------------------------

def wan2gp_pos_embed(cfg: dict) -> torch.Tensor:
    """Wan2GP's ``_sincos_pos_embed_2d`` + ``init_runtime_buffers`` (bfloat16 table), written as there."""
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    grid_size, base_size = cfg["pos_embed_max_size"], cfg["sample_size"] // cfg["patch_size"]

    def one_d(embed_dim, positions):
        omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
        out = np.einsum("m,d->md", positions.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    coords = np.arange(grid_size, dtype=np.float64) / 4.0 - base_size / 4.0
    grid = np.stack(np.meshgrid(coords, coords), axis=0).reshape([2, 1, grid_size, grid_size])
    table = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    return torch.from_numpy(table).float().unsqueeze(0).to(torch.bfloat16)


def adaln_linear_names(transformer: torch.nn.Module) -> list[str]:
    """Upstream's search order (class name AdaLayerNormZero, its Linears), as module names."""
    names = []
    for anc_name, anc in transformer.named_modules():
        if anc.__class__.__name__ == "AdaLayerNormZero":
            names += [f"{anc_name}.{n}" for n, m in anc.named_modules() if isinstance(m, torch.nn.Linear)]
    return names


def write_wan2gp_files(tiny: TinySD3, root, with_pos_embed: bool = False):
    sd = {k: v.clone() for k, v in tiny.parts["transformer"].state_dict().items()}
    lora = tiny.lora_list
    for i, name in enumerate(adaln_linear_names(tiny.parts["transformer"])):
        up, down = lora[2 * i].float(), lora[2 * i + 1].float()
        sd[f"{name}.weight"] = sd[f"{name}.weight"].float() + up @ down
    if not with_pos_embed:
        sd.pop("pos_embed.pos_embed")  # Wan2GP's table is a runtime buffer, not in its checkpoint
    transformer = root / "CoZ_sd3_medium_srlora_bf16.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, str(transformer))

    vae = copy.deepcopy(tiny.peft_vae)
    for name, module in list(vae.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()  # PEFT's own merge: W + alpha / r * B @ A
            parent, leaf = name.rsplit(".", 1)
            setattr(vae.get_submodule(parent), leaf, module.get_base_layer())
    vae_sd = vae.state_dict()
    assert not any("lora" in k or "base_layer" in k for k in vae_sd)
    vae_path = root / "CoZ_sd3_vae_srlora_bf16.safetensors"
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in vae_sd.items()}, str(vae_path))
    return transformer, vae_path


@pytest.fixture(scope="module")
def wan_files(tiny, tmp_path_factory):
    return write_wan2gp_files(tiny, tmp_path_factory.mktemp("wan2gp"))


def test_wan2gp_files_load_as_wan2gp_loads_them(tiny, wan_files):
    t_path, v_path = wan_files
    model = CoZSD3Backbone.from_files(tiny.folder, t_path, v_path, text_encoders=(), precision=BF16)
    t_file, v_file = load_file(str(t_path)), load_file(str(v_path))
    t_sd = model.transformer.state_dict()
    assert set(t_sd) == set(t_file) | {"pos_embed.pos_embed"}
    for k, v in t_file.items():
        assert torch.equal(t_sd[k], v), k
    assert torch.equal(t_sd["pos_embed.pos_embed"], wan2gp_pos_embed(TRANSFORMER))
    v_sd = model.vae.state_dict()
    assert set(v_sd) == set(v_file)
    for k, v in v_file.items():
        assert torch.equal(v_sd[k], v), k


def test_wan2gp_files_equal_the_originals_merged_at_bf16(tiny, wan_files):
    """The same model as CoZ's own files, up to Wan2GP's regenerated positional table and one
    bfloat16 rounding (the pack merges into SD3's weights after casting them; Wan2GP merged in float32)."""
    wan = CoZSD3Backbone.from_files(tiny.folder, *wan_files, text_encoders=(), precision=FP32)
    ours = CoZSD3Backbone.from_files(tiny.folder, tiny.lora_pkl, tiny.vae_pt, text_encoders=(), precision=FP32)
    for a, b in ((wan.transformer.state_dict(), ours.transformer.state_dict()),
                 (wan.vae.state_dict(), ours.vae.state_dict())):
        assert set(a) == set(b)
        for k in a:
            if k != "pos_embed.pos_embed":
                assert torch.equal(a[k], b[k].to(torch.bfloat16).float()) or \
                    torch.allclose(a[k], b[k], rtol=2 ** -8, atol=1e-6), k


def test_wan2gp_transformer_with_its_table_keeps_it(tiny, tmp_path):
    t_path, _ = write_wan2gp_files(tiny, tmp_path, with_pos_embed=True)
    model = CoZSD3Backbone.from_files(tiny.folder, t_path, None, text_encoders=(), precision=BF16)
    assert torch.equal(model.transformer.pos_embed.pos_embed, load_file(str(t_path))["pos_embed.pos_embed"])


def test_wan2gp_files_in_the_wrong_slot_or_reference_are_refused(tiny, wan_files):
    t_path, v_path = wan_files
    with pytest.raises(ValueError, match="wan2gp vae file.*given as the lora"):
        CoZSD3Backbone.from_files(tiny.folder, v_path, None, text_encoders=(), precision=BF16)
    with pytest.raises(ValueError, match="given as the vae encoder"):
        CoZSD3Backbone.from_files(tiny.folder, None, tiny.lora_pkl, text_encoders=(), precision=BF16)
    with pytest.raises(ValueError, match="merged in; the reference"):
        CoZSD3Backbone.from_files(tiny.folder, t_path, v_path, text_encoders=(),
                                  precision=SD3Precision(torch.float32, torch.float32, adaln_lora="reference"))
    with pytest.raises(CheckpointError, match="not a CoZ weight file"):
        CoZSD3Backbone.from_files(tiny.folder, tiny.clip_l, None, text_encoders=(), precision=BF16)


# --- scaled fp8 T5 (ComfyUI) -----------------------------------------------------------------------

def scaled_fp8_t5(t5: torch.nn.Module, scale_input: bool = True) -> dict[str, torch.Tensor]:
    """``t5xxl_fp8_e4m3fn_scaled`` layout: every Linear as float8 weight / scale with a float32 scalar
    ``scale_weight`` (and ``scale_input``, unused by ComfyUI's text encoders), the rest in float16,
    and the ``scaled_fp8`` marker (an empty tensor of the float8 dtype, as ComfyUI writes it)."""
    out = {k: v.half() for k, v in t5.state_dict().items() if not k.endswith("embed_tokens.weight")}
    for name, module in t5.named_modules():
        if isinstance(module, torch.nn.Linear):
            w = module.weight.detach().float()
            scale = w.abs().max() / 448.0
            out[f"{name}.weight"] = (w / scale).to(FP8)
            out[f"{name}.scale_weight"] = scale.reshape(())
            if scale_input:
                out[f"{name}.scale_input"] = torch.tensor(3.0)  # must be ignored
    out["scaled_fp8"] = torch.tensor([], dtype=FP8)
    return out


def comfy_effective(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ComfyUI's scaled_fp8 Linear multiplies by: weight (cast up) x scale_weight."""
    out = {}
    for k, v in state.items():
        if k.endswith(".weight") and k[: -len(".weight")] + ".scale_weight" in state:
            out[k] = v.float() * state[k[: -len(".weight")] + ".scale_weight"]
        elif not k.endswith((".scale_weight", ".scale_input")) and k != "scaled_fp8":
            out[k] = v.float()
    return out


def hf_t5_with(tiny: TinySD3, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    model = copy.deepcopy(tiny.parts["t5"]).float()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}
    return model.eval()


@pytest.fixture(scope="module")
def scaled_t5(tiny, tmp_path_factory):
    state = scaled_fp8_t5(tiny.parts["t5"])
    path = tmp_path_factory.mktemp("scaled") / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(state, str(path))
    return path, state


def test_scaled_fp8_t5_dequantised_is_weight_times_scale(tiny, scaled_t5):
    path, state = scaled_t5
    t5 = load_sd3_medium(tiny.folder, t5=path, text_encoders=("t5",),
                         precision=SD3Precision(t5=torch.float32, t5_fp8=False)).text_encoders["t5"]
    expected = comfy_effective(state)
    got = t5.state_dict()
    for k, v in expected.items():
        assert torch.equal(got[k], v), k


def test_scaled_fp8_t5_kept_in_fp8_computes_as_comfyui(tiny, scaled_t5):
    path, state = scaled_t5
    t5 = load_sd3_medium(tiny.folder, t5=path, text_encoders=("t5",),
                         precision=SD3Precision(t5=torch.float32)).text_encoders["t5"]
    q = t5.encoder.block[0].layer[0].SelfAttention.q
    assert isinstance(q, UpcastLinear) and q.stored_weight.dtype == FP8
    assert torch.equal(q.weight_scale, state["encoder.block.0.layer.0.SelfAttention.q.scale_weight"])
    ids = torch.tensor([[3, 7, 9, 1] + [0] * 12])
    reference = hf_t5_with(tiny, comfy_effective(state))
    with torch.no_grad():
        torch.testing.assert_close(t5(ids)[0], reference(ids)[0], rtol=1e-5, atol=1e-5)
        long = torch.randint(2, 30, (1, 512))  # input larger than the weights: ComfyUI scales the input
        torch.testing.assert_close(t5(long)[0], reference(long)[0], rtol=1e-5, atol=1e-5)


def test_scaled_fp8_t5_inside_a_checkpoint(tiny, tmp_path):
    single = save_single_file(tiny.parts, tmp_path / "sd3_scaled.safetensors", ("clip_l", "clip_g"))
    state = load_file(str(single))
    t5_state = scaled_fp8_t5(tiny.parts["t5"], scale_input=False)
    state.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5_state.items()})
    save_file(state, str(single))
    models = load_sd3_medium(single, text_encoders=("t5",), precision=SD3Precision(t5=torch.float32, t5_fp8=False),
                             config_dir=tiny.folder)
    got = models.text_encoders["t5"].state_dict()
    for k, v in comfy_effective(t5_state).items():
        assert torch.equal(got[k], v), k


# --- CLIP-G in OpenCLIP and CLIPSave layouts (ComfyUI) ---------------------------------------------

def openclip_text(clip: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A transformers CLIPTextModelWithProjection in open_clip's text-tower names: fused in_proj
    (q, k, v stacked), ``text_projection`` used as ``x @ P`` (the Linear weight transposed)."""
    sd = clip.state_dict()
    n = clip.config.num_hidden_layers
    out = {"token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": sd["text_model.final_layer_norm.weight"],
           "ln_final.bias": sd["text_model.final_layer_norm.bias"],
           "text_projection": sd["text_projection.weight"].t().contiguous(),
           "logit_scale": torch.tensor(4.6052)}
    names = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
             "attn.out_proj": "self_attn.out_proj"}
    for i in range(n):
        hf = f"text_model.encoder.layers.{i}."
        for p in ("weight", "bias"):
            for oc, name in names.items():
                out[f"transformer.resblocks.{i}.{oc}.{p}"] = sd[f"{hf}{name}.{p}"]
            out[f"transformer.resblocks.{i}.attn.in_proj_{p}"] = torch.cat(
                [sd[f"{hf}self_attn.{x}_proj.{p}"] for x in "qkv"])
    return {k: v.contiguous() for k, v in out.items()}


def _clip_g_state(tiny: TinySD3, path) -> dict[str, torch.Tensor]:
    return load_sd3_medium(tiny.folder, clip_g=path, text_encoders=("clip_g",),
                           precision=FP32).text_encoders["clip_g"].state_dict()


def test_openclip_clip_g_loads_to_the_transformers_weights(tiny, tmp_path):
    path = tmp_path / "clip_g_openclip.safetensors"
    save_file(openclip_text(tiny.parts["clip_g"]), str(path))
    got, want = _clip_g_state(tiny, path), tiny.parts["clip_g"].state_dict()
    for k, v in want.items():
        if k != "text_model.embeddings.position_ids":
            assert torch.equal(got[k], v), k


def test_clipsave_bare_text_projection_is_transposed(tiny, tmp_path):
    sd = dict(tiny.parts["clip_g"].state_dict())
    proj = sd.pop("text_projection.weight")
    sd["text_projection"] = proj.t().contiguous()
    path = tmp_path / "clip_g_clipsave.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    assert torch.equal(_clip_g_state(tiny, path)["text_projection.weight"], proj)


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="COMFYUI_PATH (a ComfyUI checkout) not set")
def test_openclip_clip_g_as_comfyui_converts_it(tiny, tmp_path):
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    try:
        from comfy.utils import clip_text_transformers_convert
    except ImportError as e:  # its requirements are not in this environment
        pytest.skip(f"ComfyUI's comfy.utils does not import here: {e}")
    finally:
        sys.path.pop(0)
        for name in [m for m in sys.modules if m == "comfy" or m.startswith("comfy.")]:
            del sys.modules[name]  # other tests must not believe they run inside ComfyUI
    state = openclip_text(tiny.parts["clip_g"])
    path = tmp_path / "clip_g_openclip.safetensors"
    save_file(state, str(path))
    comfy = clip_text_transformers_convert(dict(state), "", "")
    got = _clip_g_state(tiny, path)
    for k, v in comfy.items():
        if k not in ("logit_scale",):
            assert torch.equal(got[k], v), k


def test_scaled_fp8_t5_in_float16_keeps_wo_in_float32(tiny, scaled_t5):
    """transformers keeps T5's ``wo`` in float32 under float16; from a scaled-fp8 file it is folded."""
    path, state = scaled_t5
    t5 = load_sd3_medium(tiny.folder, t5=path, text_encoders=("t5",),
                         precision=SD3Precision(t5=torch.float16)).text_encoders["t5"]
    ff = t5.encoder.block[1].layer[1].DenseReluDense
    assert type(ff.wo) is torch.nn.Linear and ff.wo.weight.dtype == torch.float32
    assert torch.equal(ff.wo.weight, comfy_effective(state)["encoder.block.1.layer.1.DenseReluDense.wo.weight"])
    assert isinstance(ff.wi_0, UpcastLinear) and ff.wi_0.stored_weight.dtype == FP8


def test_wan2gp_files_with_a_key_prefix_load_the_same(tiny, wan_files, tmp_path):
    """mmgp (Wan2GP's loader) strips a prefix it finds before the model's keys: so does the pack."""
    paths = []
    for path, prefix in zip(wan_files, ("model.", "vae.")):
        out = tmp_path / path.name
        save_file({prefix + k: v for k, v in load_file(str(path)).items()}, str(out))
        paths.append(out)
    a = CoZSD3Backbone.from_files(tiny.folder, *paths, text_encoders=(), precision=BF16)
    b = CoZSD3Backbone.from_files(tiny.folder, *wan_files, text_encoders=(), precision=BF16)
    for x, y in ((a.transformer, b.transformer), (a.vae, b.vae)):
        sx, sy = x.state_dict(), y.state_dict()
        assert set(sx) == set(sy) and all(torch.equal(sx[k], sy[k]) for k in sx)
