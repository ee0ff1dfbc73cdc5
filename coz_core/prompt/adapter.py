"""Merging a PEFT LoRA adapter folder (CoZ's GRPO prompt adapter) into a loaded Qwen2.5-VL.

Reference semantics: upstream loads ``ckpt/VLM_LoRA/checkpoint-10000`` with
``PeftModel.from_pretrained(model, path).merge_and_unload()``: every adapted linear becomes
``W + s * B @ A`` with ``s = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with ``use_rslora``).

Departure: the merge is done here from the safetensors file and adapter_config.json, not by
PEFT. PEFT finds a file's tensors by the module names of the running transformers, and
transformers 4.52 moved Qwen2.5-VL's modules (``model.layers.N`` -> ``model.language_model.layers.N``,
``visual.blocks.N`` -> ``model.visual.blocks.N``). On a newer transformers, PEFT matches none of
the released file's keys (saved with 4.49), only warns, and its regex ``target_modules`` also
wraps the vision tower's MLPs in new, zero LoRA layers: the merged model equals the base model.
Here the file is the authority: each lora_A/lora_B pair is mapped to one existing linear (in the
file's layout or through transformers' own ``_checkpoint_conversion_mapping`` between the two
layouts), every tensor must be used, nothing else is touched, and any setting of the config
that would change the merge and is not implemented (DoRA, bias, rank patterns ...) is refused.
Nothing is merged until every tensor has found its place. The delta is computed in float32 and
added to W in float32, rounded once to the model's dtype (PEFT rounds the delta to the weight's
dtype first, then adds: the two agree to that dtype's rounding).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])\.weight$")

# Qwen2.5-VL's module layouts: transformers < 4.52 (flat, e.g. CoZ's adapter, saved with 4.49)
# and >= 4.52 (nested). The patterns are transformers' _checkpoint_conversion_mapping.
FLAT_TO_NESTED = ((r"^visual", "model.visual"), (r"^model(?!\.(language_model|visual))", "model.language_model"))
NESTED_TO_FLAT = ((r"^model\.visual", "visual"), (r"^model\.language_model", "model"))
LAYOUTS = {"flat": "transformers < 4.52: model.layers.N, visual.blocks.N",
           "nested": "transformers >= 4.52: model.language_model.layers.N, model.visual.blocks.N"}
EXAMPLE_KEYS = {"flat": "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                "nested": "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"}

# adapter_config.json: settings the merge uses, and settings that only shape training, the
# initialisation or which modules were targeted (the file's tensors say which ones were).
USED = {"r", "lora_alpha", "use_rslora", "peft_type"}
IGNORED = {
    "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "target_modules", "exclude_modules", "layers_to_transform", "layers_pattern", "lora_dropout",
    "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_core",
    "qalora_group_size", "runtime_config", "ensure_weight_tying",
}
# every other setting must be unset (None, False, {}, [], "none"): e.g. use_dora, lora_bias,
# bias, fan_in_fan_out, rank_pattern, alpha_pattern, modules_to_save, layer_replication


@dataclass(frozen=True)
class AdapterMerge:
    """What :func:`merge_lora` merged."""

    path: Path
    modules: int  # linears changed
    tensors: int  # tensors of the file (all used)
    r: int
    lora_alpha: float
    scale: float  # lora_alpha / r (or / sqrt(r) with use_rslora)
    file_layout: str  # "flat", "nested" (see LAYOUTS) or "other" (e.g. lm_head only)
    model_layout: str

    def record(self) -> dict:
        return {"path": str(self.path), "modules": self.modules, "tensors": self.tensors, "r": self.r,
                "lora_alpha": self.lora_alpha, "scale": self.scale, "file_layout": self.file_layout,
                "model_layout": self.model_layout}


def check_adapter_folder(folder: Path) -> dict:
    """The folder's adapter_config.json, checked; raises before any model is loaded."""
    if not (folder / CONFIG).is_file():
        raise FileNotFoundError(
            f"{folder} is not a PEFT adapter folder: {CONFIG} is missing "
            "(save the adapter with peft's save_pretrained)"
        )
    if not (folder / WEIGHTS).is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        found = "adapter_model.bin (a pickle, not loaded for safety)" if pickled else "no weights"
        raise FileNotFoundError(
            f"{folder} has {found}; expected {WEIGHTS} (re-save it with "
            "peft's save_pretrained(..., safe_serialization=True))"
        )
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{folder / CONFIG} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{folder / CONFIG}: peft_type is {found!r}; only LoRA adapters (\"LORA\") can be merged")
    unsupported = {k: v for k, v in config.items()
                   if k not in USED | IGNORED and v not in (None, False, {}, [], "none")}
    if unsupported:
        raise ValueError(
            f"{folder / CONFIG} sets {unsupported}: settings that change how a LoRA merges and that this "
            "loader does not implement (it merges W + lora_alpha/r * B @ A, with use_rslora); "
            "merge the adapter with PEFT yourself and load the merged model folder instead"
        )
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or r <= 0 or not isinstance(alpha, (int, float)):
        raise ValueError(f"{folder / CONFIG}: expected a positive integer r and a number lora_alpha, "
                         f"got r={r!r}, lora_alpha={alpha!r}")
    return config


def _layout(names: set[str]) -> str:
    return "nested" if any(n.startswith("model.language_model.") for n in names) else "flat"


def _convert(module: str, rules: tuple[tuple[str, str], ...]) -> str | None:
    for pattern, replacement in rules:
        if re.search(pattern, module):
            return re.sub(pattern, replacement, module, count=1)
    return None


def _file_layout(module: str) -> str:
    if module.startswith(("model.language_model.", "model.visual.")):
        return "nested"
    return "flat" if module.startswith(("model.", "visual.")) else "other"


def _locate(module: str, linears: dict[str, torch.nn.Linear]) -> str | None:
    """The running name of a linear the file names in either layout, or None."""
    for name in (module, _convert(module, FLAT_TO_NESTED), _convert(module, NESTED_TO_FLAT)):
        if name in linears:
            return name
    return None


def merge_lora(model: torch.nn.Module, folder: str | Path) -> AdapterMerge:
    """Merge the LoRA adapter in ``folder`` into ``model`` (a Qwen2.5-VL) in place.

    Raises ValueError naming the adapter and its first unmatched keys when any tensor of the
    file finds no linear of ``model`` (or nothing matches), or a shape differs; the model is
    then left unchanged.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    config = check_adapter_folder(folder)
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    tensors = load_file(str(folder / WEIGHTS))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    model_layout = _layout(set(linears))

    pairs: dict[str, dict[str, str]] = {}  # running module name -> {"A": key, "B": key}
    layouts: set[str] = set()
    unmatched: list[str] = []
    for key in sorted(tensors):
        parsed = _KEY.match(key)
        name = _locate(parsed["module"], linears) if parsed else None
        if name is None or parsed["ab"] in pairs.get(name, {}):  # no place, or a second one for it
            unmatched.append(key)
            continue
        pairs.setdefault(name, {})[parsed["ab"]] = key
        layouts.add(_file_layout(parsed["module"]))
    for name, pair in list(pairs.items()):
        if len(pair) < 2:  # an A without its B (or the reverse) cannot be applied
            unmatched.extend(pair.values())
            del pairs[name]
    if unmatched or not pairs:
        what = (f"none of its {len(tensors)} tensors matches a linear layer" if not pairs else
                f"{len(unmatched)} of its {len(tensors)} tensors match no linear layer")
        raise ValueError(
            f"LoRA adapter {folder}: {what} of this Qwen2.5-VL "
            f"(layout of the running transformers: {LAYOUTS[model_layout]}); first unmatched keys: "
            f"{', '.join(sorted(unmatched)[:5]) or 'none (the file is empty)'}. Expected only lora_A/lora_B "
            f"weights of its linears, e.g. {EXAMPLE_KEYS['flat']} (as CoZ's adapter, transformers 4.49) or "
            f"{EXAMPLE_KEYS['nested']}; check that the adapter was made for this model"
        )

    for name, pair in pairs.items():
        a, b, weight = tensors[pair["A"]], tensors[pair["B"]], linears[name].weight
        if a.ndim != 2 or b.ndim != 2 or a.shape != (r, weight.shape[1]) or b.shape != (weight.shape[0], r):
            raise ValueError(
                f"LoRA adapter {folder}: {pair['A']} {tuple(a.shape)} and {pair['B']} {tuple(b.shape)} do not fit "
                f"{name} (weight {tuple(weight.shape)}) at r={r}; the adapter is for a different model size"
            )
    with torch.no_grad():
        for name, pair in pairs.items():
            weight = linears[name].weight
            delta = (tensors[pair["B"]].float() @ tensors[pair["A"]].float()) * scale
            weight.copy_((weight.float() + delta.to(weight.device)).to(weight.dtype))
    file_layout = "/".join(sorted(layouts - {"other"})) or "other"
    return AdapterMerge(folder, len(pairs), len(tensors), r, alpha, scale, file_layout, model_layout)
