"""The batched path (few large ops, chosen on GPUs) run on CPU: it equals the banded path and the
slow per-pixel formula, its hand-written gradient equals autograd of the dense formula, and a
fitting step costs a fixed number of ops whatever the window (the banded path's grow with it)."""
import math
import warnings

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from coz_core.upsample import BilateralKernels, fit_kernels
from coz_core.upsample.batched import BatchedBand, sort_offsets
from coz_core.upsample.grid import Grid
from coz_core.upsample.kernel import coefficients, pad_lr, window
from coz_core.upsample.model import pick_path
from tests.test_upsample_kernel import assert_gradients_match_dense, gradient_case, random_maps
from tests.upsample_fixtures import photo, slow_upsample


@pytest.mark.parametrize("hr, lr, channels", [((8, 8), (2, 2), 1), ((10, 7), (5, 7), 2)])
def test_batched_apply_matches_slow_reference(hr, lr, channels):
    torch.manual_seed(0)
    guide, signal, guide_lr = torch.rand(2, 3, *hr), torch.randn(2, channels, *lr), torch.rand(2, 3, *lr)
    maps = random_maps(2, *lr, seed=1)
    k = BilateralKernels(*maps, guide, guide_lr, truncate=1e3, radius_max=16)
    ref = slow_upsample(signal, guide, guide_lr, *maps)
    torch.testing.assert_close(k.apply(signal, path="batched").double(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hr, lr", [((32, 32), (8, 8)), ((30, 41), (8, 9)), ((21, 40), (21, 5))])
def test_batched_apply_equals_banded(hr, lr):
    """Real-sized windows (trimmed at 3 sigma, radius 8), integer and non-integer scales, a
    batch of two guides and one guide for many signals, every accumulation dtype."""
    guide = torch.nn.functional.interpolate(torch.cat([photo(64), photo(64).flip(-1)]), size=hr,
                                            mode="bilinear", align_corners=False)
    maps = random_maps(2, *lr, seed=2)
    maps = (maps[0] * 3, maps[1] * 3, maps[2], maps[3])
    k = BilateralKernels(*maps, guide, torch.nn.functional.adaptive_avg_pool2d(guide, lr))
    signal = torch.randn(2, 20, *lr)
    for acc in (None, torch.bfloat16):
        tol = dict(rtol=0.02, atol=0.03) if acc else {}
        torch.testing.assert_close(k.apply(signal, path="batched", accumulate_dtype=acc),
                                   k.apply(signal, path="banded", accumulate_dtype=acc), **tol)
    one = BilateralKernels(*(m[:1] for m in maps), guide[:1], k.guide_lr[:1])
    torch.testing.assert_close(one.apply(signal, kind="latent", path="batched"), one.apply(signal, kind="latent"))


def test_batched_gradient_matches_autograd_of_dense_formula():
    hr, lr, guide, signal, guide_lr, upstream, maps = gradient_case()
    grid, pad, rows = Grid.build(hr, lr), 16, (0, lr[0])
    offsets = sort_offsets(grid, window(grid, 1e3, pad))
    coef = coefficients(*maps)
    coef_padded = pad_lr(coef.detach(), pad)
    grad = torch.zeros_like(coef_padded)
    band = BatchedBand(grid, offsets, rows, pad, guide, guide_lr, cache_range=True)
    near = band.neighbours(pad_lr(signal, pad), len(offsets))
    w, total = band.weights(coef_padded, len(offsets))
    out = band._matmul(near, w, total)
    upstream_cells = grid.to_cell_major(upstream, rows).permute(0, 2, 3, 1, 4, 5)
    band.accumulate_grad(w, total, near, out, upstream_cells * grid.valid_cell_major(rows, guide.device), grad)
    coef.backward(grad[:, :, pad:-pad, pad:-pad])
    ours = [m.grad.clone() for m in maps]
    dense = assert_gradients_match_dense(ours, maps, signal, guide, guide_lr, upstream)
    torch.testing.assert_close(grid.from_cell_major(out, rows).double(), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hr, lr", [((40, 40), (10, 10)), ((37, 29), (9, 7))])
def test_batched_fit_follows_the_banded_fit(hr, lr):
    guide = torch.nn.functional.interpolate(photo(64), size=hr, mode="bilinear", align_corners=False)
    banded = fit_kernels(guide, lr_size=lr, steps=8, path="banded")
    batched = fit_kernels(guide, lr_size=lr, steps=8, path="batched")
    assert len(batched.losses) == len(banded.losses) == 8
    torch.testing.assert_close(torch.tensor(batched.losses), torch.tensor(banded.losses), rtol=2e-3, atol=0)
    # not the maps: while a kernel is isotropic the gradient of its angle is zero up to float
    # rounding, which Adam normalises into full steps of either sign (so theta, and through it
    # the sigmas, wander differently in any two implementations); the losses and what the
    # kernels do agree
    one = fit_kernels(guide, lr_size=lr, steps=1, path="batched")
    torch.testing.assert_close(one.sigma_x, fit_kernels(guide, lr_size=lr, steps=1, path="banded").sigma_x)
    low = torch.nn.functional.interpolate(guide, size=lr, mode="bicubic", align_corners=False)
    recon_batched, recon_banded = batched.apply(low), banded.apply(low)
    torch.testing.assert_close(recon_batched, recon_banded, rtol=0, atol=5e-3)
    assert float((recon_batched - recon_banded).abs().mean()) < 2e-4


def test_auto_path_is_banded_on_cpu_and_batched_elsewhere():
    assert pick_path("auto", torch.device("cpu")) == "banded"
    assert pick_path("auto", torch.device("cuda", 0)) == "batched"
    assert pick_path("batched", torch.device("cpu")) == "batched"
    with pytest.raises(ValueError, match="unknown path"):
        pick_path("fused", torch.device("cpu"))


def _ops_per_step(path: str, radius_max: int) -> float:
    guide = photo(32)
    counts = []
    for steps in (2, 4):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fit_kernels(guide, lr_size=(8, 8), steps=steps, radius_max=radius_max, path=path, init_sigma=40.0)
        counts.append(sum(e.count for e in prof.key_averages() if e.key.startswith("aten::")))
    return (counts[1] - counts[0]) / 2


def test_batched_fit_step_costs_few_ops_whatever_the_window():
    """Kernel launches are the GPU's cost at these sizes: the profiler's aten op count per
    fitting step stands in for them (top-level and nested ops alike)."""
    small, large = _ops_per_step("batched", 2), _ops_per_step("batched", 6)
    assert small == large and large < 600
    assert _ops_per_step("banded", 6) > 5 * large  # 113 offsets, one at a time
    assert math.isfinite(small)


def _fit_as_before(guide, size, steps, path):
    """The fitting loop as it was before the step was factored out for CUDA graphs (its own
    copy, the reference): per step a window from the current sigmas, the path's forward and
    gradient, autograd of the parameter maps, Adam and the lr decay."""
    from coz_core.upsample import model as m
    grid = Grid.build(guide.shape[-2:], size)
    target_lr = torch.nn.functional.interpolate(guide, size=size, mode="bicubic", align_corners=False)
    guide_lr = m._range_guide(guide, size)
    raw = torch.stack([torch.full((1, *size), math.log(16.0)), torch.full((1, *size), math.log(16.0)),
                       torch.zeros(1, *size), torch.full((1, *size), math.log(0.12))], 1).requires_grad_(True)
    opt = torch.optim.Adam([raw], lr=0.1)
    offsets = window(grid, math.inf, 8)
    make = m._batched_fit_step if path == "batched" else m._banded_fit_step
    offs = sort_offsets(grid, offsets) if path == "batched" else offsets
    step = make(grid, offs, guide, guide_lr, target_lr, 1, True)
    count = guide.numel()
    losses = []
    for _ in range(steps):
        sx, sy, theta, sr = m._maps(raw)
        coef = coefficients(sx, sy, theta, sr)
        reach = 3.0 * float(torch.maximum(sx, sy).detach().max())
        with torch.no_grad():
            loss, grad = step(coef.detach(), window(grid, reach, 8), count)
        losses.append(float(loss) / count)
        opt.zero_grad(set_to_none=True)
        coef.backward(grad)
        opt.step()
        for group in opt.param_groups:
            group["lr"] *= (1e-9 / 1e-1) ** (1.0 / 5100)
    return losses, m._maps(raw.detach())


@pytest.mark.parametrize("path", ["batched", "banded"])
def test_factored_step_equals_the_loop_before(path):
    """The graph-ready step (``_adam_step``, what CUDA captures) run eagerly on CPU gives the
    same losses and maps, step for step, as the loop before it; the window changes during the
    fit (a 14x scale: 3 sigma reaches a few cells), so several window sizes are exercised."""
    guide = torch.nn.functional.interpolate(photo(64), size=(56, 56), mode="bilinear", align_corners=False)
    size = (4, 4)
    losses, maps = _fit_as_before(guide, size, 12, path)
    k = fit_kernels(guide, lr_size=size, steps=12, path=path, tol=0.0)
    assert len(k.losses) == 12
    torch.testing.assert_close(torch.tensor(k.losses), torch.tensor(losses), rtol=0, atol=0)
    for got, want in zip((k.sigma_x, k.sigma_y, k.theta, k.sigma_r), maps):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_fitting_step_that_cannot_be_captured_goes_on_eagerly(monkeypatch):
    """The fallback's logic on CPU: the warm-up step is a real step, a capture that fails (as a
    CUDA one can) warns once and runs that step eagerly; every later step runs eagerly, none is
    lost or run twice."""
    from coz_core import cuda_graph
    from coz_core.upsample import model

    def failing_capture(work):
        raise cuda_graph.CaptureError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr(cuda_graph, "warm_up", lambda work, times=1: work())  # no side stream here
    monkeypatch.setattr(cuda_graph, "capture", failing_capture)
    ran = []

    def run(window_now):
        ran.append(len(window_now))
        return torch.tensor(float(len(ran))), torch.tensor(1.0)

    step = model._GraphedStep(run, torch.device("cpu"))
    assert float(step._step([1, 2])[0]) == 1  # warm-up
    with pytest.warns(UserWarning, match="could not be captured"):
        assert float(step._step([1, 2])[0]) == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        assert [float(step([1, 2, 3][:k])[0]) for k in (3, 3, 2)] == [3, 4, 5]
    assert ran == [2, 2, 3, 3, 2] and step.eager and step.graph is None

    def out_of_memory(work):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(cuda_graph, "capture", out_of_memory)
    step = model._GraphedStep(run, torch.device("cpu"))
    step._step([1])
    with pytest.raises(torch.OutOfMemoryError):  # memory, not a capture that cannot be: reported
        step._step([1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_fit_equals_eager_fit():
    """On CUDA the graphed fit (capturable Adam, tensor lr) follows the eager fit to float
    rounding, through window changes, and calls back every step."""
    guide = torch.nn.functional.interpolate(photo(64), size=(112, 112), mode="bilinear",
                                            align_corners=False).cuda()
    seen = []
    graphed = fit_kernels(guide, lr_size=(8, 8), steps=20, tol=0.0, path="batched",
                          callback=lambda n, total, loss: seen.append((n, loss)))
    eager = fit_kernels(guide, lr_size=(8, 8), steps=20, tol=0.0, path="batched", cuda_graph=False)
    assert [n for n, _ in seen] == list(range(1, 21)) and [loss for _, loss in seen] == graphed.losses
    # float rounding only (index_add_ on CUDA is not deterministic, eager or graphed)
    torch.testing.assert_close(torch.tensor(graphed.losses), torch.tensor(eager.losses), rtol=1e-3, atol=1e-6)
    # results, not raw maps: Adam turns rounding noise on near-zero gradients (e.g. the angle of an
    # isotropic kernel) into full steps, and capturable Adam rounds differently from eager Adam, so
    # the two fits are two equally good optimisations, not bit twins. Measured on an H200 (20 steps,
    # 112 px guide, 8x8 grid): outputs apart by mean 1.1e-3, max 0.047 (eager vs eager: mean 1e-4,
    # max 0.002); final losses 0.013557 vs 0.013561.
    signal = torch.rand(1, 5, 8, 8, generator=torch.Generator().manual_seed(3)).cuda()
    assert (graphed.apply(signal) - eager.apply(signal)).abs().mean() < 3e-3
