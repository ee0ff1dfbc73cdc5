"""The VLM's fast decoding path (static KV cache + compiled decoding) against plain ``generate``.

On CPU the static cache is forced (``fast_decode=True``) and the decoding step is captured with
torch.compile's "eager" backend: the same graph capture (fullgraph) and cache handling as on a GPU,
without inductor's CPU compile time. The reference is transformers' own ``generate`` with its
default dynamic cache.
"""
from __future__ import annotations

import copy
import logging
import os
import warnings
import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch
from qwen_fixtures import make_tiny_qwen

from coz_core.policy import vlm_fast_decode
from coz_core.prompt import fused
from coz_core.prompt.qwen import MULTISCALE_SYSTEM, load_qwen_vl
from coz_core.prompt.vision import prepare_images

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return load_qwen_vl(make_tiny_qwen(tmp_path_factory.mktemp("Qwen2.5-VL-tiny-fast")))


def _inputs(vlm, seed: int, size: int = 56):
    g = torch.Generator().manual_seed(seed)
    previous, zoomed = (torch.rand(1, 3, size, size, generator=g) for _ in range(2))
    return vlm.inputs(prepare_images(previous) + prepare_images(zoomed), MULTISCALE_SYSTEM)


def test_policy_turns_fast_decoding_on_for_cuda_only():
    assert vlm_fast_decode(torch.device("cuda", 0)) and not vlm_fast_decode(torch.device("cpu"))
    assert vlm_fast_decode(torch.device("cpu"), force=True) and not vlm_fast_decode(torch.device("cuda"), force=False)


def test_cpu_default_is_the_plain_path(vlm):
    assert vlm.fast_decode is None and not vlm.uses_fast_decode()


@pytest.mark.parametrize("backend", ["static-cache", "compiled"])
def test_fast_path_is_token_identical_to_plain_generate(vlm, backend):
    # "static-cache": the static cache alone; "compiled": captured with torch.compile ("eager" backend)
    fast = replace(vlm, fast_decode=True, compile_backend="eager" if backend == "compiled" else None,
                   _compile_config=None, _cache=None, _step=None)
    lengths = set()
    for seed, tokens in ((0, 24), (2, 40)):  # different images and lengths, one cache bucket
        inputs = _inputs(vlm, seed)
        plain = vlm.generate_ids(inputs, tokens)
        ids = fast.generate_ids(inputs, tokens)
        assert torch.equal(ids, plain), (seed, ids, plain)
        lengths.add(int(plain.numel()))
        forced = fast.generate_ids(inputs, 12, min_new_tokens=12)  # runs to the limit
        assert torch.equal(forced, vlm.generate_ids(inputs, 12, min_new_tokens=12)) and forced.numel() == 12
    assert max(lengths) > 4  # the comparison covered real decoding, not an immediate end token
    assert fast._cache[2] == 256  # one cache, reset and reused by every call above
    assert fast.first_fast_seconds is not None and fast._step is not None  # greedy.py's loop decoded
    if backend == "compiled":  # one compiled step kept for every later call
        assert fast._step != vlm.model.__call__


def test_release_drops_caches_and_decoders_but_keeps_the_compiled_forward(vlm):
    # what ComfyUI's unload and the lowvram turns call: the device memory the fast path keeps beyond
    # the weights is freed at once (nothing else holds the decoders), and nothing compiles again
    fast = replace(vlm, fast_decode=True, compile_backend="eager", _compile_config=None, _cache=None, _step=None)
    one, chats = _inputs(vlm, 0), [_inputs(vlm, seed) for seed in (0, 1)]
    ids, answers = fast.generate_ids(one, 12), fast.generate_batch(chats, 12)
    forward, kept = fast._forward, [weakref.ref(fast._step), weakref.ref(fast._batches[2][0]),
                                    weakref.ref(fast._cache[0])]
    fast.release()
    assert fast._cache is None and fast._step is None and fast._batches == {}
    assert all(ref() is None for ref in kept)  # freed without a garbage collection
    assert torch.equal(fast.generate_ids(one, 12), ids) and fast.generate_batch(chats, 12) == answers
    assert fast._forward is forward and fast._step is not None


def test_the_first_fast_prompt_announces_its_one_time_compilation(vlm, caplog):
    fast = replace(vlm, fast_decode=True, compile_backend="eager", _compile_config=None, _cache=None, _step=None)
    inputs = _inputs(vlm, 0)
    with caplog.at_level(logging.INFO, logger="coz_core"):
        for _ in range(3):
            fast.generate_ids(inputs, 4)
    notes = [r.getMessage() for r in caplog.records if r.name == "coz_core.prompt.qwen"]
    assert len(notes) == 2, notes  # before and after the first call only
    assert "once per loaded model" in notes[0] and f"{fast.first_fast_seconds:.1f} s" in notes[1]


def test_without_triton_the_gpu_path_captures_without_inductor(vlm, monkeypatch):
    from coz_core import policy
    from coz_core.prompt.qwen import QwenVL

    monkeypatch.setattr(QwenVL, "device", property(lambda self: torch.device("cuda")))  # no GPU here
    monkeypatch.setattr(policy, "compiles", lambda device, fp8=False: False)  # e.g. Windows without triton-windows
    assert vlm.compile_backend == "inductor" and vlm.backend == "eager"
    monkeypatch.setattr(policy, "compiles", lambda device, fp8=False: True)
    assert vlm.backend == "inductor"


@torch.inference_mode()
def test_a_decoding_step_that_cannot_be_captured_runs_uncaptured(vlm, monkeypatch):
    # the fallback's logic on CPU: a capture that fails (as a CUDA one can, e.g. on an operation a
    # stream may not record) warns once and the loop goes on uncaptured, with the same tokens
    from transformers import StaticCache

    from coz_core import cuda_graph
    from coz_core.prompt import greedy

    def failing_capture(self):
        raise cuda_graph.CaptureError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(greedy.GreedyDecoder, "WARMUP", 0)  # straight to the capture (no side stream here)
    monkeypatch.setattr(greedy.GreedyDecoder, "_capture", failing_capture)
    model, inputs = vlm.model, _inputs(vlm, 0)
    expected = greedy.GreedyDecoder(model, StaticCache(config=model.config, max_cache_len=256), 256,
                                    model.__call__)(inputs, 12, min_new_tokens=12)
    decoder = greedy.GreedyDecoder(model, StaticCache(config=model.config, max_cache_len=256), 256,
                                   model.__call__, capture=True)
    decoder.prefill = None  # the prefill's own fallback is tested in test_vlm_prefill
    with pytest.warns(UserWarning, match="could not be captured"):
        first = decoder(inputs, 12, min_new_tokens=12)
    assert torch.equal(first, expected) and not decoder.capture and decoder.graph is None
    decoder.cache.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert torch.equal(decoder(inputs, 12, min_new_tokens=12), expected)


@pytest.mark.parametrize("penalty, min_new", [(1.3, None), (1.0, None), (0.8, 6), (1.05, 3)])
def test_fast_greedy_loop_matches_generate_with_penalty_min_tokens_and_end_tokens(vlm, penalty, min_new):
    # the fast path's own greedy loop (greedy.py) against generate: repetition penalty, min_new_tokens,
    # and a stop at an end token; a token the model emits early is made an end token so that the
    # stop (and its masking under min_new_tokens) happens within the answer
    fast = replace(vlm, fast_decode=True, compile_backend="eager", _compile_config=None, _cache=None, _step=None)
    config = vlm.model.generation_config
    original = config.eos_token_id
    try:
        for seed, tokens in ((5, 20), (6, 37)):
            inputs = _inputs(vlm, seed, size=84 if seed == 6 else 56)
            free = vlm.generate_ids(inputs, tokens, repetition_penalty=penalty)
            assert torch.equal(fast.generate_ids(inputs, tokens, repetition_penalty=penalty), free)
            config.eos_token_id = [*original, int(free[min(4, free.numel() - 1)])]  # one by the fifth token
            # min_new_tokens as an argument, and (second input) from the model's generation config
            options = {"min_new_tokens": min_new} if seed == 5 else {}
            config.min_new_tokens = None if seed == 5 else min_new
            plain = vlm.generate_ids(inputs, tokens, repetition_penalty=penalty, **options)
            ids = fast.generate_ids(inputs, tokens, repetition_penalty=penalty, **options)
            assert torch.equal(ids, plain), (seed, ids, plain)
            assert fast._step is not None  # greedy.py's loop decoded
            if min_new is None:
                assert plain.numel() <= 5  # it stopped at the end token
            else:  # the end token, due by the fifth token, was held back up to min_new_tokens
                assert plain.numel() >= min_new and not set(plain[:min_new].tolist()) & set(config.eos_token_id)
            config.eos_token_id, config.min_new_tokens = original, None
    finally:
        config.eos_token_id, config.min_new_tokens = original, None


@pytest.mark.parametrize("penalty, min_new", [(1.3, None), (1.0, None), (1.0, 6)])
def test_prompts_of_one_length_decode_together_as_generate_decodes_them(vlm, penalty, min_new):
    # generate_batch on the fast path (one decoder per batch size, its own static cache) against
    # generate's batch; a token of the first answer made an end token, so the rows end apart
    fast = replace(vlm, fast_decode=True, compile_backend="eager", _compile_config=None, _cache=None, _step=None)
    chats = [_inputs(vlm, seed) for seed in (0, 1, 2)]
    config = vlm.model.generation_config
    original = config.eos_token_id
    config.eos_token_id = [*original, int(vlm.generate_ids(chats[0], 24, repetition_penalty=penalty)[3])]
    config.min_new_tokens = min_new
    try:
        expected = vlm.generate_batch(chats, 24, penalty)  # the plain path: generate
        assert fast.generate_batch(chats, 24, penalty) == expected and list(fast._batches) == [3]
        decoder = fast._batches[3][0]
        assert fast.generate_batch(chats, 24, penalty) == expected and fast._batches[3][0] is decoder  # reused
        # the last, smaller batch of a run fills the decoder of 3 (no compile for 2)
        assert fast.generate_batch(chats[1:], 24, penalty) == expected[1:] and list(fast._batches) == [3]
        if penalty == 1.0 and min_new is None:  # the projections fused, as on a GPU
            fused_copy = replace(fast, model=copy.deepcopy(vlm.model))
            assert fused.fuse_projections(fused_copy.model)
            assert fused_copy.generate_batch(chats, 24, penalty) == expected
        counts = [n for _, n in expected]
        if min_new is None:
            assert counts[0] == 4 and max(counts) > 4  # the rows ended apart
        else:  # the end token, due fourth, held back
            assert counts[0] >= min_new
    finally:
        config.eos_token_id, config.min_new_tokens = original, None
    other = [_inputs(vlm, 0), _inputs(vlm, 1, size=84)]  # two lengths: generate, padded
    assert fast.generate_batch(other, 12) == vlm.generate_batch(other, 12) and list(fast._batches) == [3]


def test_fast_greedy_loop_computes_no_token_past_the_end(vlm, monkeypatch):
    # on the CPU the host sees the end flag at once: the loop stops at the end token
    fast = replace(vlm, fast_decode=True, compile_backend=None, _compile_config=None, _cache=None, _step=None)
    inputs = _inputs(vlm, 5)
    free = vlm.generate_ids(inputs, 20)
    assert free.numel() > 6
    config = vlm.model.generation_config
    original = config.eos_token_id
    end = int(free[5])
    first = int((free == end).nonzero()[0, 0])  # where that token first comes
    config.eos_token_id = [*original, end]
    try:
        fast.generate_ids(inputs, 4)  # makes the decoder
        steps = []
        step = fast._step._step
        monkeypatch.setattr(fast._step, "_step", lambda: (steps.append(1), step())[1])
        ids = fast.generate_ids(inputs, 20)
        assert torch.equal(ids, vlm.generate_ids(inputs, 20)) and ids.numel() == first + 1
        assert len(steps) == first  # the first token comes from the prefill; none after the end
    finally:
        config.eos_token_id = original


def test_sampling_and_other_generation_settings_use_generate(vlm, monkeypatch):
    import coz_core.prompt.greedy as greedy

    fast = replace(vlm, fast_decode=True, compile_backend=None, _compile_config=None, _cache=None, _step=None)
    inputs = _inputs(vlm, 0)
    expected = vlm.generate_ids(inputs, 16, min_new_tokens=16)
    monkeypatch.setattr(greedy.GreedyDecoder, "__call__", lambda *a, **k: pytest.fail("greedy loop used"))
    torch.manual_seed(0)
    assert 0 < fast.generate_ids(inputs, 8, sample=True).numel() <= 8
    # a setting the loop does not reproduce (here no_repeat_ngram_size): generate decodes instead
    config = vlm.model.generation_config
    config.no_repeat_ngram_size = 2
    try:
        assert not greedy.handles(config)
        assert torch.equal(fast.generate_ids(inputs, 16, min_new_tokens=16),
                           vlm.generate_ids(inputs, 16, min_new_tokens=16))
    finally:
        config.no_repeat_ngram_size = None
    assert greedy.handles(config)
    monkeypatch.undo()
    assert torch.equal(fast.generate_ids(inputs, 16, min_new_tokens=16), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")
def test_cuda_graph_decoding_equals_generate_and_is_captured_once(tmp_path):
    # float32 on the GPU: the captured loop (projections fused) against plain generate of the model
    # as loaded, one capture for every call, and a new capture (not stale addresses) after the weights moved
    folder = make_tiny_qwen(tmp_path / "q")
    vlm = replace(load_qwen_vl(folder, device="cuda"), fast_decode=False)  # plain generate (CUDA's default is fast)
    fast = replace(load_qwen_vl(folder, device="cuda"), fast_decode=True, compile_backend="eager")
    for seed, tokens in ((0, 24), (2, 40)):
        inputs = _inputs(vlm, seed)
        assert torch.equal(fast.generate_ids(inputs, tokens), vlm.generate_ids(inputs, tokens))
        forced = fast.generate_ids(inputs, 12, min_new_tokens=12)
        assert torch.equal(forced, vlm.generate_ids(inputs, 12, min_new_tokens=12))
    assert fast._step.capture and fast._step.captures == 1 and fast._step.prefill.captures == 1
    assert fused.is_fused(fast.model)
    chats = [_inputs(vlm, seed) for seed in (4, 5, 6)]  # one length: decoded together
    for _ in range(2):
        assert fast.generate_batch(chats, 16) == vlm.generate_batch(chats, 16)
    batch = fast._batches[3][0]
    assert batch.captures == 1 and batch.prefill is None  # its own graph; a batch's prefill runs eagerly
    fast.model.to("cpu")
    fast.model.to("cuda")
    inputs = _inputs(vlm, 3)
    expected = vlm.generate_ids(inputs, 20, min_new_tokens=20)
    assert torch.equal(fast.generate_ids(inputs, 20, min_new_tokens=20), expected)  # fused weights moved
    assert fast._step.captures == 2 and fast._step.prefill.captures == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the end flag read one token late on CUDA")
def test_cuda_loop_computes_at_most_one_token_past_the_end(tmp_path, monkeypatch):
    folder = make_tiny_qwen(tmp_path / "q")
    vlm = replace(load_qwen_vl(folder, device="cuda"), fast_decode=False)  # plain generate (CUDA's default is fast)
    fast = replace(load_qwen_vl(folder, device="cuda"), fast_decode=True, compile_backend="eager")
    inputs = _inputs(vlm, 5)
    free = vlm.generate_ids(inputs, 20)
    assert free.numel() > 6
    end = int(free[5])
    first = int((free == end).nonzero()[0, 0])
    config = vlm.model.generation_config
    original, config.eos_token_id = config.eos_token_id, [*np.atleast_1d(config.eos_token_id).tolist(), end]
    fast.model.generation_config.eos_token_id = config.eos_token_id
    try:
        fast.generate_ids(inputs, 4)  # makes the decoder
        steps = []
        step = fast._step._step
        monkeypatch.setattr(fast._step, "_step", lambda: (steps.append(1), step())[1])
        for _ in range(2):  # the second call starts from the first one's flag
            steps.clear()
            ids = fast.generate_ids(inputs, 20)
            assert torch.equal(ids, vlm.generate_ids(inputs, 20)) and ids.numel() == first + 1
            assert first <= len(steps) <= first + 1
    finally:
        config.eos_token_id = fast.model.generation_config.eos_token_id = original


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs a second CUDA device")
def test_cuda_fast_path_on_a_device_that_is_not_the_current_one(tmp_path):
    # the captured loop's streams, events and graphs belong to the model's device, not cuda:0
    folder = make_tiny_qwen(tmp_path / "q")
    vlm = replace(load_qwen_vl(folder, device="cuda:1"), fast_decode=False)
    fast = replace(load_qwen_vl(folder, device="cuda:1"), fast_decode=True, compile_backend="eager")
    assert torch.cuda.current_device() == 0
    for seed in (0, 1):
        inputs = _inputs(vlm, seed)
        assert torch.equal(fast.generate_ids(inputs, 16), vlm.generate_ids(inputs, 16))
    assert fast._step.captures == 1 and fast._step.prefill.captures == 1
