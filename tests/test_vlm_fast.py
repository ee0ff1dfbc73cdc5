"""The VLM's fast decoding path (static KV cache + compiled decoding) against plain ``generate``.

On CPU the static cache is forced (``fast_decode=True``) and the decoding step is captured with
torch.compile's "eager" backend: the same graph capture (fullgraph) and cache handling as on a GPU,
without inductor's CPU compile time. The reference is transformers' own ``generate`` with its
default dynamic cache.
"""
from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch
from qwen_fixtures import make_tiny_qwen

from coz_core.policy import vlm_fast_decode
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
                   _compile_config=None, _cache=None)
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
    if backend == "compiled":
        assert fast.first_fast_seconds is not None and fast._compile_config.fullgraph
        # one compiled call kept on the model for every later step
        assert getattr(vlm.model, "_compiled_call", None) is not None
