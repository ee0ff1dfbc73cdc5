"""Image preparation for Qwen2.5-VL: qwen-vl-utils' resize rules on tensors."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from qwen_fixtures import reference_pixels

from coz_core.prompt.vision import (
    MAX_PIXELS, MIN_PIXELS, pixel_limits, prepare_batches, prepare_images, prepare_on, prepare_together, smart_size,
)

# (height, width) -> smart_resize(h, w, factor=28, min_pixels=4*28*28, max_pixels=16384*28*28) as
# computed by qwen-vl-utils 0.0.14 (which cannot be imported here: it needs torchvision).
QWEN_VL_UTILS = [
    ((512, 512), (504, 504)), ((504, 504), (504, 504)), ((10, 10), (56, 56)), ((1, 150), (28, 140)),
    ((3000, 2000), (2996, 1988)), ((5000, 5000), (3556, 3556)), ((8000, 6000), (4116, 3080)),
    ((15, 15), (56, 56)), ((28, 28), (56, 56)), ((42, 42), (56, 56)), ((70, 70), (56, 56)),
    ((513, 700), (504, 700)), ((37, 4000), (28, 4004)), ((1, 1), (56, 56)), ((100, 27), (112, 28)),
    ((4000, 37), (4004, 28)), ((1080, 1920), (1092, 1932)), ((333, 517), (336, 504)),
]


@pytest.mark.parametrize("size, expected", QWEN_VL_UTILS)
def test_smart_size_matches_qwen_vl_utils(size, expected):
    assert smart_size(*size) == expected
    h, w = expected
    assert h % 28 == 0 and w % 28 == 0
    assert MIN_PIXELS <= h * w <= MAX_PIXELS


def test_smart_size_rejects_extreme_aspect_and_bad_bounds():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_size(10, 2011)
    with pytest.raises(ValueError, match="max_pixels"):
        smart_size(100, 100, min_pixels=1000, max_pixels=10)
    with pytest.raises(ValueError, match="positive"):
        smart_size(0, 10)


def test_prepare_images_gives_the_reference_pixels_for_every_batch_element():
    torch.manual_seed(0)
    images = torch.rand(3, 3, 512, 512)
    out = prepare_images(images)
    assert len(out) == 3
    for image, array in zip(images, out):
        assert array.dtype == np.uint8 and array.shape == (504, 504, 3)
        np.testing.assert_array_equal(array, reference_pixels(image, (504, 504)))
    assert not np.array_equal(out[0], out[1])


def test_prepare_images_keeps_fitting_sizes_and_handles_odd_ones():
    torch.manual_seed(1)
    fitting = torch.rand(1, 3, 56, 84)
    np.testing.assert_array_equal(prepare_images(fitting)[0], reference_pixels(fitting[0], (56, 84)))
    odd = torch.rand(2, 3, 37, 61)
    out = prepare_images(odd)
    assert [a.shape for a in out] == [(56, 84, 3)] * 2  # 37x61 -> 28x56 is below min_pixels: scaled up
    np.testing.assert_array_equal(out[1], reference_pixels(odd[1], (56, 84)))


def test_prepare_images_grey_alpha_and_bad_input():
    grey = torch.full((1, 1, 56, 56), 0.5)
    assert np.all(prepare_images(grey)[0] == 128)
    rgba = torch.cat([torch.zeros(1, 3, 56, 56), torch.ones(1, 1, 56, 56)], 1)
    assert np.all(prepare_images(rgba)[0] == 0)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        prepare_images(torch.rand(3, 56, 56))
    with pytest.raises(ValueError, match="non-empty"):
        prepare_images(torch.rand(0, 3, 56, 56))
    with pytest.raises(ValueError, match="NaN"):
        prepare_images(torch.full((1, 3, 56, 56), float("nan")))


def test_prepare_together_gives_each_batch_what_prepare_images_gives():
    g = torch.Generator().manual_seed(0)
    batches = [torch.rand(2, 3, 512, 384, generator=g), torch.rand(1, 3, 100, 130, generator=g),
               torch.rand(1, 3, 56, 56, generator=g)]  # resized, resized, kept as it is
    together = prepare_together(batches)
    assert [len(out) for out in together] == [2, 1, 1]
    for batch, out in zip(batches, together):
        assert all(np.array_equal(a, b) for a, b in zip(out, prepare_images(batch)))
    assert len(prepare_together(batches[1:2])[0]) == 1
    with pytest.raises(ValueError, match="NaN"):  # checked on the calling thread, before any resize
        prepare_together([batches[0], torch.full((1, 3, 56, 56), float("nan"))])


def test_prepare_on_a_device_gives_the_reference_pixels():
    # the torch route a GPU takes (pillow_resize), run here on the CPU: Pillow's pixels exactly
    g = torch.Generator().manual_seed(4)
    cpu = torch.device("cpu")
    batches = [torch.rand(2, 3, 512, 384, generator=g), torch.rand(1, 3, 37, 61, generator=g),
               torch.rand(1, 3, 56, 84, generator=g), torch.full((1, 1, 40, 40), 0.5),
               torch.cat([torch.rand(1, 3, 90, 300, generator=g), torch.ones(1, 1, 90, 300)], 1)]
    for batch in batches:
        ours = prepare_on(batch, cpu)
        assert all(t.dtype == torch.uint8 and t.device == cpu for t in ours)
        for tensor, array in zip(ours, prepare_images(batch), strict=True):
            np.testing.assert_array_equal(tensor.numpy(), array)
    np.testing.assert_array_equal(prepare_on(batches[0], cpu)[1].numpy(), reference_pixels(batches[0][1], (504, 392)))
    with pytest.raises(ValueError, match="NaN"):
        prepare_on(torch.full((1, 3, 56, 56), float("nan")), cpu)


def test_prepare_batches_leaves_the_cpu_to_pillow():
    batches = [torch.rand(1, 3, 100, 130), torch.rand(1, 3, 64, 64)]
    out = prepare_batches(batches, torch.device("cpu"))
    assert all(isinstance(a, np.ndarray) for images in out for a in images)
    assert all(np.array_equal(a, b) for a, b in zip(out[1], prepare_images(batches[1])))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU route")
def test_prepare_batches_resizes_on_the_gpu_to_pillows_pixels():
    g = torch.Generator().manual_seed(5)
    batches = [torch.rand(1, 3, 512, 512, generator=g), torch.rand(2, 3, 300, 1000, generator=g)]
    out = prepare_batches([b.cuda() for b in batches], torch.device("cuda"))
    for batch, images in zip(batches, out):
        for tensor, array in zip(images, prepare_images(batch), strict=True):
            assert tensor.is_cuda
            np.testing.assert_array_equal(tensor.cpu().numpy(), array)
    large = torch.rand(1, 3, 2049, 2048, device="cuda")  # above DEVICE_RESIZE_PIXELS: Pillow on the CPU
    assert isinstance(prepare_batches([large], torch.device("cuda"))[0][0], np.ndarray)


def test_pixel_limits_read_from_the_folder(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 100, "max_pixels": 5000}))
    assert pixel_limits(tmp_path) == (100, 5000)
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps({"size": {"shortest_edge": 3136, "longest_edge": 1003520}}))
    assert pixel_limits(tmp_path) == (3136, 1003520)
    (tmp_path / "preprocessor_config.json").write_text("{}")
    assert pixel_limits(tmp_path) == (MIN_PIXELS, MAX_PIXELS)
    # a folder with a lower max_pixels makes big images smaller, as qwen-vl-utils would
    assert smart_size(1024, 1024, max_pixels=1003520) == (980, 980)
    (tmp_path / "preprocessor_config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not valid JSON"):
        pixel_limits(tmp_path)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        pixel_limits(tmp_path / "missing")
