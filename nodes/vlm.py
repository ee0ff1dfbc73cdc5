"""Loader of the VLM that writes CoZ's prompts (Qwen2.5-VL + an optional LoRA adapter).

It comes back wrapped for the host's model management (host.Hosted): ComfyUI loads it onto the
GPU for each prompt and offloads it when the SR model needs the room.
"""
from __future__ import annotations

from ..coz_core.prompt.qwen import QwenPromptSource, load_qwen_vl
from . import host
from .common import CATEGORY, VLM

NONE = "none"


class LoadVLM:
    DESCRIPTION = ("Loads the vision-language model that writes CoZ's prompts: a Qwen2.5-VL folder in "
                   "models/LLM (e.g. Qwen2.5-VL-3B-Instruct), with an optional LoRA adapter (a fine-tuned "
                   "prompt extractor).")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = (VLM,)
    RETURN_NAMES = ("vlm",)
    OUTPUT_TOOLTIPS = ("The prompt extractor for CoZ VLM Prompt or CoZ Zoom Chain.",)

    @classmethod
    def INPUT_TYPES(cls):
        adapters = set(host.list_model_dirs("LLM", "adapter_config.json"))
        folders = [d for d in host.list_model_dirs("LLM") if d not in adapters]
        return {
            "required": {
                "model": (folders, {"tooltip": "A Qwen2.5-VL folder in models/LLM."}),
                "adapter": ([NONE] + sorted(adapters), {"tooltip":
                                                        "A PEFT LoRA adapter folder in models/LLM, merged into the model."}),
                "precision": (list(host.PRECISIONS), {"default": "auto", "tooltip":
                                                      "Weights; auto: bf16/fp16 on GPUs, fp32 on the CPU."}),
                "max_new_tokens": ("INT", {"default": 128, "min": 8, "max": 1024, "tooltip":
                                           "Longest answer (the reference: 128 tokens)."}),
            },
        }

    def load(self, model, adapter, precision, max_new_tokens):
        vl = load_qwen_vl(host.resolve("LLM", model), None if adapter == NONE else host.resolve("LLM", adapter),
                          dtype=host.pick_dtype(precision, host.torch_device()), device=host.offload_device())
        source = QwenPromptSource(vl, max_new_tokens=int(max_new_tokens))
        return (host.Hosted(source, {"Qwen2.5-VL": vl.model}),)


NODE_CLASS_MAPPINGS = {"CoZLoadVLM": LoadVLM}
NODE_DISPLAY_NAME_MAPPINGS = {"CoZLoadVLM": "CoZ Load VLM"}
