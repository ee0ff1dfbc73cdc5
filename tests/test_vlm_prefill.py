"""The fast path's own pieces against transformers' and the Qwen processor's: the sync-free prefill
(prefill.py), the projections fused (fused.py), the pixels patchified with torch (vision.patchify)."""
from __future__ import annotations

import copy
import os
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from qwen_fixtures import make_tiny_qwen
from transformers import StaticCache

from coz_core import cuda_graph
from coz_core.prompt import attention, fused, greedy, prefill
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


def _both_ways(model, inputs, device: torch.device):
    """(model(**inputs), prefill.run) logits, each into a static cache, and the two caches."""
    positions = prefill.prompt_positions(model, inputs)
    caches = [StaticCache(config=model.config, max_cache_len=256) for _ in range(2)]
    batch = {k: v.to(device) for k, v in inputs.items()}
    theirs = model(**batch, position_ids=positions.to(device), cache=caches[0]).logits
    prompt = prefill.prepare(model, inputs, device, model.dtype)
    assert prompt.vision["cu_window_seqlens"].numel() > 3  # windows, not one span per image
    ours = prefill.run(model, prompt, cache=caches[1]).logits
    assert "get_query_offset" not in vars(caches[1])  # the cache left as it was
    return theirs, ours, caches


@torch.inference_mode()
def test_prefill_gives_the_models_own_logits_bit_for_bit(vlm):
    theirs, ours, caches = _both_ways(vlm.model, _inputs(vlm, 0), torch.device("cpu"))
    assert torch.equal(ours, theirs)
    assert all(torch.equal(a.keys, b.keys) for a, b in zip(caches[0].layers, caches[1].layers))


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
    assert not hasattr(model.model.visual.blocks[0].mlp, "up_proj")
    assert sum(p.numel() for p in model.parameters()) == count  # replaced, not duplicated
    inputs = _inputs(vlm, 2)
    positions = prefill.prompt_positions(vlm.model, inputs)
    ours = model(**inputs, position_ids=positions).logits
    theirs = vlm.model(**inputs, position_ids=positions).logits
    # float32 rounding: the patch embedding as a matrix product sums its 1,176 terms in another order
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)
    assert not torch.equal(ours, torch.zeros_like(ours))
    same = vlm.model.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=16, do_sample=False), same)
    # the fast path's compiled step (fullgraph, "eager" backend) traces the fused forwards
    fast = replace(vlm, model=model, fast_decode=True, compile_backend="eager", _compile_config=None,
                   _cache=None, _step=None)
    assert torch.equal(fast.generate_ids(inputs, 16), same[0, inputs["input_ids"].shape[1]:])


def test_a_model_fused_under_inference_mode_still_runs_after_a_move(vlm):
    model = copy.deepcopy(vlm.model)
    with torch.inference_mode():  # as the fast path fuses it
        assert fused.fuse_projections(model)
    model.to(torch.float64).to(torch.float32)  # a move re-creates every parameter, as .to("cpu") does on a GPU
    inputs = _inputs(vlm, 2)
    positions = prefill.prompt_positions(vlm.model, inputs)
    with torch.inference_mode():
        ours = model(**inputs, position_ids=positions).logits
        theirs = vlm.model(**inputs, position_ids=positions).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)


def test_fusion_leaves_an_unknown_attention_alone(vlm, monkeypatch):
    model = copy.deepcopy(vlm.model)
    monkeypatch.setattr(fused, "_known_attention", lambda attention: False)
    assert not fused.fuse_projections(model)
    assert hasattr(model.model.language_model.layers[0].self_attn, "q_proj")


@pytest.mark.parametrize("as_tensors", [False, True])
@pytest.mark.parametrize("sizes", [((224, 168), (56, 56)), ((84, 308),)])
def test_patchify_gives_the_processors_pixels(vlm, sizes, as_tensors):
    g = torch.Generator().manual_seed(3)
    images = sum((prepare_images(torch.rand(1, 3, h, w, generator=g)) for h, w in sizes), [])
    given = [torch.from_numpy(a) for a in images] if as_tensors else images  # prepare_batches' two kinds
    ours = patchify(given, vlm.image_processor, torch.device("cpu"))
    theirs = vlm.image_processor(images, return_tensors="pt")
    assert torch.equal(ours["image_grid_thw"], theirs["image_grid_thw"])
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"], rtol=0, atol=2e-6)


def test_inputs_from_tensors_equal_inputs_from_arrays(vlm):
    # tensors (a GPU's prepare_batches) reach the processor on the CPU as the arrays would
    images = sum((prepare_images(torch.rand(1, 3, 84, 112)) for _ in range(2)), [])
    arrays = vlm.inputs(images, MULTISCALE_SYSTEM)
    tensors = vlm.inputs([torch.from_numpy(a) for a in images], MULTISCALE_SYSTEM)
    assert arrays.keys() == tensors.keys()
    assert all(torch.equal(arrays[k], tensors[k]) for k in arrays)


def test_patchify_leaves_resizing_to_the_processor(vlm):
    image = np.zeros((100, 130, 3), dtype=np.uint8)  # not a multiple of 28: the processor resizes it
    assert patchify([image], vlm.image_processor, torch.device("cpu")) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU half of the fast path")
@torch.inference_mode()
def test_gpu_prefill_and_patchify_match_transformers_and_the_processor(vlm):
    model = copy.deepcopy(vlm.model).to("cuda")
    theirs, ours, _ = _both_ways(model, _inputs(vlm, 4), torch.device("cuda"))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    images = prepare_images(torch.rand(1, 3, 224, 168))
    gpu = patchify(images, vlm.image_processor, torch.device("cuda"))
    reference = vlm.image_processor(images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(gpu["pixel_values"].cpu(), reference, rtol=0, atol=2e-6)


def test_captured_prefill_is_captured_again_only_for_another_shape(vlm):
    # the CUDA graph's key (logic only on CPU): same-sized images share one capture, others do not
    graph = prefill.CapturedPrefill(vlm.model, StaticCache(config=vlm.model.config, max_cache_len=256))
    cpu = torch.device("cpu")
    first, second = (prefill.prepare(vlm.model, _inputs(vlm, seed), cpu, vlm.model.dtype) for seed in (5, 6))
    other = prefill.prepare(vlm.model, _inputs(vlm, 5, sizes=((112, 112), (56, 56))), cpu, vlm.model.dtype)
    assert not torch.equal(first.pixel_values, second.pixel_values)
    assert graph._key(first) == graph._key(second) != graph._key(other)
    model = copy.deepcopy(vlm.model)
    model.set_attn_implementation({"vision_config": "sdpa"})  # the graph would keep the other attention
    assert prefill.CapturedPrefill(model, graph.cache)._key(first)[2] != graph._key(first)[2]
    assert len(prefill._tensors(first)) == 4 + 4  # ids, positions, pixels, image tokens; 4 vision index tensors


@torch.inference_mode()
def test_a_failed_capture_falls_back_to_the_eager_prefill_once_per_shape(vlm, monkeypatch):
    # the fallback's logic on CPU: a capture that fails as a real one does (after its warm-up has
    # created the cache's tensors, which changes the key) is not tried again for that shape
    attempts = []

    def failing_capture(self):
        attempts.append(self._key(self.inputs))
        self.cache.reset()
        self._run()  # the warm-up, for real
        raise cuda_graph.CaptureError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(prefill.CapturedPrefill, "_capture", failing_capture)
    model = vlm.model
    expected = greedy.GreedyDecoder(model, StaticCache(config=model.config, max_cache_len=256), 256,
                                    model.__call__)(_inputs(vlm, 0), 6)  # no prefill graph: eager
    cache = StaticCache(config=model.config, max_cache_len=256)  # its tensors are made by the first prefill
    decoder = greedy.GreedyDecoder(model, cache, 256, model.__call__)
    decoder.prefill = prefill.CapturedPrefill(model, cache)
    with pytest.warns(UserWarning, match="could not be captured"):
        first = decoder(_inputs(vlm, 0), 6)
    assert torch.equal(first, expected) and len(attempts) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in (0, 1):
            cache.reset()
            assert decoder(_inputs(vlm, seed), 6).shape == expected.shape
    assert len(attempts) == 1  # the same shape: eager at once, no warning
    cache.reset()
    with pytest.warns(UserWarning, match="could not be captured"):
        decoder(_inputs(vlm, 0, sizes=((112, 112), (56, 56))), 6)
    assert len(attempts) == 2  # another shape is tried


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
@torch.inference_mode()
def test_captured_prefill_equals_the_eager_one(vlm):
    model = copy.deepcopy(vlm.model).to("cuda")
    cache = StaticCache(config=model.config, max_cache_len=256)
    graph = prefill.CapturedPrefill(model, cache)
    cuda = torch.device("cuda")
    for seed, sizes in ((0, ((224, 168), (56, 56))), (1, ((224, 168), (56, 56))), (2, ((112, 112), (56, 56)))):
        prompt = prefill.prepare(model, _inputs(vlm, seed, sizes), cuda, model.dtype)
        cache.reset()
        eager = prefill.run(model, prompt, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].clone()
        keys = cache.layers[0].keys.clone()
        cache.reset()
        torch.testing.assert_close(graph(prompt), eager, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.layers[0].keys, keys, rtol=1e-5, atol=1e-5)
    assert graph.captures == 2  # the second prompt replayed the first one's graph


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
@torch.inference_mode()
def test_a_prefill_that_cannot_be_captured_runs_eagerly_and_is_not_tried_again(vlm):
    model = copy.deepcopy(vlm.model).to("cuda")
    model.set_attn_implementation({"vision_config": "sdpa"})  # window by window: reads the windows on the host
    graph = prefill.CapturedPrefill(model, StaticCache(config=model.config, max_cache_len=256))
    prompt = prefill.prepare(model, _inputs(vlm, 0), torch.device("cuda"), model.dtype)
    with pytest.warns(UserWarning, match="could not be captured"):
        first = graph(prompt)
    assert first is None and graph(prompt) is None and graph.captures == 0  # not tried again
    attention.use_fast_vision_attention(model)
    assert graph(prefill.prepare(model, _inputs(vlm, 0), torch.device("cuda"), model.dtype)) is not None
    assert graph.captures == 1
