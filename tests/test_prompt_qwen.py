"""The Qwen2.5-VL prompt extractor on a tiny Qwen2.5-VL saved as a real model folder."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from qwen_fixtures import CHAT_TEMPLATE, PREPROCESSOR, make_tiny_qwen, reference_pixels, tiny_config

from coz_core.prompt.base import PromptRequest, PromptSource, compose_prompt
from coz_core.prompt.qwen import (
    MULTISCALE_SYSTEM, SINGLE_SYSTEM, QwenPromptSource, load_qwen_vl,
)
from coz_core.sr.base import SRRequest
from coz_core.zoom import ChainConfig, run_chain

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_qwen(tmp_path_factory.mktemp("Qwen2.5-VL-tiny"))


@pytest.fixture(scope="module")
def vlm(folder):
    return load_qwen_vl(folder)


def _images(batch: int, size: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _independent_inputs(tokenizer, system: str, arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """What the reference's processor produces, built by hand: the chat text with every image
    expanded to (h/28)*(w/28) pad tokens, CLIP-normalised pixels cut into 14x14 patches (two
    identical frames each) in 2x2 merge order, and the grid per image."""
    text = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
    for a in arrays:
        text += "<|vision_start|>" + "<|image_pad|>" * ((a.shape[0] // 28) * (a.shape[1] // 28)) + "<|vision_end|>"
    text += "<|im_end|>\n<|im_start|>assistant\n"
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    mean = np.array(PREPROCESSOR["image_mean"]).reshape(3, 1, 1)
    std = np.array(PREPROCESSOR["image_std"]).reshape(3, 1, 1)
    patches, grids = [], []
    for a in arrays:
        x = (a.transpose(2, 0, 1) / 255.0 - mean) / std
        gh, gw = a.shape[0] // 14, a.shape[1] // 14
        x = np.stack([x, x])  # temporal patch of 2 frames
        x = x.reshape(2, 3, gh // 2, 2, 14, gw // 2, 2, 14).transpose(2, 5, 3, 6, 1, 0, 4, 7)
        patches.append(x.reshape(gh * gw, 3 * 2 * 14 * 14))
        grids.append([1, gh, gw])
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "pixel_values": torch.from_numpy(np.concatenate(patches)).float(),
            "image_grid_thw": torch.tensor(grids), "mm_token_type_ids": (ids == image_id).int()}


def test_load_reads_the_folder(folder, vlm):
    assert vlm.folder == folder and vlm.adapter is None
    assert (vlm.min_pixels, vlm.max_pixels) == (3136, 12845056)
    assert vlm.repetition_penalty == pytest.approx(1.05)
    assert vlm.chat_template == CHAT_TEMPLATE
    assert vlm.dtype == torch.float32 and vlm.device.type == "cpu"
    assert not any(p.requires_grad for p in vlm.model.parameters())
    half = load_qwen_vl(folder, dtype="bf16", attn_implementation="eager")
    assert half.dtype == torch.bfloat16
    assert half.model.config._attn_implementation == "eager"
    assert isinstance(QwenPromptSource(vlm), PromptSource)


def test_release_layout_config_loads_the_same_model(folder, vlm, tmp_path):
    """Qwen's releases keep the text settings at the top of config.json (transformers 4.49 layout);
    transformers 5 saves them under text_config. Both describe the same model."""
    flat = _broken(folder, tmp_path)
    ids = {t: vlm.tokenizer.convert_tokens_to_ids(t) for t in
           ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
            "<|vision_end|>", "<|vision_pad|>")}
    (flat / "config.json").write_text(json.dumps(tiny_config(ids, vlm.model.config.text_config.vocab_size)))
    release = load_qwen_vl(flat)
    inputs = vlm.inputs([reference_pixels(_images(1, 56, 10)[0], (56, 56))], SINGLE_SYSTEM)
    with torch.inference_mode():
        assert torch.equal(release.model(**inputs).logits, vlm.model(**inputs).logits)


@pytest.mark.parametrize("multiscale", [True, False])
def test_inputs_and_answer_match_an_independent_construction(vlm, multiscale):
    previous, zoomed = _images(1, 512, 0), _images(1, 512, 1)
    source = QwenPromptSource(vlm, max_new_tokens=8, clean=False)
    prompts = source(PromptRequest(previous, zoomed, step=1, multiscale=multiscale))

    shown = [previous[0], zoomed[0]] if multiscale else [zoomed[0]]
    arrays = [reference_pixels(image, (504, 504)) for image in shown]  # 512 -> 504 (18 x 28)
    system = MULTISCALE_SYSTEM if multiscale else SINGLE_SYSTEM
    expected = _independent_inputs(vlm.tokenizer, system, arrays)
    ours = vlm.inputs(arrays, system)
    assert torch.equal(ours["input_ids"], expected["input_ids"])
    assert int((ours["input_ids"] == vlm.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum()) == 324 * len(arrays)
    assert torch.equal(ours["image_grid_thw"], expected["image_grid_thw"])
    assert torch.allclose(ours["pixel_values"], expected["pixel_values"], atol=1e-5)
    assert torch.equal(ours["mm_token_type_ids"].int(), expected["mm_token_type_ids"])

    # the answer is what the model generates from the independent inputs (greedy, the folder's
    # repetition penalty: the reference's sampling at temperature 1e-6)
    with torch.inference_mode():
        out = vlm.model.generate(**expected, max_new_tokens=8, do_sample=False, repetition_penalty=1.05)
    new = out[0, expected["input_ids"].shape[1]:]
    answer = vlm.tokenizer.decode(new, skip_special_tokens=True)
    assert prompts == [answer.strip()]
    assert source.records[0].raw == answer and source.records[0].new_tokens == new.numel()


def test_remembered_token_ids_follow_the_text_and_the_image_sizes(vlm):
    """The ids are tokenized once per (system, image sizes) and remembered: every later call,
    in any order, still equals the independent construction, and changing what one call
    returned changes nothing after it."""
    cases = [(SINGLE_SYSTEM, [(56, 56)]), (MULTISCALE_SYSTEM, [(56, 56), (56, 56)]),
             (MULTISCALE_SYSTEM, [(56, 84), (56, 84)]), (SINGLE_SYSTEM, [(84, 56)])]
    vlm._ids.clear()
    for _ in range(2):
        for system, sizes in cases:
            arrays = [reference_pixels(_images(1, 56, i)[0], size) for i, size in enumerate(sizes)]
            ours = vlm.inputs(arrays, system)
            expected = _independent_inputs(vlm.tokenizer, system, arrays)
            assert torch.equal(ours["input_ids"], expected["input_ids"])
            assert torch.equal(ours["attention_mask"], expected["attention_mask"])
            ours["input_ids"].fill_(0)
    assert len(vlm._ids) == len(cases)


def test_a_model_that_overflows_to_nan_is_refused_not_read(vlm):
    # float16 overflows Qwen2.5-VL's activations on some inputs; NaN logits then decode to token 0 ("!")
    # at every step, which must not reach SD3 as a prompt
    import copy
    from dataclasses import replace

    broken = replace(vlm, model=copy.deepcopy(vlm.model))
    with torch.no_grad():
        broken.model.model.language_model.norm.weight.fill_(float("nan"))
    inputs = broken.inputs([reference_pixels(_images(1, 56, 0)[0], (56, 56))], SINGLE_SYSTEM)
    fast = replace(broken, fast_decode=True, compile_backend=None, _compile_config=None, _cache=None, _step=None)
    for generate in (lambda: broken.generate_ids(inputs, 8), lambda: fast.generate_ids(inputs, 8),
                     lambda: broken.generate_batch([inputs, inputs], 8)):
        with pytest.raises(RuntimeError, match="only token 0.*overflowed to NaN. Load it in bf16"):
            generate()
    assert vlm.generate_ids(inputs, 8).any()  # the model as loaded answers


def test_greedy_is_deterministic_and_sampling_follows_the_seed(vlm):
    request = PromptRequest(_images(2, 56, 2), _images(2, 56, 3), step=2)
    greedy = QwenPromptSource(vlm, max_new_tokens=12, clean=False)
    first, second = greedy(request), greedy(request)
    assert first == second and len(first) == 2
    assert first[0] != first[1]  # one prompt per batch element, from its own images
    raws = lambda source: [r.raw for r in source.records]  # noqa: E731
    a = QwenPromptSource(vlm, max_new_tokens=12, sample=True, seed=7, temperature=1.0)
    b = QwenPromptSource(vlm, max_new_tokens=12, sample=True, seed=7, temperature=1.0)
    c = QwenPromptSource(vlm, max_new_tokens=12, sample=True, seed=8, temperature=1.0)
    a(request), b(request), c(request)
    assert raws(a) == raws(b) and raws(a) != raws(c) and raws(a) != raws(greedy)[:2]
    state = torch.get_rng_state()
    a(request)
    assert torch.equal(torch.get_rng_state(), state)  # sampling leaves the global RNG alone


def test_peft_adapter_loads_and_changes_the_output(folder, vlm, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = load_qwen_vl(folder).model
    tuned = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    tuned.save_pretrained(tmp_path / "grpo-lora")
    assert (tmp_path / "grpo-lora" / "adapter_model.safetensors").is_file()

    adapted = load_qwen_vl(folder, adapter=tmp_path / "grpo-lora")
    assert adapted.adapter == tmp_path / "grpo-lora"
    inputs = vlm.inputs(
        [reference_pixels(i, (56, 56)) for i in (_images(1, 56, 4)[0], _images(1, 56, 5)[0])], MULTISCALE_SYSTEM)
    with torch.inference_mode():
        plain = vlm.model(**inputs).logits
        merged = adapted.model(**inputs).logits
        reference = tuned(**inputs).logits
    assert torch.allclose(merged, reference, atol=1e-4)
    assert not torch.allclose(merged, plain, atol=1e-2)
    request = PromptRequest(_images(1, 56, 4), _images(1, 56, 5), step=1)
    assert QwenPromptSource(adapted, 12, clean=False)(request) != QwenPromptSource(vlm, 12, clean=False)(request)


class TinyConvSR:
    """A small real SR backbone (a fixed 3x3 convolution over the zoomed input) that keeps the
    prompts it is given. Stands in for the default backbone, which lives on another branch."""

    name = "tiny-conv"
    size_multiple = 1
    uses_prompt = True

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.prompts: list[list[str] | None] = []

    @torch.no_grad()
    def __call__(self, request: SRRequest) -> torch.Tensor:
        self.prompts.append(request.prompts)
        return (request.zoomed + 0.1 * self.conv(request.zoomed)).clamp(0, 1)


@pytest.mark.parametrize("mode", ["recursive_multiscale", "recursive"])
def test_chain_runs_with_the_tiny_vlm_as_prompt_source(vlm, mode):
    user = "highly detailed"
    source = QwenPromptSource(vlm, max_new_tokens=10)  # the chain hands it the user prompt
    backbone = TinyConvSR()
    config = ChainConfig(mode=mode, steps=2, zoom=2.0, size=(56, 56), user_prompt=user)
    result = run_chain(_images(2, 80, 6), backbone, config, source)

    assert result.final.shape == (2, 3, 56, 56) and len(result.prompts) == 2
    assert [(r.step, r.index) for r in source.records] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for k, prompts in enumerate(result.prompts, start=1):
        records = [r for r in source.records if r.step == k]
        assert prompts == [compose_prompt(r.prompt, user) for r in records]
        assert all(p.endswith(user) or p.endswith(f"{user},") for p in prompts)  # never empty
    assert backbone.prompts == result.prompts
    assert all(s["prompt"] > 0 for s in (step.seconds for step in result.steps[1:]))
    assert json.dumps(result.record())  # the chain records every prompt


def test_chain_with_the_tiny_vlm_and_the_default_backbone(vlm, default_backbone):
    source = QwenPromptSource(vlm, max_new_tokens=6)
    config = ChainConfig(steps=2, zoom=2.0, size=(56, 56))
    result = run_chain(_images(1, 80, 7), default_backbone, config, source)
    assert result.final.shape == (1, 3, 56, 56) and not result.cancelled
    assert [(r.step, r.index) for r in source.records] == [(1, 0), (2, 0)]
    assert result.prompts == [[source.records[0].prompt], [source.records[1].prompt]]


# --- bad input -------------------------------------------------------------------------------

def _broken(folder, tmp_path, drop=(), config=None):
    target = tmp_path / "broken"
    shutil.copytree(folder, target)
    for name in drop:
        (target / name).unlink()
    if config is not None:
        (target / "config.json").write_text(json.dumps(config))
    return target


def test_folders_that_are_not_qwen25vl_are_refused(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_qwen_vl(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="model_type 'llama'.*qwen2_5_vl"):
        load_qwen_vl(_broken(folder, tmp_path, config={"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))


@pytest.mark.parametrize("drop, message", [
    (("config.json",), "config.json"),
    (("preprocessor_config.json",), "preprocessor_config.json"),
    (("tokenizer.json",), "tokenizer"),
    (("model.safetensors",), "safetensors weights"),
    (("chat_template.json",), None),  # the tokenizer_config's template still serves
])
def test_missing_files_are_named(folder, tmp_path, drop, message):
    broken = _broken(folder, tmp_path, drop)
    if message is None:
        assert load_qwen_vl(broken).chat_template == CHAT_TEMPLATE
    else:
        with pytest.raises(FileNotFoundError, match=message):
            load_qwen_vl(broken)


def test_missing_chat_template_and_bad_adapter(folder, tmp_path):
    broken = _broken(folder, tmp_path, ("chat_template.json",))
    config = json.loads((broken / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(FileNotFoundError, match="chat template"):
        load_qwen_vl(broken)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_qwen_vl(folder, adapter=adapter)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match="pickle.*adapter_model.safetensors"):
        load_qwen_vl(folder, adapter=adapter)
    with pytest.raises(ValueError, match="unknown dtype"):
        load_qwen_vl(folder, dtype="int3")


def test_odd_sizes_batches_and_mismatches(vlm):
    source = QwenPromptSource(vlm, max_new_tokens=4, clean=False)
    odd = source(PromptRequest(_images(3, 61, 8)[..., :37, :], _images(3, 61, 9)[..., :37, :], step=1))
    assert len(odd) == 3 and [r.index for r in source.records] == [0, 1, 2]
    grey = source(PromptRequest(torch.rand(1, 1, 40, 40), torch.rand(1, 4, 40, 40), step=1))
    assert len(grey) == 1
    with pytest.raises(ValueError, match="batch sizes"):
        source(PromptRequest(_images(2, 56, 0), _images(1, 56, 0), step=1))
    with pytest.raises(ValueError, match="aspect ratio"):
        source(PromptRequest(torch.rand(1, 3, 2, 600), torch.rand(1, 3, 2, 600), step=1))
