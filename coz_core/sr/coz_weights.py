"""CoZ's trained weights: the transformer LoRA list and the LoRA-injected VAE encoder.

Upstream formats (see UPSTREAM.md):
- ``model_20001.pkl``: a torch-saved list ``[up0, down0, up1, down1, ...]``, one pair per
  ``nn.Linear`` inside every ``AdaLayerNormZero`` of the transformer, in ``model.modules()``
  order; effective weight ``W + up @ down``.
- ``vae_encoder_20001.pt``: ``vae.encoder.state_dict()`` after PEFT injected LoRA adapter
  ``default_encoder`` (r=4, lora_alpha=8, so scale 2): ``X.base_layer.*``, ``X.lora_A.default_encoder.weight``,
  ``X.lora_B.default_encoder.weight`` plus the untouched keys.

Both are merged into the model weights once at load time, so inference pays nothing per step.
``convert_coz_weights`` writes them as named safetensors files that load the same way.

The reference does not merge: its ``LoraInjectedLinear`` computes ``linear(x) + up(down(x))`` in
float32 and rounds the result to float16 (``.half()``), so every modulation (shift, scale, gate)
of a LoRA'd AdaLayerNormZero reaches the float32 transformer as float16, and diffusers then
computes ``1 + scale`` in float16 too. ``attach_reference_lora`` reproduces that bit for bit (the
``reference`` precision preset); merging instead differs from it by about 7e-3 relative (L2) in
the velocity on the test models (tests/test_coz_reference.py prints it).

Wan2GP repackages CoZ as two safetensors files (``postprocessing/chain_of_zoom`` in
deepbeepmeep/Wan2GP, which loads them into a diffusers-keyed SD3 transformer and a diffusers
``AutoencoderKL``): ``CoZ_sd3_medium_srlora_bf16.safetensors``, the whole SD3-medium transformer in
diffusers keys with the LoRA already merged (bfloat16; Wan2GP regenerates the positional table, so
the file may lack ``pos_embed.pos_embed``), and ``CoZ_sd3_vae_srlora_bf16.safetensors``, the whole
VAE in diffusers keys with CoZ's encoder merged. ``coz_file_kind`` tells the layouts apart; such a
file replaces the SD3 component it holds.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from diffusers.models.normalization import AdaLayerNormZero

from ..checkpoints import (
    CheckpointError, describe_mismatch, expect_tensor_dict, expect_tensor_list, is_safetensors,
    load_pickle_safely, load_weights, read_safetensors, safetensors_keys, save_safetensors,
)

PEFT_ADAPTER = "default_encoder"
PEFT_LORA_ALPHA = 8.0  # PEFT's default lora_alpha, used by the reference's LoraConfig(r=4)
LORA_FORMAT = "coz-sd3-adaln-lora"
VAE_FORMAT = "coz-sd3-vae-encoder-peft"


def adaln_lora_targets(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Linear]]:
    """(name, Linear) for every Linear inside every AdaLayerNormZero, in ``modules()`` order."""
    targets = []
    for ancestor_name, ancestor in transformer.named_modules():
        if type(ancestor) is not AdaLayerNormZero:  # exact class, as the reference matches by name
            continue
        for name, module in ancestor.named_modules():
            if isinstance(module, torch.nn.Linear):
                targets.append((f"{ancestor_name}.{name}", module))
    return targets


def load_lora_pairs(path: str | Path) -> list[tuple[str | None, torch.Tensor, torch.Tensor]]:
    """(layer name or None, up, down) from the upstream .pkl list or a converted .safetensors file."""
    if is_safetensors(path):
        tensors = read_safetensors(path)
        layers = sorted({k.rsplit(".lora_", 1)[0] for k in tensors}, key=_natural_key)
        pairs = []
        for layer in layers:
            up, down = tensors.get(f"{layer}.lora_up.weight"), tensors.get(f"{layer}.lora_down.weight")
            if up is None or down is None:
                raise CheckpointError(f"{path}: layer {layer} lacks its lora_up or lora_down weight")
            pairs.append((layer, up, down))
        if len(tensors) != 2 * len(pairs):
            raise CheckpointError(f"{path}: keys other than '<layer>.lora_up.weight'/'<layer>.lora_down.weight' found")
        return pairs
    items = expect_tensor_list(load_pickle_safely(path), path)
    if len(items) % 2:
        raise CheckpointError(f"{path}: a CoZ LoRA list holds up/down pairs, but it has {len(items)} tensors (odd)")
    return [(None, items[i], items[i + 1]) for i in range(0, len(items), 2)]


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _checked_lora(transformer: torch.nn.Module,
                  path: str | Path) -> list[tuple[str, torch.nn.Linear, torch.Tensor, torch.Tensor]]:
    """(name, Linear, up, down) for every AdaLayerNormZero linear, every count and shape checked."""
    targets = adaln_lora_targets(transformer)
    pairs = load_lora_pairs(path)
    if len(pairs) != len(targets):
        raise CheckpointError(
            f"{path}: {len(pairs)} LoRA layers ({2 * len(pairs)} tensors), but this transformer has "
            f"{len(targets)} AdaLayerNormZero linears ({2 * len(targets)} tensors expected); the file "
            "does not belong to this model (CoZ's SR LoRA is for SD3 medium: 47 layers, 94 tensors)"
        )
    for i, ((layer, up, down), (name, linear)) in enumerate(zip(pairs, targets)):
        if layer is not None and layer != name:
            raise CheckpointError(f"{path}: LoRA layer {i} is named {layer}, the model's is {name}")
        rank = down.shape[0] if down.ndim == 2 else -1
        want_up, want_down = (linear.out_features, rank), (rank, linear.in_features)
        if up.ndim != 2 or down.ndim != 2 or tuple(up.shape) != want_up or tuple(down.shape) != want_down:
            raise CheckpointError(
                f"{path}: LoRA layer {i} ({name}, tensors {2 * i} and {2 * i + 1}): up is "
                f"{tuple(up.shape)} and down {tuple(down.shape)}, expected up (out={linear.out_features}, r) "
                f"and down (r, in={linear.in_features})"
            )
    return [(name, linear, up, down) for (name, linear), (_, up, down) in zip(targets, pairs)]


def merge_adaln_lora(transformer: torch.nn.Module, path: str | Path, scale: float = 1.0) -> int:
    """Merge CoZ's AdaLayerNormZero LoRA from ``path`` into ``transformer`` (in place).

    Every count and shape is checked before any weight changes. Returns the number of layers.
    """
    layers = _checked_lora(transformer, path)
    with torch.no_grad():
        for _, linear, up, down in layers:
            w = linear.weight
            delta = up.to(w.device, torch.float32) @ down.to(w.device, torch.float32)
            w.copy_((w.float() + scale * delta).to(w.dtype))
    return len(layers)


class ReferenceLoraLinear(torch.nn.Module):
    """Upstream's ``LoraInjectedLinear`` at inference (dropout 0, scale 1): the base linear and the
    LoRA in float32, their sum rounded to float16: ``(linear(x) + up(down(x))).half()``."""

    def __init__(self, linear: torch.nn.Linear, up: torch.Tensor, down: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(linear.weight.detach().float(), requires_grad=False)
        self.bias = (None if linear.bias is None
                     else torch.nn.Parameter(linear.bias.detach().float(), requires_grad=False))
        self.lora_up = torch.nn.Parameter(up.detach().float(), requires_grad=False)
        self.lora_down = torch.nn.Parameter(down.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        base = torch.nn.functional.linear(x, self.weight, self.bias)
        lora = torch.nn.functional.linear(torch.nn.functional.linear(x, self.lora_down), self.lora_up)
        return (base + lora).half()


def attach_reference_lora(transformer: torch.nn.Module, path: str | Path) -> int:
    """Put CoZ's LoRA on ``transformer`` unmerged, exactly as the reference computes it (in place).

    The transformer must run in float32 (as in the reference): the float16 modulations then mix
    into float32 activations the way upstream's do. Returns the number of layers.
    """
    dtypes = {p.dtype for p in transformer.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"the reference CoZ LoRA needs a float32 transformer (as upstream), this one holds {dtypes}")
    layers = _checked_lora(transformer, path)
    for name, linear, up, down in layers:
        parent, leaf = name.rsplit(".", 1)
        setattr(transformer.get_submodule(parent), leaf, ReferenceLoraLinear(linear, up, down))
    return len(layers)


# --- Wan2GP's repackaged files ----------------------------------------------------------------------

WAN2GP_TRANSFORMER = "CoZ_sd3_medium_srlora_bf16.safetensors"
WAN2GP_VAE = "CoZ_sd3_vae_srlora_bf16.safetensors"


def coz_file_kind(path: str | Path) -> str:
    """Which CoZ weight layout ``path`` holds: ``lora`` (upstream's list or its conversion),
    ``vae_encoder`` (upstream's PEFT encoder), ``wan2gp_transformer`` or ``wan2gp_vae``
    (Wan2GP's merged files). Pickles are taken by their suffix (.pkl: lora, .pt/.pth: encoder)."""
    if not is_safetensors(path):
        return "lora" if Path(path).suffix == ".pkl" else "vae_encoder"
    keys = safetensors_keys(path)
    if any(k.endswith(".lora_up.weight") for k in keys):
        return "lora"
    if any(".lora_A." in k for k in keys):
        return "vae_encoder"
    if _ends(keys, "context_embedder.weight") and any("transformer_blocks." in k for k in keys):
        return "wan2gp_transformer"
    if _ends(keys, "decoder.conv_in.weight") and _ends(keys, "encoder.conv_in.weight"):
        return "wan2gp_vae"
    raise CheckpointError(
        f"{path}: not a CoZ weight file: expected CoZ's SR LoRA (model_20001.pkl or its .safetensors), its VAE "
        f"encoder (vae_encoder_20001.pt or its .safetensors), or Wan2GP's {WAN2GP_TRANSFORMER} / {WAN2GP_VAE}"
    )


def _ends(keys, name: str) -> list[str]:
    """Keys that are ``name`` or end in ``.name`` (so "decoder.x" is not taken for "encoder.x")."""
    return [k for k in keys if k == name or k.endswith("." + name)]


def sd3_pos_embed(config: dict) -> torch.Tensor:
    """SD3's fixed 2-D sin-cos positional table [1, max*max, dim], float32, as Wan2GP regenerates it
    for its files (Stability's convention: grid coordinates ``arange(max) / 4 - base / 4``)."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    grid_size, base = config["pos_embed_max_size"], config["sample_size"] // config["patch_size"]
    coords = np.arange(grid_size, dtype=np.float64) / 4.0 - base / 4.0
    first, second = np.meshgrid(coords, coords)  # first varies along columns (x), second along rows (y)
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def sincos(pos: np.ndarray) -> np.ndarray:
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([sincos(first), sincos(second)], axis=1)
    return torch.from_numpy(table).float().unsqueeze(0)


def _wan2gp_state(path: str | Path, anchor: str, what: str) -> dict[str, torch.Tensor]:
    """The file's tensors with any key prefix removed (Wan2GP's loader, mmgp, strips one the same
    way: found from the first missing key); quanto-quantized files are refused."""
    keys = safetensors_keys(path)
    if any(k.endswith(("._data", "._scale")) for k in keys):
        raise CheckpointError(f"{path}: a quanto-quantized Wan2GP file; use the bf16 {what}")
    prefix = _ends(keys, anchor)[0][: -len(anchor)]
    return {k[len(prefix):]: v for k, v in read_safetensors(path, lambda k: k.startswith(prefix)).items()}


def wan2gp_transformer_state(path: str | Path, config: dict) -> dict[str, torch.Tensor]:
    """Wan2GP's merged CoZ transformer in diffusers keys (positional table regenerated when absent)."""
    if coz_file_kind(path) != "wan2gp_transformer":
        raise CheckpointError(f"{path}: not Wan2GP's CoZ transformer ({WAN2GP_TRANSFORMER}: diffusers SD3 keys)")
    state = _wan2gp_state(path, "context_embedder.weight", WAN2GP_TRANSFORMER)
    state.setdefault("pos_embed.pos_embed", sd3_pos_embed(config))
    return state


def wan2gp_vae_state(path: str | Path, config: dict) -> dict[str, torch.Tensor]:
    """Wan2GP's CoZ VAE (CoZ's encoder merged, SD3's decoder) in diffusers AutoencoderKL keys."""
    if coz_file_kind(path) != "wan2gp_vae":
        raise CheckpointError(f"{path}: not Wan2GP's CoZ VAE ({WAN2GP_VAE}: diffusers AutoencoderKL keys)")
    return _wan2gp_state(path, "encoder.conv_in.weight", WAN2GP_VAE)


def _lora_delta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B @ A for Linear (2-D) and Conv2d (A: [r, in, kh, kw], B: [out, r, 1, 1]) PEFT layers."""
    if a.ndim == 2:
        return b.float() @ a.float()
    return torch.einsum("or,rikl->oikl", b.float()[:, :, 0, 0], a.float())


def merge_peft_state_dict(
    state: dict[str, torch.Tensor], adapter: str = PEFT_ADAPTER, lora_alpha: float = PEFT_LORA_ALPHA,
    source: str | Path = "state dict",
) -> dict[str, torch.Tensor]:
    """Plain module state dict (float32) from a PEFT-injected one: ``W = W_base + alpha / r * B @ A``."""
    out: dict[str, torch.Tensor] = {}
    lora: dict[str, dict[str, torch.Tensor]] = {}
    a_tag, b_tag = f".lora_A.{adapter}.weight", f".lora_B.{adapter}.weight"
    for key, value in state.items():
        if key.endswith(a_tag) or key.endswith(b_tag):
            module, which = key[: -len(a_tag)], "A" if key.endswith(a_tag) else "B"
            lora.setdefault(module, {})[which] = value
        elif ".lora_" in key:
            raise CheckpointError(f"{source}: unexpected LoRA key {key} (expected adapter '{adapter}')")
        else:
            out[key.replace(".base_layer.", ".")] = value.float()
    for module, ab in lora.items():
        weight_key = f"{module}.weight"
        if set(ab) != {"A", "B"} or weight_key not in out:
            raise CheckpointError(f"{source}: LoRA of {module} is incomplete (needs base weight, lora_A and lora_B)")
        delta = _lora_delta(ab["A"], ab["B"])
        if delta.shape != out[weight_key].shape:
            raise CheckpointError(
                f"{source}: LoRA of {module} gives shape {tuple(delta.shape)}, "
                f"base weight is {tuple(out[weight_key].shape)}"
            )
        out[weight_key] = out[weight_key] + (lora_alpha / ab["A"].shape[0]) * delta
    return out


def load_vae_encoder_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """CoZ's VAE encoder (.pt PEFT state dict or its .safetensors conversion), merged, float32."""
    state = expect_tensor_dict(load_weights(path), path)
    if not any(".lora_A." in k for k in state):
        raise CheckpointError(
            f"{path}: no LoRA keys ('...lora_A.{PEFT_ADAPTER}.weight'); this is not CoZ's SR_VAE encoder file"
        )
    return merge_peft_state_dict(state, source=path)


def apply_vae_encoder(vae: torch.nn.Module, path: str | Path) -> None:
    """Replace ``vae.encoder``'s weights with CoZ's merged encoder from ``path``."""
    merged = load_vae_encoder_weights(path)
    own = vae.encoder.state_dict()
    problem = describe_mismatch({k: tuple(v.shape) for k, v in own.items()},
                                {k: tuple(v.shape) for k, v in merged.items()})
    if problem:
        raise CheckpointError(f"{path}: the VAE encoder weights do not fit this VAE ({problem})")
    with torch.no_grad():
        for key, param in own.items():
            param.copy_(merged[key].to(param.dtype))


def convert_coz_weights(
    lora_path: str | Path | None, vae_path: str | Path | None, out_dir: str | Path, num_layers: int | None = None
) -> list[Path]:
    """Write CoZ's pickles as safetensors: named LoRA pairs and the PEFT encoder dict, unchanged values.

    The LoRA list is named by the SD3 block structure (block i: norm1, then norm1_context except
    in the last block); ``num_layers`` defaults to what the list length implies.
    """
    out_dir, written = Path(out_dir), []
    if lora_path is not None:
        pairs = load_lora_pairs(lora_path)
        n = num_layers if num_layers is not None else (len(pairs) + 1) // 2
        names = [f"transformer_blocks.{i}.{norm}.linear" for i in range(n)
                 for norm in (("norm1", "norm1_context") if i < n - 1 else ("norm1",))]
        if len(names) != len(pairs):
            raise CheckpointError(f"{lora_path}: {len(pairs)} LoRA layers do not match {n} SD3 blocks "
                                  f"({len(names)} layers)")
        tensors = {}
        for name, (_, up, down) in zip(names, pairs):
            tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"] = up, down
        written.append(save_safetensors(tensors, out_dir / f"{Path(lora_path).stem}.safetensors",
                                        {"format": LORA_FORMAT}))
    if vae_path is not None:
        state = expect_tensor_dict(load_weights(vae_path), vae_path)
        written.append(save_safetensors(state, out_dir / f"{Path(vae_path).stem}.safetensors", {"format": VAE_FORMAT}))
    return written
