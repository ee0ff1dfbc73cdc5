"""The vision tower's one-call attention (coz_core/prompt/attention.py) against transformers' own
window-by-window ``sdpa`` setting: bit for bit on CPU, the same attention on a GPU."""
from __future__ import annotations

import os

import pytest
import torch
from qwen_fixtures import make_tiny_qwen

from coz_core.prompt import attention
from coz_core.prompt.qwen import MULTISCALE_SYSTEM, load_qwen_vl
from coz_core.prompt.vision import prepare_images

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    return load_qwen_vl(make_tiny_qwen(tmp_path_factory.mktemp("Qwen2.5-VL-tiny-attention")))


def _features(vlm, inputs) -> torch.Tensor:
    with torch.inference_mode():
        out = vlm.model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    out = getattr(out, "pooler_output", out)
    return torch.cat(list(out)) if isinstance(out, (list, tuple)) else out


def test_loading_gives_the_vision_tower_the_one_call_attention_only(vlm):
    assert vlm.model.config.vision_config._attn_implementation == attention.NAME
    assert vlm.model.config.text_config._attn_implementation == "sdpa"


def test_cpu_results_equal_transformers_sdpa_setting_bit_for_bit(vlm):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(1, 3, 224, 168, generator=g) for _ in range(2)]  # several windows per image
    inputs = vlm.inputs(prepare_images(images[0]) + prepare_images(images[1]), MULTISCALE_SYSTEM)
    ours = _features(vlm, inputs)
    vlm.model.set_attn_implementation({"vision_config": "sdpa"})
    try:
        theirs = _features(vlm, inputs)
    finally:
        assert attention.use_fast_vision_attention(vlm.model)
    assert torch.equal(ours, theirs)


def _windows(seed: int, device: str = "cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    spans = torch.tensor([0, 64, 100, 164, 228, 240], dtype=torch.int32)
    q, k, v = (torch.randn(1, 4, 240, 16, generator=g).to(device, dtype) for _ in range(3))
    split = [torch.nn.functional.scaled_dot_product_attention(*(t[:, :, a:b] for t in (q, k, v)))
             for a, b in zip(spans[:-1].tolist(), spans[1:].tolist())]
    return q, k, v, spans.to(device), torch.cat(split, dim=2).transpose(1, 2)


def test_block_diagonal_attention_is_attention_within_each_window():
    q, k, v, spans, expected = _windows(1)
    out = attention.block_diagonal_attention(q, k, v, spans, 16**-0.5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # not a no-op: attending across windows gives something else
    whole = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    assert (whole - expected).abs().max() > 0.1


def test_flash_attention_is_left_to_ampere_and_newer(monkeypatch):
    # PyTorch's flash kernels refuse older GPUs ("FlashAttention only supports Ampere GPUs or newer")
    for capability, flash in (((6, 1), False), ((7, 5), False), ((8, 0), True), ((8, 6), True), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        assert attention.flash_runs_on(torch.device("cuda")) == flash


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the one-call paths run on CUDA")
@pytest.mark.parametrize("flash", [True, False])
def test_cuda_one_call_attention_matches_windows(flash, monkeypatch):
    if flash and not attention.flash_runs_on(torch.device("cuda")):
        pytest.skip("flash attention needs an Ampere or newer GPU")
    monkeypatch.setattr(attention, "flash_runs_on", lambda device: flash)  # False: as on a Turing GPU
    q, k, v, spans, expected = _windows(2, "cuda", torch.bfloat16)
    out, _ = attention.vision_attention(None, q, k, v, scaling=16**-0.5, cu_seq_lens_q=spans,
                                        max_length_q=int((spans[1:] - spans[:-1]).max()))
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=2e-2)
