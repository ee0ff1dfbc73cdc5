"""Zoom geometry against an independent computation of the CoZ reference's integer arithmetic."""
import itertools
import math

import pytest

from coz_core.zoom import Box, center_in_crop, initial_plan, zoom_box


def reference_crop(w: int, h: int, rscale: int):
    """inference_coz.py: new = w // rscale; box ((w-new_w)//2, (h-new_h)//2, (w+new_w)//2, (h+new_h)//2)."""
    new_w, new_h = w // rscale, h // rscale
    return (w - new_w) // 2, (h - new_h) // 2, (w + new_w) // 2, (h + new_h) // 2


def reference_initial(w: int, h: int, size: int):
    """inference_coz.py resize_and_center_crop: short side to size with int(), centre crop."""
    scale = size / min(w, h)
    new_w, new_h = int(w * scale), int(h * scale)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return (new_w, new_h), (left, top, left + size, top + size)


@pytest.mark.parametrize("size", [7, 64, 100, 127, 128, 255, 333, 512, 513, 1000, 1024])
@pytest.mark.parametrize("rscale", [2, 3, 4, 5, 8, 16, 64, 256])
def test_centre_crop_is_the_reference(size, rscale):
    for w, h in [(size, size), (size, size + 37), (size + 11, size)]:
        if w // rscale < 1 or h // rscale < 1:
            with pytest.raises(ValueError, match="too small"):
                zoom_box((w, h), rscale)
        else:
            assert zoom_box((w, h), rscale) == reference_crop(w, h, rscale)
            assert zoom_box((w, h), float(rscale), (0.5, 0.5)) == reference_crop(w, h, rscale)


@pytest.mark.parametrize("w,h", [(512, 512), (600, 400), (400, 600), (451, 300), (1000, 872),
                                 (513, 1777), (2048, 1365), (300, 300), (5000, 31)])
@pytest.mark.parametrize("size", [64, 128, 512])
def test_initial_plan_is_the_reference(w, h, size):
    (rw, rh), box = initial_plan((w, h), (size, size))
    (ref_w, ref_h), ref_box = reference_initial(w, h, size)
    if min(ref_w, ref_h) >= size:  # the reference's int() can fall one pixel short; ours covers
        assert (rw, rh) == (ref_w, ref_h) and box == ref_box
    assert rw >= size and rh >= size and box[2] - box[0] == size and box[3] - box[1] == size
    assert 0 <= box[0] and box[2] <= rw and 0 <= box[1] and box[3] <= rh


def test_initial_plan_non_square_covers():
    (rw, rh), box = initial_plan((600, 400), (512, 384))
    assert min(rw / 600, rh / 400) >= max(512 / 600, 384 / 400) - 1e-9  # covers both sides
    assert box[2] - box[0] == 512 and box[3] - box[1] == 384


@pytest.mark.parametrize("zoom", [1.5, 2, 2.5, 3, 4, 7.3])
@pytest.mark.parametrize("cx,cy", list(itertools.product([0.0, 0.1, 0.37, 0.5, 0.9, 1.0], repeat=2)))
def test_off_centre_boxes_are_clamped_and_track_the_target(zoom, cx, cy):
    w, h = 512, 384
    left, t, r, b = zoom_box((w, h), zoom, (cx, cy))
    assert (r - left, b - t) == (math.floor(w / zoom), math.floor(h / zoom))
    assert 0 <= left and r <= w and 0 <= t and b <= h  # never outside: nothing padded
    px, py = cx * w, cy * h
    assert left <= px <= r and t <= py <= b  # the target stays in view
    if left > 0 and r < w:  # not clamped: centred on the target within a pixel
        assert abs((left + r) / 2 - px) <= 1.0
    if t > 0 and b < h:
        assert abs((t + b) / 2 - py) <= 1.0
    # the target's position inside the crop, and back
    nx, ny = center_in_crop((cx, cy), (left, t, r, b), (w, h))
    assert abs(left + nx * (r - left) - px) < 1e-9 and abs(t + ny * (b - t) - py) < 1e-9


def test_box_composition():
    scale0 = Box(100.0, 50.0, 612.0, 562.0)  # a 512-pixel scale showing 512 original pixels
    sub = scale0.sub((192, 192, 320, 320), (512, 512))
    assert sub.as_list() == [292.0, 242.0, 420.0, 370.0]
    subsub = sub.sub((192, 192, 320, 320), (512, 512))
    assert subsub.width == pytest.approx(32.0) and subsub.left == pytest.approx(292 + 48)
