"""Bilateral Upsampler node: image, mask and latent inputs, fixed and learned kernels, the
learned fit under inference mode (ComfyUI runs nodes in it), its progress per fitting step and
cancel between steps."""
import pytest
import torch

from node_fixtures import bhwc, load_pack

pack = load_pack()
from coz_pack.coz_core.upsample import guided_upsample  # noqa: E402
from coz_pack.nodes import host  # noqa: E402
from coz_pack.nodes import upsample as upsample_node  # noqa: E402

from test_nodes import photo  # noqa: E402

NODE = pack.NODE_CLASS_MAPPINGS["CoZBilateralUpsampler"]


def test_fixed_kernels_equal_coz_core_for_every_input():
    guide = photo(h=32, w=32)
    low = photo(h=8, w=8, seed=4)
    mask = torch.rand(1, 8, 8)
    latent = {"samples": torch.randn(1, 4, 2, 2), "batch_index": [0]}
    image, up_mask, up_latent = NODE().upsample(bhwc(guide), "fixed", 10, image=bhwc(low), mask=mask, latent=latent)
    assert torch.allclose(image, bhwc(guided_upsample(low, guide, "fixed").clamp(0, 1)), atol=1e-6)
    ref_mask = guided_upsample(mask[:, None], guide, "fixed", kind="mask")[:, 0]
    assert torch.allclose(up_mask, ref_mask, atol=1e-6) and up_mask.shape == (1, 32, 32)
    assert up_latent["samples"].shape == (1, 4, 4, 4) and up_latent["batch_index"] == [0]
    empty = NODE().upsample(bhwc(guide), "fixed", 10)  # unconnected: empty batches, never None
    assert [t.shape for t in (empty[0], empty[1], empty[2]["samples"])] == [(0, 32, 32, 3), (0, 32, 32), (0, 4, 4, 4)]


def test_learned_kernels_fit_under_inference_mode():
    guide = photo(h=24, w=24)
    mask = torch.zeros(1, 6, 6)
    mask[..., :3] = 1  # left half
    with torch.inference_mode():
        _, learned, _ = NODE().upsample(bhwc(guide), "learned", 3, mask=mask)
    assert learned.shape == (1, 24, 24) and 0 <= float(learned.min()) and float(learned.max()) <= 1
    assert not torch.allclose(learned, NODE().upsample(bhwc(guide), "fixed", 3, mask=mask)[1])


def _spy_progress(monkeypatch, on_update=None):
    updates = []
    original = host.Progress.update

    def spy(self, value, preview=None):
        updates.append((value, self.total))
        if on_update:
            on_update(value)
        original(self, value, preview)

    monkeypatch.setattr(host.Progress, "update", spy)
    return updates


def test_learned_fit_reports_progress_per_step(monkeypatch):
    updates = _spy_progress(monkeypatch)
    guide = photo(h=24, w=24)
    NODE().upsample(bhwc(guide), "learned", 4, image=bhwc(photo(h=6, w=6, seed=2)), mask=torch.rand(1, 6, 6),
                    latent={"samples": torch.randn(1, 4, 2, 2)})
    # two fits (the image and mask share the 6x6 grid; the latent has its own): 8 steps in all
    assert [v for v, _ in updates] == [1, 2, 3, 4, 4, 5, 6, 7, 8, 8] and {t for _, t in updates} == {8}
    updates.clear()
    NODE().upsample(bhwc(guide), "fixed", 4, mask=torch.rand(1, 6, 6))
    assert updates == []  # nothing to fit


def test_cancel_stops_the_fit_within_one_step(monkeypatch):
    steps = []
    real_fit = upsample_node.fit_kernels

    def counting_fit(*args, callback, **kwargs):
        def count(step, total, loss):
            steps.append(step)
            return callback(step, total, loss)
        return real_fit(*args, callback=count, **kwargs)

    monkeypatch.setattr(upsample_node, "fit_kernels", counting_fit)
    _spy_progress(monkeypatch, on_update=lambda value: host.request_cancel() if value == 2 else None)
    with pytest.raises(host.Cancelled):
        NODE().upsample(bhwc(photo(h=24, w=24)), "learned", 50, mask=torch.rand(1, 6, 6))
    assert steps == [1, 2]  # the fit stopped right after the step during which cancel came
