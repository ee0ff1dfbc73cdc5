"""Loading Stable Diffusion 3 medium offline, from the files users really have.

Sources:
- a diffusers folder (``stable-diffusion-3-medium-diffusers`` layout: transformer/, vae/,
  text_encoder{,_2,_3}/, tokenizer{,_2,_3}/);
- ComfyUI's single files: ``sd3_medium.safetensors`` (transformer + VAE), ``sd3_medium_incl_clips``
  (+ CLIP-L/G), ``sd3_medium_incl_clips_t5xxlfp8`` (+ T5-XXL stored as float8), with separate
  ``clip_l`` / ``clip_g`` / ``t5xxl`` files for what the checkpoint lacks;
- the text-encoder layouts ComfyUI accepts (read the way ComfyUI reads them, ``comfy/sd.py``,
  ``comfy/utils.py``, ``comfy/ops.py``): scaled fp8 T5 (``t5xxl_fp8_e4m3fn_scaled``: float8 weights,
  a float32 ``scale_weight`` per Linear, a ``scaled_fp8`` marker; effective weight = weight x
  scale), alone or inside a checkpoint; OpenCLIP-keyed CLIP files (``transformer.resblocks.N``,
  ``positional_embedding``, ``text_projection`` used as ``x @ P``, so stored transposed); old
  CLIPSave files whose bare ``text_projection`` is transposed the same way.

Every component is built on the meta device from a config (the shipped SD3-medium configs in
``coz_core/configs/sd3_medium`` unless another folder is given), checked key by key and shape by
shape against the file, then filled without ever holding a second copy; nothing reaches the hub.
Single-file keys are converted with diffusers' own SD3 converters.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_vae_checkpoint, convert_sd3_transformer_checkpoint_to_diffusers,
)
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from ..policy import SD3Precision
from ..checkpoints import CheckpointError, describe_mismatch, is_safetensors, read_safetensors, safetensors_keys

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "sd3_medium"
TEXT_COMPONENTS = ("clip_l", "clip_g", "t5")
# single-file prefixes (Stability's original SD3 checkpoint layout, as ComfyUI reads it)
PREFIX = {
    "transformer": "model.diffusion_model.",
    "vae": "first_stage_model.",
    "clip_l": "text_encoders.clip_l.transformer.",
    "clip_g": "text_encoders.clip_g.transformer.",
    "t5": "text_encoders.t5xxl.transformer.",
}
SUBFOLDER = {"transformer": "transformer", "vae": "vae", "clip_l": "text_encoder",
             "clip_g": "text_encoder_2", "t5": "text_encoder_3"}
TOKENIZER_SUBFOLDER = {"clip_l": "tokenizer", "clip_g": "tokenizer_2", "t5": "tokenizer_3"}
FP8 = torch.float8_e4m3fn
_IGNORED_EXTRA = {"logit_scale", "text_model.embeddings.position_ids", "attn_mask"}  # harmless extras in CLIP files


@dataclass
class SD3Models:
    transformer: SD3Transformer2DModel
    vae: AutoencoderKL
    text_encoders: dict[str, torch.nn.Module] = field(default_factory=dict)  # clip_l, clip_g, t5
    tokenizer_paths: dict[str, Path] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)  # component -> where it came from


# --- configs -----------------------------------------------------------------------------------

def read_config(component: str, config_dir: str | Path | None = None) -> dict:
    folder = Path(config_dir) if config_dir else CONFIG_DIR
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    path = folder / SUBFOLDER.get(component, component) / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing config for the {component}; the folder must use the diffusers layout")
    return json.loads(path.read_text())


def _meta_model(component: str, config: dict) -> torch.nn.Module:
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        if component == "transformer":
            return SD3Transformer2DModel.from_config(cfg)
        if component == "vae":
            return AutoencoderKL.from_config(cfg)
        if component == "t5":
            return T5EncoderModel(T5Config(**cfg))
        return CLIPTextModelWithProjection(CLIPTextConfig(**cfg))


# --- fp8 storage ---------------------------------------------------------------------------------

class UpcastLinear(torch.nn.Linear):
    """A Linear whose weight is stored in a narrow dtype (float8) and upcast to the input's per call.

    The weight lives in the ``stored_weight`` buffer and ``weight`` is None, so library code that
    casts activations to ``weight.dtype`` (T5's feed-forward does) leaves them alone. A scaled-fp8
    weight also has a ``weight_scale`` buffer, applied as ComfyUI's ``scaled_fp8_ops`` Linear does
    (on the weight, or on the input when that is smaller: the same rounding as ComfyUI).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        weight = self.stored_weight.to(x.dtype)
        scale = self._buffers.get("weight_scale")
        if scale is None:
            return torch.nn.functional.linear(x, weight, bias)
        scale = scale.to(x.device, x.dtype)
        if weight.numel() < x.numel():
            return torch.nn.functional.linear(x, weight * scale, bias)
        return torch.nn.functional.linear(x * scale, weight, bias)


class ScaledUpcastLinear(UpcastLinear):
    """An :class:`UpcastLinear` whose float8 weight rows carry a float32 scale (row max / 448).

    Unscaled e4m3 flushes weights below 2^-9 to zero and keeps 3 bits for those above; per-row
    scales use the whole range for each output channel (the usual fp8 weight-only storage).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.nn.functional.linear(x, self.stored_weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def store_linears(model: torch.nn.Module, dtype: torch.dtype, scales: dict[str, torch.Tensor] | None = None,
                  skip: frozenset[str] = frozenset(), scaled: bool = False) -> torch.nn.Module:
    """Keep every Linear weight of ``model`` in ``dtype`` (e.g. float8), computing in the input dtype.

    ``scales``: module name -> scalar ``scale_weight`` of a scaled-fp8 file; ``skip``: modules left
    as they are; ``scaled``: one float32 scale per output row (for models whose weights were not
    trained or saved in float8, e.g. SD3's transformer; ComfyUI's plain T5 fp8 files are casts)."""
    scales = scales or {}
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and name not in skip:
            weight = module.weight.data
            if scaled:
                scale = weight.float().abs().amax(dim=1).clamp_min(1e-12) / torch.finfo(dtype).max
                module.__class__ = ScaledUpcastLinear
                module.register_buffer("weight_scale", scale)
                weight = (weight.float() / scale[:, None]).to(dtype)
            else:
                weight = weight.to(dtype)
                module.__class__ = UpcastLinear
            module.register_parameter("weight", None)
            module.register_buffer("stored_weight", weight)
            if name in scales:
                module.register_buffer("weight_scale", scales[name].float().reshape(()))
    return model


# --- ComfyUI's text-encoder layouts --------------------------------------------------------------

SCALED_FP8_MARKER = "scaled_fp8"


def split_scaled_fp8(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state without the scaled-fp8 keys, {module: scale_weight}) of a ComfyUI scaled-fp8 state dict.

    The ``scaled_fp8`` marker and ``scale_input`` keys go: ComfyUI's text encoders never scale inputs
    (``scaled_fp8_ops(fp8_matrix_mult=False)`` sets ``scale_input`` to None, so those keys load nowhere).
    """
    scales = {k[: -len(".scale_weight")]: v for k, v in state.items() if k.endswith(".scale_weight")}
    rest = {k: v for k, v in state.items()
            if not (k.endswith(".scale_weight") or k.endswith(".scale_input") or k == SCALED_FP8_MARKER)}
    return rest, scales


def fold_scales(state: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scaled-fp8 weights as plain float32 tensors: weight x scale_weight (ComfyUI's ``convert_weight``)."""
    out = dict(state)
    for module, scale in scales.items():
        key = f"{module}.weight"
        if key in out:
            out[key] = out[key].float() * scale.float()
    return out


_OPENCLIP_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "attn.out_proj": "self_attn.out_proj"}


def openclip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower keys -> transformers CLIPTextModel keys, as ComfyUI's
    ``clip_text_transformers_convert`` maps them (fused ``in_proj`` split in q/k/v; the bare
    ``text_projection`` P is used as ``x @ P``, so the Linear weight is P transposed)."""
    out: dict[str, torch.Tensor] = {}
    simple = {"positional_embedding": "text_model.embeddings.position_embedding.weight",
              "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
              "ln_final.weight": "text_model.final_layer_norm.weight",
              "ln_final.bias": "text_model.final_layer_norm.bias"}
    for key, value in state.items():
        fused = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
        m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)
        if key in simple:
            out[simple[key]] = value
        elif key == "text_projection":
            out["text_projection.weight"] = value.transpose(0, 1).contiguous()
        elif fused:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"text_model.encoder.layers.{fused.group(1)}.self_attn.{name}.{fused.group(2)}"] = part
        elif m and m.group(2) in _OPENCLIP_BLOCK:
            out[f"text_model.encoder.layers.{m.group(1)}.{_OPENCLIP_BLOCK[m.group(2)]}.{m.group(3)}"] = value
        else:
            out[key] = value  # left as is: checked (and refused if unknown) when the model is built
    return out


def comfy_clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A separate CLIP text-encoder file's state as ComfyUI's ``load_text_encoder_state_dicts`` reads it."""
    if "transformer.resblocks.0.ln_1.weight" in state:
        return openclip_to_transformers(state)
    if "text_projection" in state:  # old CLIPSave files: a bare projection, stored transposed
        state = dict(state)
        state["text_projection.weight"] = state.pop("text_projection").transpose(0, 1).contiguous()
    return state


# --- building -----------------------------------------------------------------------------------

def build_component(
    component: str, state: dict[str, torch.Tensor], config: dict, dtype: torch.dtype,
    source: str, keep_fp8_linears: bool = False,
) -> torch.nn.Module:
    """Build ``component`` from a diffusers/transformers-keyed ``state``, checking every key and shape.

    Scaled-fp8 weights (ComfyUI's ``scale_weight`` keys) keep their scale beside the float8 weight
    when ``keep_fp8_linears``, else are folded (weight x scale) before the cast to ``dtype``. A
    float16 T5 keeps its ``wo`` projections in float32, as transformers does (``_keep_in_fp32_modules``).
    """
    model = _meta_model(component, config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state, scales = split_scaled_fp8(state)
    linears = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    if set(scales) - linears:
        raise CheckpointError(f"{source}: scale_weight keys for modules that are not Linear layers of the "
                              f"{component}: {sorted(set(scales) - linears)[:4]}")
    keep_fp32 = _fp32_modules(model) if dtype == torch.float16 else frozenset()
    if scales and not keep_fp8_linears:
        state, scales = fold_scales(state, scales), {}
    elif keep_fp32:  # those are never stored in float8
        state = fold_scales(state, {m: v for m, v in scales.items() if m in keep_fp32})
        scales = {m: v for m, v in scales.items() if m not in keep_fp32}
    if component == "t5":  # tied input embedding: files store one of the two names
        shared = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
        if shared is not None:
            state["shared.weight"] = state["encoder.embed_tokens.weight"] = shared
    if component == "clip_l" and "text_projection.weight" not in state and "text_projection.weight" in expected:
        # SD3's CLIP-L pooled output is unprojected (diffusers and ComfyUI use an identity here)
        state["text_projection.weight"] = torch.eye(expected["text_projection.weight"][0])
    state = {k: v for k, v in state.items() if k in expected or k not in _IGNORED_EXTRA}
    problem = describe_mismatch(expected, {k: tuple(v.shape) for k, v in state.items()})
    if problem:
        raise CheckpointError(f"{source}: the {component} weights do not match SD3 medium's {component} ({problem})")
    linear_weights = {f"{n}.weight" for n in linears}
    fp32_weights = {f"{n}.weight" for n in keep_fp32}

    def cast(k: str) -> torch.Tensor:
        if k in fp32_weights:
            return state[k].to(torch.float32)
        return state[k].to(FP8 if keep_fp8_linears and k in linear_weights else dtype)

    model.load_state_dict({k: cast(k) for k in expected}, strict=True, assign=True)
    if component == "t5":
        model.encoder.embed_tokens.weight = model.shared.weight
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:  # CLIP's non-persistent position ids
            if not name.endswith("position_ids"):
                raise CheckpointError(f"{source}: buffer {name} of the {component} was not initialised")
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(1, -1), persistent=False)
    if keep_fp8_linears:
        store_linears(model, FP8, scales, skip=keep_fp32)
    return model.eval().requires_grad_(False)


def _fp32_modules(model: torch.nn.Module) -> frozenset[str]:
    """Linear modules transformers keeps in float32 when the model runs in float16 (T5's ``wo``)."""
    names = getattr(model, "_keep_in_fp32_modules", None) or []
    return frozenset(n for n, m in model.named_modules()
                     if type(m) is torch.nn.Linear and any(part in names for part in n.split(".")))



# --- detection ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SingleFileInfo:
    path: Path
    components: tuple[str, ...]  # of transformer, vae, clip_l, clip_g, t5
    t5_fp8: bool


def _joint_blocks(keys: dict) -> int:
    ids = {int(m.group(1)) for k in keys for m in [re.search(r"joint_blocks\.(\d+)\.", k)] if m}
    return max(ids) + 1 if ids else 0


def detect_sd3_file(path: str | Path, config_dir: str | Path | None = None) -> SingleFileInfo:
    """What an SD3-medium single-file checkpoint holds; refuses other model families clearly."""
    path = Path(path)
    keys = safetensors_keys(path)
    unet = any(k.startswith("model.diffusion_model.input_blocks.") for k in keys)
    if unet:
        family = "SDXL" if any(k.startswith("conditioner.embedders.1.") for k in keys) else "SD 1.x/2.x"
        raise CheckpointError(f"{path}: this is a {family} (UNet) checkpoint, not Stable Diffusion 3 medium; "
                              "CoZ needs sd3_medium*.safetensors or the stable-diffusion-3-medium-diffusers folder")
    if any("double_blocks." in k for k in keys):
        raise CheckpointError(f"{path}: this is a Flux checkpoint, not Stable Diffusion 3 medium")
    t_keys = {k: v for k, v in keys.items() if k.startswith(PREFIX["transformer"])}
    if not t_keys:
        if any(k.startswith("transformer_blocks.") for k in keys):
            raise CheckpointError(f"{path}: a diffusers-format transformer file; pass the whole diffusers folder "
                                  "instead (Wan2GP's CoZ_sd3_medium_srlora_bf16 goes in the CoZ LoRA slot)")
        raise CheckpointError(f"{path}: no SD3 transformer ('{PREFIX['transformer']}joint_blocks...') in this file; "
                              "it is not an SD3 checkpoint")
    cfg = read_config("transformer", config_dir)
    if any(".attn2." in k for k in t_keys) or any(".ln_q." in k for k in t_keys):
        raise CheckpointError(f"{path}: this is a Stable Diffusion 3.5 checkpoint (it has "
                              f"{'dual-attention' if any('.attn2.' in k for k in t_keys) else 'QK-norm'} blocks); "
                              "CoZ's weights were trained on SD3 medium (v1), use sd3_medium*.safetensors")
    blocks, hidden = _joint_blocks(t_keys), cfg["num_attention_heads"] * cfg["attention_head_dim"]
    x_embed = t_keys.get(PREFIX["transformer"] + "x_embedder.proj.weight", ((0,), ""))[0]
    if blocks != cfg["num_layers"] or x_embed[0] != hidden:
        raise CheckpointError(f"{path}: an SD3-family transformer with {blocks} blocks of width {x_embed[0]}, but SD3 "
                              f"medium has {cfg['num_layers']} blocks of width {hidden} (SD3.5 large has 38)")
    components = ["transformer"]
    for name in ("vae", "clip_l", "clip_g", "t5"):
        if any(k.startswith(PREFIX[name]) for k in keys):
            components.append(name)
    t5_fp8 = any(v[1].startswith("F8") for k, v in keys.items() if k.startswith(PREFIX["t5"]))
    return SingleFileInfo(path, tuple(components), t5_fp8)


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _text_file_state(path: Path, component: str) -> dict[str, torch.Tensor]:
    """A separate text-encoder file (ComfyUI's models/clip or models/text_encoders), prefix removed,
    in transformers' keys (OpenCLIP and CLIPSave layouts converted as ComfyUI converts them)."""
    keys = safetensors_keys(path)
    anchors = (["encoder.final_layer_norm.weight"] if component == "t5"
               else ["text_model.embeddings.token_embedding.weight", "transformer.resblocks.0.ln_1.weight"])
    hits = [(k, a) for a in anchors for k in keys if k == a or k.endswith("." + a)]
    if not hits:
        kind = ("T5 encoder ('encoder.block...')" if component == "t5"
                else "CLIP text model ('text_model.embeddings...' or OpenCLIP 'transformer.resblocks...')")
        raise CheckpointError(f"{path}: not a {kind}; it cannot serve as the {component} text encoder")
    key, anchor = hits[0]
    prefix = key[: -len(anchor)]
    state = _strip(read_safetensors(path, lambda k: k.startswith(prefix)), prefix)
    if component != "t5":
        state = comfy_clip_state(state)
    return _single_file_clip_l(state, component)


def _single_file_clip_l(state: dict[str, torch.Tensor], component: str) -> dict[str, torch.Tensor]:
    """SD3 pools CLIP-L unprojected: single files get the identity projection, as diffusers and ComfyUI do."""
    if component == "clip_l":
        state.pop("text_projection.weight", None)
    return state


def _folder_state(folder: Path, component: str) -> dict[str, torch.Tensor]:
    sub = folder / SUBFOLDER[component]
    files = sorted(sub.glob("*.safetensors"))
    # plain: without the variants, e.g. model.fp16-00001-of-00002
    plain = [f for f in files if not re.search(r"\.(fp16|bf16|fp32)[.-]", f.name)]
    files = plain or files
    if not files:
        raise CheckpointError(f"{sub}: no .safetensors weights for the {component} (only safetensors are read)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(read_safetensors(f))
    return state


def tokenizer_paths_from_folder(folder: str | Path) -> dict[str, Path]:
    """clip_l / clip_g / t5 tokenizer folders of a diffusers SD3 folder (those that exist)."""
    folder = Path(folder)
    return {c: folder / s for c, s in TOKENIZER_SUBFOLDER.items() if (folder / s).is_dir()}


def load_sd3_medium(
    source: str | Path,
    *,
    clip_l: str | Path | None = None,
    clip_g: str | Path | None = None,
    t5: str | Path | None = None,
    text_encoders: tuple[str, ...] = TEXT_COMPONENTS,
    tokenizers: str | Path | dict[str, str | Path] | None = None,
    precision: SD3Precision | None = None,
    config_dir: str | Path | None = None,
    overrides: dict[str, tuple[str | Path, Callable[[dict], dict]]] | None = None,
) -> SD3Models:
    """Load SD3 medium from a diffusers folder or a single-file checkpoint (+ separate text encoders).

    ``text_encoders`` names the encoders to load (leave out "t5" to save ~10 GB; SD3 then gets
    zeros in T5's place; pass () when prompts arrive as precomputed embeddings). Separate files
    (``clip_l``/``clip_g``/``t5``) override what the checkpoint contains. ``tokenizers``: a
    diffusers-layout folder or {"clip_l"/"clip_g"/"t5": folder}; defaults to ``source`` when it is
    a diffusers folder. ``config_dir`` replaces the shipped SD3-medium configs (tests use tiny ones).
    ``overrides``: component -> (file, function of the component's config giving its diffusers-keyed
    state), read instead of the source's (Wan2GP's merged CoZ transformer / VAE).
    """
    precision = precision or SD3Precision()
    source = Path(source)
    separate = {"clip_l": clip_l, "clip_g": clip_g, "t5": t5}
    unknown = set(text_encoders) - set(TEXT_COMPONENTS)
    if unknown:
        raise ValueError(f"unknown text encoders {sorted(unknown)}; choose from {TEXT_COMPONENTS}")
    dtypes = {"transformer": precision.transformer, "vae": precision.vae, "clip_l": precision.text,
              "clip_g": precision.text, "t5": precision.t5}

    if source.is_dir():
        if not (source / "transformer").is_dir():
            raise CheckpointError(f"{source}: not a diffusers SD3 folder (no transformer/ subfolder)")
        cfg_dir = config_dir or source
        getters: dict[str, Callable[[], dict]] = {c: (lambda c=c: _folder_state(source, c))
                                                    for c in ("transformer", "vae", *TEXT_COMPONENTS)
                                                    if (source / SUBFOLDER[c]).is_dir()}
        _check_folder_family(source, cfg_dir)
        tokenizer_default = tokenizer_paths_from_folder(source)
    else:
        if not is_safetensors(source):
            raise CheckpointError(f"{source}: only .safetensors single files (or a diffusers folder) are read; "
                                  "pickled .ckpt/.pt checkpoints are refused for safety")
        info = detect_sd3_file(source, config_dir)
        if "vae" not in info.components:
            raise CheckpointError(f"{source}: the checkpoint has no VAE ('first_stage_model.'); "
                                  "use sd3_medium.safetensors")
        cfg_dir = config_dir
        getters = {}
        for c in info.components:
            getters[c] = lambda c=c: _single_file_component(source, c, cfg_dir)
        tokenizer_default = {}

    for c, path in separate.items():
        if path is not None:
            getters[c] = lambda c=c, p=Path(path): _text_file_state(p, c)
    for c, (path, read) in (overrides or {}).items():
        separate[c] = path
        getters[c] = lambda c=c, read=read: read(read_config(c, cfg_dir))

    models = SD3Models(None, None)  # type: ignore[arg-type]
    for c in ("transformer", "vae", *text_encoders):
        if c not in getters:
            raise CheckpointError(
                f"{source}: has no {c} text encoder; give its file ({c}.safetensors from ComfyUI's "
                f"models/clip or text_encoders) or leave '{c}' out of the text encoders"
            )
        where = str(separate.get(c) or source)
        state = getters[c]()
        fp8 = c == "t5" and (precision.t5_fp8 if precision.t5_fp8 is not None
                             else any(v.dtype == FP8 for v in state.values()))
        if c != "t5" and any(k.endswith(".scale_weight") for k in state):
            raise CheckpointError(f"{where}: a scaled-fp8 {c}; only T5 is read from scaled-fp8 files")
        model = build_component(c, state, read_config(c, cfg_dir), dtypes[c], where, keep_fp8_linears=fp8)
        del state
        models.sources[c] = where
        if c == "transformer":
            models.transformer = model
        elif c == "vae":
            models.vae = model
        else:
            models.text_encoders[c] = model

    if isinstance(tokenizers, (str, Path)):
        tokenizers = tokenizer_paths_from_folder(tokenizers)
    models.tokenizer_paths = {c: Path(p) for c, p in (tokenizers or tokenizer_default).items()}
    return models


def _single_file_component(path: Path, component: str, config_dir) -> dict[str, torch.Tensor]:
    state = read_safetensors(path, lambda k: k.startswith(PREFIX[component]))
    if component == "transformer":
        return convert_sd3_transformer_checkpoint_to_diffusers(_strip(state, PREFIX["transformer"]))
    if component == "vae":
        return convert_ldm_vae_checkpoint(state, read_config("vae", config_dir))
    return _single_file_clip_l(_strip(state, PREFIX[component]), component)


def _check_folder_family(folder: Path, config_dir) -> None:
    cfg = read_config("transformer", config_dir)
    if cfg.get("dual_attention_layers") or cfg.get("qk_norm"):
        raise CheckpointError(f"{folder}: a Stable Diffusion 3.5 transformer (dual attention / QK norm); "
                              "CoZ needs SD3 medium")
    if cfg.get("_class_name", "SD3Transformer2DModel") != "SD3Transformer2DModel":
        raise CheckpointError(f"{folder}: transformer is a {cfg.get('_class_name')}, not SD3Transformer2DModel")
