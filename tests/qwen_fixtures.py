"""A tiny Qwen2.5-VL saved as a real model folder, for the prompt-extractor tests.

The folder holds the files a Qwen2.5-VL-Instruct release holds (config.json,
generation_config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
chat_template.json, preprocessor_config.json), written by the real libraries: a byte-level BPE
tokenizer trained here with Qwen's special tokens, a Qwen2.5-VL built from a config with two
text and two vision layers, and Qwen's published chat template and preprocessing settings.
LoRA adapters are written by hand in the layout of CoZ's released GRPO adapter (transformers
4.49 module names, its adapter_config.json verbatim), not with the installed peft.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# Qwen2.5-VL-Instruct's chat template (chat_template.json of the release)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# preprocessor_config.json of Qwen2.5-VL-3B-Instruct
PREPROCESSOR = {
    "min_pixels": 3136, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
}

# Qwen's pre-tokenizer split (the Qwen2 tokenizer.json regex)
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_CORPUS = [
    "The second image is a zoom-in of the first image. Based on this knowledge, what is in the "
    "second image? Give me a set of words.",
    "What is in this image? Give me a set of words.",
    "system user assistant tree, leaves, sky, clouds, cat, fur, whiskers, dog, red flower, "
    "green grass, brick wall, mortar, stone, moss, wooden table, grain, texture, window, city",
]


def build_tokenizer(folder: Path) -> dict[str, int]:
    """Write tokenizer.json and tokenizer_config.json; return the special token ids."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.save(str(folder / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for t, i in ids.items()},
        "additional_special_tokens": SPECIAL_TOKENS[1:], "bos_token": None, "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "model_max_length": 131072, "pad_token": "<|endoftext|>", "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return ids


def tiny_config(ids: dict[str, int], vocab_size: int) -> dict:
    """A Qwen2.5-VL config.json in the release's (flat) layout, two layers of width 32."""
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 64,
        "initializer_range": 0.5,  # wide random weights: answers vary with the images
        "max_position_embeddings": 4096, "max_window_layers": 2, "num_attention_heads": 2,
        "num_hidden_layers": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-06,
        "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
        "rope_theta": 1000000.0, "sliding_window": 4096, "tie_word_embeddings": True,
        "torch_dtype": "float32", "use_cache": True, "use_sliding_window": False,
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"], "vocab_size": vocab_size,
        "vision_config": {
            "depth": 2, "hidden_act": "silu", "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
            "in_chans": 3, "model_type": "qwen2_5_vl", "out_hidden_size": 32, "patch_size": 14,
            "spatial_merge_size": 2, "spatial_patch_size": 14, "temporal_patch_size": 2,
            "window_size": 112, "fullatt_block_indexes": [1], "tokens_per_second": 2,
        },
    }


def make_tiny_qwen(folder: Path, seed: int = 0) -> Path:
    """Write a complete tiny Qwen2.5-VL-Instruct folder at ``folder`` and return it."""
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ids = build_tokenizer(folder)
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    (folder / "config.json").write_text(json.dumps(tiny_config(ids, max(ids.values()) + 1), indent=2))
    config = Qwen2_5_VLConfig.from_pretrained(folder)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    # generation_config.json of Qwen2.5-VL-3B-Instruct: sampling at temperature 1e-6 (greedy in
    # effect) with a repetition penalty
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"], do_sample=True,
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]], repetition_penalty=1.05, temperature=1e-06,
    )
    model.save_pretrained(folder)
    return folder


# --- CoZ's GRPO prompt adapter, written by hand in its released layout ---------------------

# ckpt/VLM_LoRA/checkpoint-10000/adapter_config.json as released (Chain-of-Zoom, upstream main)
RELEASED_CONFIG = """{
  "alpha_pattern": {},
  "auto_mapping": null,
  "base_model_name_or_path": "/mnt/data1/bryanswkim/cache/modelscope/models/Qwen/Qwen2___5-VL-3B-Instruct",
  "bias": "none",
  "corda_config": null,
  "eva_config": null,
  "exclude_modules": null,
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "layer_replication": null,
  "layers_pattern": null,
  "layers_to_transform": null,
  "loftq_config": {},
  "lora_alpha": 32,
  "lora_bias": false,
  "lora_dropout": 0.05,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": [],
  "peft_type": "LORA",
  "r": 8,
  "rank_pattern": {},
  "revision": null,
  "target_modules": "^(model).*\\\\.(q_proj|o_proj|gate_proj|down_proj|k_proj|up_proj|v_proj)$",
  "task_type": "CAUSAL_LM",
  "trainable_token_indices": null,
  "use_dora": false,
  "use_rslora": false
}"""

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def released_layout(text: dict) -> dict[str, tuple[int, int]]:
    """The linears CoZ's adapter targets, by transformers 4.49 module name, with their
    (out, in) shapes from the text config: every attention and MLP projection of the language model."""
    hidden, inter = text["hidden_size"], text["intermediate_size"]
    head = hidden // text["num_attention_heads"]
    kv = text["num_key_value_heads"] * head
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
              "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    layout = {}
    for i in range(text["num_hidden_layers"]):
        for proj in ATTENTION:
            layout[f"model.layers.{i}.self_attn.{proj}"] = shapes[proj]
        for proj in MLP:
            layout[f"model.layers.{i}.mlp.{proj}"] = shapes[proj]
    return layout


def write_adapter(folder, modules: dict[str, tuple[int, int]], r: int = 8, config: str = RELEASED_CONFIG,
                  seed: int = 0, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """A PEFT LoRA folder with random A and B for ``modules`` (name -> (out, in)); returns the tensors."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out, inp) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, inp, generator=g) * 0.1
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out, r, generator=g) * 0.1
    tensors.update(extra or {})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(config)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return tensors


def write_released_adapter(qwen: Path, folder: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """An adapter in the released layout for the model folder ``qwen`` (any config.json layout)."""
    config = json.loads((Path(qwen) / "config.json").read_text())
    return write_adapter(Path(folder), released_layout(config.get("text_config", config)), seed=seed)


_BUILT: dict[Path, Path] = {}


def shared_tiny_qwen(tmp_path_factory) -> Path:
    """One tiny Qwen2.5-VL folder per test session, for tests that only read it."""
    base = Path(tmp_path_factory.getbasetemp())
    if base not in _BUILT:
        _BUILT[base] = make_tiny_qwen(tmp_path_factory.mktemp("Qwen2.5-VL-tiny"))
    return _BUILT[base]


def reference_pixels(image: torch.Tensor, size: tuple[int, int]):
    """The CoZ reference's route for one [3, H, W] image: an 8-bit PNG, reopened as RGB and resized
    with Pillow's default filter (bicubic) to ``size`` = (h, w), as qwen-vl-utils' fetch_image does."""
    import io

    import numpy as np
    from PIL import Image

    values = image.clamp(0, 1).permute(1, 2, 0).numpy().astype(np.float64)
    buffer = io.BytesIO()
    Image.fromarray(np.floor(values * 255.0 + 0.5).astype(np.uint8)).save(buffer, format="PNG")
    buffer.seek(0)
    reopened = Image.open(buffer).convert("RGB")
    if reopened.size != (size[1], size[0]):
        reopened = reopened.resize((size[1], size[0]))
    return np.asarray(reopened)
