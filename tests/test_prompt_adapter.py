"""CoZ's GRPO prompt adapter (ckpt/VLM_LoRA/checkpoint-10000) on a tiny Qwen2.5-VL.

The adapter files are written by hand in the layout the released one has (keys of transformers
4.49's module names, the released adapter_config.json verbatim), not with the installed peft,
and the merged weights are checked against W + lora_alpha / r * B @ A computed here.
"""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from tests.qwen_fixtures import RELEASED_CONFIG, released_layout, shared_tiny_qwen, write_adapter
from safetensors.torch import save_file

from coz_core.prompt.qwen import load_qwen_vl


def language_and_vision(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The text decoder and the vision tower in either transformers layout (4.49: model, visual;
    4.52 and later: model.language_model, model.visual)."""
    if hasattr(model.model, "language_model"):
        return model.model.language_model, model.model.visual
    return model.model, model.visual


def linear(language: torch.nn.Module, name: str) -> torch.nn.Linear:
    """The linear ``model.layers.N.<block>.<proj>`` (a 4.49 name) of ``language``."""
    _, _, index, block, proj = name.split(".")
    return getattr(getattr(language.layers[int(index)], block), proj)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return shared_tiny_qwen(tmp_path_factory)


@pytest.fixture(scope="module")
def base(folder):
    return load_qwen_vl(folder).model


@pytest.fixture(scope="module")
def layout(folder):
    config = json.loads((folder / "config.json").read_text())
    return released_layout(config.get("text_config", config))  # transformers 5 saves it nested


def test_released_layout_applies_every_tensor(folder, base, layout, tmp_path):
    pattern = json.loads(RELEASED_CONFIG)["target_modules"]
    assert all(re.fullmatch(pattern, name) for name in layout)  # what PEFT targeted under 4.49
    tensors = write_adapter(tmp_path / "checkpoint-10000", layout)
    vlm = load_qwen_vl(folder, adapter=tmp_path / "checkpoint-10000")
    merged = vlm.model

    base_lm, base_vision = language_and_vision(base)
    lm, vision = language_and_vision(merged)
    for name in layout:
        a = tensors[f"base_model.model.{name}.lora_A.weight"]
        b = tensors[f"base_model.model.{name}.lora_B.weight"]
        expected = linear(base_lm, name).weight + 32 / 8 * b @ a
        assert torch.allclose(linear(lm, name).weight, expected, rtol=0, atol=1e-6), name
        assert not torch.allclose(linear(lm, name).weight, linear(base_lm, name).weight, atol=1e-3)
    # nothing else changed: the vision tower, embeddings, norms, lm_head
    targeted = {id(linear(lm, name).weight) for name in layout}
    base_params = dict(base.named_parameters())
    untouched = [(n, p) for n, p in merged.named_parameters() if id(p) not in targeted]
    assert len(untouched) == len(base_params) - len(layout)
    assert all(torch.equal(p, base_params[n]) for n, p in untouched)
    assert all(torch.equal(p, q) for p, q in zip(vision.parameters(), base_vision.parameters()))
    assert all(type(m) is torch.nn.Linear for m in vision.modules() if isinstance(m, torch.nn.Linear))

    report = vlm.adapter_merge
    assert (report.modules, report.tensors, report.r, report.scale) == (len(layout), 2 * len(layout), 8, 4.0)
    assert report.file_layout == "flat"
    assert report.model_layout == ("nested" if hasattr(merged.model, "language_model") else "flat")


def test_rslora_and_bf16_models(folder, base, layout, tmp_path):
    config = json.loads(RELEASED_CONFIG)
    config["use_rslora"] = True
    tensors = write_adapter(tmp_path / "rs", layout, config=json.dumps(config), seed=1)
    half = load_qwen_vl(folder, adapter=tmp_path / "rs", dtype="bf16").model
    name = "model.layers.1.mlp.down_proj"
    a, b = tensors[f"base_model.model.{name}.lora_A.weight"], tensors[f"base_model.model.{name}.lora_B.weight"]
    expected = (linear(language_and_vision(base)[0], name).weight.bfloat16().float() + 32 / math.sqrt(8) * b @ a)
    got = linear(language_and_vision(half)[0], name).weight
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, expected.bfloat16())  # rounded once, after the float32 sum


def _unchanged(model, base) -> bool:
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters()))


def test_an_adapter_for_another_model_is_refused(folder, base, tmp_path):
    gpt2 = {f"transformer.h.{i}.attn.c_attn": (96, 32) for i in range(2)}
    write_adapter(tmp_path / "gpt2-lora", gpt2)
    with pytest.raises(ValueError, match=r"gpt2-lora: none of its 4 tensors matches a linear.*first unmatched keys: "
                       r"base_model\.model\.transformer\.h\.0\.attn\.c_attn\.lora_A\.weight.*"
                       r"Expected only lora_A/lora_B.*model\.layers\.0\.self_attn\.q_proj"):
        load_qwen_vl(folder, adapter=tmp_path / "gpt2-lora")


def test_a_partly_matching_adapter_is_refused_and_merges_nothing(folder, base, layout, tmp_path):
    from coz_core.prompt.adapter import merge_lora

    beyond = {"model.layers.7.self_attn.q_proj": (32, 32)}  # a layer the tiny model lacks
    extra = {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(32)}
    write_adapter(tmp_path / "partial", {**layout, **beyond}, extra=extra)
    model = load_qwen_vl(folder).model
    with pytest.raises(ValueError, match=r"partial: 3 of its 31 tensors match no linear.*"
                       r"model\.layers\.0\.self_attn\.q_proj\.lora_magnitude_vector, "
                       r"base_model\.model\.model\.layers\.7\.self_attn\.q_proj\.lora_A\.weight"):
        merge_lora(model, tmp_path / "partial")
    assert _unchanged(model, base)


def test_wrong_rank_and_lone_halves_are_refused(folder, layout, tmp_path):
    write_adapter(tmp_path / "r4", layout, r=4)  # the config says r=8
    with pytest.raises(ValueError, match=r"r4: .*lora_A\.weight \(4, \d+\).*do not fit.*at r=8"):
        load_qwen_vl(folder, adapter=tmp_path / "r4")
    tensors = write_adapter(tmp_path / "lone", layout)
    del tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]
    save_file(tensors, str(tmp_path / "lone" / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match=r"1 of its 27 tensors match no.*layers\.1\.mlp\.up_proj\.lora_A\.weight"):
        load_qwen_vl(folder, adapter=tmp_path / "lone")


@pytest.mark.parametrize("setting", [{"use_dora": True}, {"lora_bias": True}, {"bias": "all"},
                                     {"rank_pattern": {"q_proj": 4}}, {"modules_to_save": ["lm_head"]},
                                     {"some_future_switch": {"on": 1}}, {"peft_type": "LOHA"}])
def test_settings_that_change_the_merge_are_refused(folder, layout, tmp_path, setting):
    config = {**json.loads(RELEASED_CONFIG), **setting}
    write_adapter(tmp_path / "odd", layout, config=json.dumps(config))
    key = next(iter(setting))
    with pytest.raises(ValueError, match=f"{key}|LOHA"):
        load_qwen_vl(folder, adapter=tmp_path / "odd")


def test_both_layouts_name_the_same_linears(folder, base, layout, tmp_path):
    """A file in the other layout (4.52+ names) applies too, to the same weights."""
    nested = {name.replace("model.layers.", "model.language_model.layers."): shape for name, shape in layout.items()}
    write_adapter(tmp_path / "flat", layout, seed=3)
    write_adapter(tmp_path / "nested", nested, seed=3)
    a = load_qwen_vl(folder, adapter=tmp_path / "flat")
    b = load_qwen_vl(folder, adapter=tmp_path / "nested")
    assert b.adapter_merge.file_layout == "nested" and b.adapter_merge.modules == len(layout)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert not _unchanged(a.model, base)
