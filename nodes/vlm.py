"""Loader of the VLM that writes CoZ's prompts (Qwen2.5-VL + an optional LoRA adapter).

Upstream's prompt types: ``vlm`` (Qwen2.5-VL + CoZ's GRPO adapter ckpt/VLM_LoRA/checkpoint-10000,
the paper's prompts) when an adapter is chosen, ``vlm_base`` (plain Qwen2.5-VL) with ``none``; the
``info`` output says which ran, what the adapter merge changed and the token limit.

It comes back wrapped for the host's model management (host.Hosted): ComfyUI loads it onto the
GPU for each prompt and offloads it when the SR model needs the room.
"""
from __future__ import annotations

from ..coz_core import factory, policy
from ..coz_core.prompt.base import describe_prompts
from . import host
from .common import LOADERS, PRECISION_TOOLTIP, VLM

NONE = "none"


class LoadVLM:
    DESCRIPTION = ("Loads the vision-language model that writes CoZ's prompts: a Qwen2.5-VL folder in "
                   "models/LLM (e.g. Qwen2.5-VL-3B-Instruct), with CoZ's GRPO prompt adapter (prompt type vlm, "
                   "as in the paper) or without (vlm_base).")
    CATEGORY = LOADERS
    FUNCTION = "load"
    RETURN_TYPES = (VLM, "STRING")
    RETURN_NAMES = ("vlm", "info")
    OUTPUT_TOOLTIPS = ("The prompt extractor for CoZ VLM Prompt or CoZ Zoom Chain.",
                       "What was loaded: prompt type (vlm = with adapter, vlm_base = without), model, adapter "
                       "(how many linears its merge changed) and token limit.")

    @classmethod
    def INPUT_TYPES(cls):
        adapters = set(host.list_model_dirs("LLM", "adapter_config.json"))
        folders = [d for d in host.list_model_dirs("LLM") if d not in adapters]
        return {
            "required": {
                "model": (folders, {"tooltip": "A Qwen2.5-VL folder in models/LLM."}),
                "adapter": ([NONE] + sorted(adapters), {"tooltip":
                                                        "CoZ's GRPO prompt adapter (copy "
                                                        "ckpt/VLM_LoRA/checkpoint-10000 into models/LLM): "
                                                        "prompt type vlm, as in the paper; or another PEFT "
                                                        "LoRA folder there. Merged in completely (for either "
                                                        "transformers layout) or refused. none: plain Qwen "
                                                        "(vlm_base)."}),
                "precision": (list(policy.PRECISIONS), {"default": "auto", "tooltip": PRECISION_TOOLTIP}),
                "max_new_tokens": ("INT", {"default": policy.VLM_TOKENS, "min": 8, "max": 1024, "tooltip":
                                           "Longest answer in tokens (CoZ's current code: 32; its first "
                                           "release: 128). Longer answers cost time on every step."}),
            },
        }

    def load(self, model, adapter, precision, max_new_tokens):
        source = factory.prompt_source(
            "vlm_base" if adapter == NONE else "vlm", host.torch_device(), precision,
            vlm=host.resolve("LLM", model), adapter=None if adapter == NONE else host.resolve("LLM", adapter),
            max_new_tokens=int(max_new_tokens), load_device=host.offload_device())
        hosted = host.Hosted(source, {"Qwen2.5-VL": source.vlm.model}, on_offload=source.vlm.release)
        return hosted, describe_prompts(source.info)


NODE_CLASS_MAPPINGS = {"CoZLoadVLM": LoadVLM}
NODE_DISPLAY_NAME_MAPPINGS = {"CoZLoadVLM": "CoZ Load VLM"}
