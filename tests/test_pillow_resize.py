"""pillow_resize: Pillow's 8-bit bicubic resize reproduced in torch, compared with Pillow itself."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from coz_core.prompt import pillow_resize

# (height, width) -> (height, width): the VLM's sizes (both sides multiples of 28), up and down,
# one axis only, non-square, from one pixel, and shapes whose height shrinks far more than their
# width (Pillow 13 runs the vertical pass first there)
SIZES = [
    ((512, 512), (504, 504)), ((512, 512), (1008, 1008)), ((640, 480), (644, 476)), ((7, 9), (28, 28)),
    ((1, 1), (56, 56)), ((37, 100), (56, 28)), ((33, 700), (28, 588)), ((300, 1000), (84, 280)),
    ((100, 37), (28, 56)), ((1000, 300), (336, 112)), ((900, 100), (56, 28)), ((512, 300), (504, 300)),
    ((300, 512), (300, 504)),
]


def pillow(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(array).resize((size[1], size[0]), Image.BICUBIC))


def pictures(height: int, width: int, seed: int) -> list[np.ndarray]:
    """Noise, hard black-and-white edges (the fixed-point sums overshoot and clip) and a smooth ramp."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, height * width * 3).reshape(height, width, 3).astype(np.uint8)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
            (rng.integers(0, 2, (height, width, 3)) * 255).astype(np.uint8), ramp]


@pytest.mark.parametrize("before, after", SIZES)
def test_every_pixel_equals_pillows(before, after):
    arrays = pictures(*before, seed=before[0] * 7 + after[1])
    ours = pillow_resize.resize(torch.from_numpy(np.stack(arrays)), after)
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == (len(arrays), *after, 3)
    for array, resized in zip(arrays, ours):
        np.testing.assert_array_equal(resized.numpy(), pillow(array, after))


def test_the_order_of_the_passes_matters_and_is_pillows():
    # the passes round to 8 bits in between: the other order gives other pixels
    array = pictures(1000, 300, seed=1)[0]
    before, after = (1000, 300), (336, 112)
    x = torch.from_numpy(array)[None].permute(0, 3, 1, 2).long()
    passes = [(-1, 300, 112), (-2, 1000, 336)]
    if not pillow_resize.vertical_first(before, after):
        passes.reverse()
    for axis, n, m in passes:  # the order Pillow does not take
        x = pillow_resize._pass(x, pillow_resize._taps(n, m, torch.device("cpu")), axis)
    other = x.to(torch.uint8).permute(0, 2, 3, 1)[0].numpy()
    assert (other != pillow(array, after)).sum() > 1000


def test_weights_are_pillows_fixed_point_windows():
    w = pillow_resize.weights(512, 504)  # a slight reduction: a kernel 4.06 pixels wide
    assert w.shape == (504, 512) and w.dtype == np.int64
    one = 1 << pillow_resize.PRECISION_BITS
    assert np.all(np.abs(w.sum(axis=1) - one) <= 7)  # each tap rounded on its own
    taps = (w != 0).sum(axis=1)
    assert taps.min() == 3 and taps.max() == 5  # 3 at the borders
    assert (w < 0).any()  # bicubic's negative lobes
    up = pillow_resize.weights(7, 28)
    assert (up != 0).sum(axis=1).max() == 4  # enlarging: the plain 4-tap kernel
    # the pass applies each row's nonzero weights, padded with zeros to the longest window
    columns, values = pillow_resize._taps(512, 504, torch.device("cpu"))
    assert columns.shape == values.shape == (5, 504)
    dense = np.zeros((504, 512), dtype=np.int64)
    np.add.at(dense, (np.arange(504)[None].repeat(5, 0), columns.numpy()), values.numpy())
    np.testing.assert_array_equal(dense, w)


def test_kept_size_is_returned_as_it_is_and_bad_input_is_refused():
    array = torch.from_numpy(pictures(28, 56, seed=2)[0])[None]
    assert torch.equal(pillow_resize.resize(array, (28, 56)), array)
    with pytest.raises(ValueError, match="uint8"):
        pillow_resize.resize(array.float(), (56, 56))
    with pytest.raises(ValueError, match="cannot resize"):
        pillow_resize.resize(array, (0, 56))
