"""The fast path's own pieces against transformers' and the Qwen processor's: the sync-free prefill
(prefill.py), the projections fused (fused.py), the pixels patchified with torch (vision.patchify)."""
from __future__ import annotations

import copy
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from qwen_fixtures import make_tiny_qwen

from coz_core.prompt import fused, prefill
from coz_core.prompt.qwen import MULTISCALE_SYSTEM, load_qwen_vl
from coz_core.prompt.vision import patchify, prepare_images

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return load_qwen_vl(make_tiny_qwen(tmp_path_factory.mktemp("Qwen2.5-VL-tiny-prefill")))


def _inputs(vlm, seed: int, sizes=((224, 168), (56, 56))):
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(1, 3, h, w, generator=g) for h, w in sizes]  # several vision windows per image
    return vlm.inputs(sum((prepare_images(x) for x in images), []), MULTISCALE_SYSTEM)


@torch.inference_mode()
def test_prefill_gives_the_models_own_logits_bit_for_bit(vlm):
    model = vlm.model
    inputs = _inputs(vlm, 0)
    positions = prefill.prompt_positions(model, inputs)
    expected = model(**inputs, position_ids=positions).logits
    prompt = prefill.prepare(model, inputs, torch.device("cpu"), model.dtype)
    assert prompt.vision["cu_window_seqlens"].numel() > 3  # windows, not one span per image
    assert torch.equal(prefill.run(model, prompt).logits, expected)


def test_prefill_refuses_a_prompt_whose_image_tokens_do_not_match_its_images(vlm):
    inputs = dict(_inputs(vlm, 1))
    image = vlm.model.config.image_token_id
    ids = inputs["input_ids"].clone()
    ids[0, (ids[0] == image).nonzero()[0, 0]] = vlm.tokenizer.convert_tokens_to_ids("a")
    inputs["input_ids"] = ids
    with pytest.raises(ValueError, match="image tokens"):
        prefill.prepare(vlm.model, inputs, torch.device("cpu"), vlm.model.dtype)
    padded = dict(_inputs(vlm, 1), attention_mask=torch.zeros_like(ids))
    with pytest.raises(ValueError, match="unpadded"):
        prefill.prepare(vlm.model, padded, torch.device("cpu"), vlm.model.dtype)


@torch.inference_mode()
def test_fused_projections_compute_the_same_model(vlm):
    model = copy.deepcopy(vlm.model)
    count = sum(p.numel() for p in model.parameters())
    assert fused.fuse_projections(model) and fused.fuse_projections(model)  # a second call does nothing
    layer = model.model.language_model.layers[0]
    assert not hasattr(layer.self_attn, "q_proj") and not hasattr(layer.mlp, "up_proj")
    assert sum(p.numel() for p in model.parameters()) == count  # replaced, not duplicated
    inputs = _inputs(vlm, 2)
    positions = prefill.prompt_positions(vlm.model, inputs)
    ours = model(**inputs, position_ids=positions).logits
    theirs = vlm.model(**inputs, position_ids=positions).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert not torch.equal(ours, torch.zeros_like(ours))
    same = vlm.model.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=16, do_sample=False), same)
    # the fast path's compiled step (fullgraph, "eager" backend) traces the fused forwards
    fast = replace(vlm, model=model, fast_decode=True, compile_backend="eager", _compile_config=None,
                   _cache=None, _step=None)
    assert torch.equal(fast.generate_ids(inputs, 16), same[0, inputs["input_ids"].shape[1]:])


def test_fusion_leaves_an_unknown_attention_alone(vlm, monkeypatch):
    model = copy.deepcopy(vlm.model)
    monkeypatch.setattr(fused, "_known_attention", lambda attention: False)
    assert not fused.fuse_projections(model)
    assert hasattr(model.model.language_model.layers[0].self_attn, "q_proj")


@pytest.mark.parametrize("sizes", [((224, 168), (56, 56)), ((84, 308),)])
def test_patchify_gives_the_processors_pixels(vlm, sizes):
    g = torch.Generator().manual_seed(3)
    images = sum((prepare_images(torch.rand(1, 3, h, w, generator=g)) for h, w in sizes), [])
    ours = patchify(images, vlm.image_processor, torch.device("cpu"))
    theirs = vlm.image_processor(images, return_tensors="pt")
    assert torch.equal(ours["image_grid_thw"], theirs["image_grid_thw"])
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=2e-6)


def test_patchify_leaves_resizing_to_the_processor(vlm):
    image = np.zeros((100, 130, 3), dtype=np.uint8)  # not a multiple of 28: the processor resizes it
    assert patchify([image], vlm.image_processor, torch.device("cpu")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU half of the fast path")
@torch.inference_mode()
def test_gpu_prefill_and_patchify_match_the_cpu(vlm):
    model = copy.deepcopy(vlm.model).to("cuda")
    inputs = _inputs(vlm, 4)
    positions = prefill.prompt_positions(model, inputs)
    expected = vlm.model(**inputs, position_ids=positions).logits
    prompt = prefill.prepare(model, inputs, torch.device("cuda"), model.dtype)
    torch.testing.assert_close(prefill.run(model, prompt).logits.cpu(), expected, rtol=1e-4, atol=1e-4)
    images = prepare_images(torch.rand(1, 3, 224, 168))
    gpu = patchify(images, vlm.image_processor, torch.device("cuda"))
    torch.testing.assert_close(gpu["pixel_values"].cpu(), vlm.image_processor(images, return_tensors="pt")["pixel_values"],
                               rtol=0, atol=2e-6)
