"""Bilateral kernels on an LR grid, guided by an HR image: fitted (Upsample Anything) or fixed
(classic joint bilateral upsampling), then applied to any signal on that grid.

    kernels = fit_kernels(guide, lr_size=(h, w))          # test-time fit, ~50 Adam steps
    depth_hr = kernels.apply(depth_lr)                    # reuse for every signal on the grid
    mask_hr = kernels.apply(mask_lr, kind="mask")
    feats_hr = guided_upsample(feats_lr, guide)           # one call: fit + apply

The fit follows the paper: the guide is downsampled to the LR grid (bicubic), upsampled back
with the kernels, and the L1 error to the guide is minimised with Adam (lr 0.1, the reference's
exponential decay) over log sigma_x, log sigma_y, theta (through pi * tanh) and log sigma_r,
initialised at 16, 16, 0 and 0.12. The range term compares each HR guide pixel with the LR
guide (bilinear) at the neighbour's cell.

Where this differs from the reference code, by design: neighbours off the LR grid are left
out (the reference clamps them to the border, counting border cells several times); the
window is the reference's largest (the disc of radius 8 cells), trimmed to 3 sigma of the
widest kernel in HR pixels (the reference compares 2 sigma in HR pixels with a radius in LR
cells, so it never trims below 8 cells at x4); any scale works, also non-integer and
different per axis; the range terms are computed once per fit and the gradient is written by
hand; the fit stops early once the loss stalls. At the reference's 224 x 224, x4 test the
fitted reconstruction is slightly better than the reference's (40.9 vs 40.8 dB).

Two implementations of the same maths (``pick_path``): kernel.py (one neighbour offset at a
time with small ops; the CPU default) and batched.py (all offsets of a band in a few large ops,
a fixed number per fitting step whatever the window; the default on GPUs). The tests compare
them on CPU. On CUDA the batched path's whole fitting step (forward, gradient, Adam, lr decay:
``_adam_step``) is captured once per window size and replayed as a CUDA graph (``_GraphedStep``).
``fit_kernels`` reports every step to a callback (progress, cancel) and can fit on a reduced
copy of the guide (``fit_side``) to bound the cost on CPUs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .. import cuda_graph
from .batched import BatchedBand, prefix, sort_offsets
from .grid import Grid
from .kernel import Band, FitBand, coefficients, pad_lr, window

KINDS = ("features", "latent", "depth", "mask", "probabilities")
PATHS = ("auto", "banded", "batched")
_MEMORY = 256 * 2**20  # bytes of weights held at once (one band of rows)
_RANGE_CACHE = 1024 * 2**20  # bytes of range terms kept across fitting steps

# called after every fitting step with (step, steps, loss); returning True ends the fit there
StepCallback = Callable[[int, int, float], "bool | None"]


def pick_path(path: str, device: torch.device) -> str:
    """"auto": the banded path (kernel.py, one neighbour offset at a time) on CPUs, the batched
    path (batched.py, all offsets of a band in a few large ops) elsewhere. Measured on an idle
    2-core CPU, a fitting step of the banded path takes 40 to 80 ms at 128 to 256 px guides,
    the batched path 1.3x to 3.7x longer; on a GPU the banded path's many small ops are
    launch-bound (1.5x to 4x slower than the reference there)."""
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; choose one of {PATHS}")
    if path != "auto":
        return path
    return "banded" if device.type == "cpu" else "batched"


@dataclass
class BilateralKernels:
    """Per-cell kernel maps on an LR grid (each [B, h, w]; sigmas in HR pixels, theta in
    radians) and the guide they belong to. ``apply`` upsamples any signal on that grid."""

    sigma_x: torch.Tensor
    sigma_y: torch.Tensor
    theta: torch.Tensor
    sigma_r: torch.Tensor
    guide: torch.Tensor  # [B, Cg, H, W] float32
    guide_lr: torch.Tensor  # [B, Cg, h, w] float32, the range term's reference colours
    truncate: float = 3.0
    radius_max: int = 8
    losses: list[float] = field(default_factory=list)  # fitting loss per step (empty if fixed)

    @property
    def lr_size(self) -> tuple[int, int]:
        return tuple(self.sigma_x.shape[-2:])

    @property
    def hr_size(self) -> tuple[int, int]:
        return tuple(self.guide.shape[-2:])

    @property
    def grid(self) -> Grid:
        return Grid.build(self.hr_size, self.lr_size)

    def coefficients(self) -> torch.Tensor:
        return coefficients(self.sigma_x, self.sigma_y, self.theta, self.sigma_r)

    def offsets(self) -> list[tuple[int, int]]:
        reach = self.truncate * float(torch.maximum(self.sigma_x, self.sigma_y).max())
        return window(self.grid, reach, self.radius_max)

    def apply(self, signal: torch.Tensor, kind: str = "features", out_dtype: torch.dtype | None = None,
              channel_chunk: int = 64, accumulate_dtype: torch.dtype | None = None,
              path: str = "auto") -> torch.Tensor:
        """Upsample ``signal`` [B, C, h, w] (B equal to the kernels' batch, or either of them 1)
        to [B, C, H, W].

        ``kind``: "features", "latent", "depth" keep their values and scale (each output is a
        convex combination of input values); "mask" needs values in 0..1 and stays there;
        "probabilities" needs channels summing to 1 and stays normalised.
        ``out_dtype`` defaults to the signal's floating dtype. Channels are processed at most
        ``channel_chunk`` at a time (fewer on large images, to bound memory) and accumulate in
        ``accumulate_dtype``: by default float16 on CUDA (mixed precision; weights are always
        computed in float32) when the signal's values fit, float32 otherwise. ``path``: see
        ``pick_path`` (both give the same result; the batched path ignores ``channel_chunk`` and
        sizes its chunks by memory).
        """
        signal = _check_signal(signal, kind, self)
        b = max(signal.shape[0], self.guide.shape[0])
        out_dtype = out_dtype or (signal.dtype if signal.is_floating_point() else torch.float32)
        fold = self.guide.shape[0] == 1 and signal.shape[0] > 1  # one guide, many signals
        if fold:
            signal = signal.reshape(1, -1, *signal.shape[-2:])
        elif signal.shape[0] == 1 and b > 1:
            signal = signal.expand(b, -1, -1, -1)
        device = self.guide.device
        acc_dtype = accumulate_dtype or (
            torch.float16 if device.type == "cuda" and _fits_half(signal) else torch.float32)
        signal = signal.to(device)
        if pick_path(path, device) == "batched":
            out = _upsample_batched(self, signal, out_dtype, acc_dtype)
        else:
            out = _upsample(self, signal, out_dtype, acc_dtype, channel_chunk)
        if fold:
            out = out.reshape(b, -1, *out.shape[-2:])
        return _finish(out, kind)

    def to(self, device: torch.device | str) -> "BilateralKernels":
        move = {k: getattr(self, k).to(device) for k in ("sigma_x", "sigma_y", "theta", "sigma_r",
                                                            "guide", "guide_lr")}
        return BilateralKernels(**move, truncate=self.truncate, radius_max=self.radius_max,
                                losses=list(self.losses))


def fit_kernels(guide_hr: torch.Tensor, lr_size: tuple[int, int] | None = None,
                scale: float | tuple[float, float] | None = None, steps: int = 50, lr: float = 0.1,
                init_sigma: float = 16.0, init_sigma_r: float = 0.12, truncate: float = 3.0,
                radius_max: int = 8, tol: float = 1e-3, patience: int = 5,
                callback: StepCallback | None = None, path: str = "auto",
                fit_side: int | None = None, cuda_graph: bool = True) -> BilateralKernels:
    """Fit per-cell kernels to ``guide_hr`` [B, Cg, H, W] on the LR grid ``lr_size`` (h, w), or
    on (round(H / scale), round(W / scale)).

    Up to ``steps`` Adam steps; stops early once the loss has improved by less than ``tol``
    (relative) over the last ``patience`` steps. Guides of any channel count and value range
    work; sigma_r is in guide units (0.12 suits 0..1 images), ``init_sigma`` in HR pixels.
    ``callback(step, steps, loss)`` runs after every step
    (progress; it may raise to abort, or return True to end the fit with the kernels fitted so
    far). ``path``: see ``pick_path``. ``fit_side``: fit on the guide resized (antialiased) so
    its longer side is at most this many pixels, on the same LR grid, and scale the sigmas back
    (the fit's cost is proportional to the guide's pixels; None: the full guide).
    ``cuda_graph``: on CUDA with the batched path, replay each fitting step (forward, gradient,
    Adam, lr decay) as one CUDA graph (``_GraphedStep``) instead of ~450 kernel launches; the
    loss and the largest sigma are still read once per step (the window depends on the sigmas),
    so the callback and the early stop see every step's loss. Adam then runs with
    ``capturable=True`` and a tensor lr: an equally good fit, not a bit twin of the eager one
    (H200, 20 steps: final loss 0.013561 vs 0.013557, outputs apart by 1e-3 on average, 10x the
    run-to-run noise of the eager fit); 56x56x1 at 224 px: 81 ms instead of 159 ms. Ignored
    elsewhere.
    """
    guide = _check_guide(guide_hr)
    size = _lr_size(guide, lr_size, scale)
    hr = guide.shape[-2:]
    # the small LR parameter maps go through autograd; ComfyUI runs nodes in inference mode
    with torch.inference_mode(False), torch.enable_grad():
        factor = _fit_factor(hr, size, fit_side)
        if factor == 1.0:
            return _fit(guide, size, steps, lr, init_sigma, init_sigma_r, truncate, radius_max, tol,
                        patience, callback, path, cuda_graph)
        small_size = (max(size[0], round(hr[0] / factor)), max(size[1], round(hr[1] / factor)))
        small = F.interpolate(guide, size=small_size, mode="bilinear", antialias=True, align_corners=False)
        factor = math.sqrt(hr[0] / small_size[0] * hr[1] / small_size[1])  # as rounded
        k = _fit(small, size, steps, lr, init_sigma / factor, init_sigma_r, truncate, radius_max, tol,
                 patience, callback, path, cuda_graph)
    return BilateralKernels(k.sigma_x * factor, k.sigma_y * factor, k.theta, k.sigma_r, guide,
                            _range_guide(guide, size), truncate, radius_max, k.losses)


def _fit_factor(hr, size, fit_side: int | None) -> float:
    """How much to shrink the guide for the fit: to ``fit_side`` on its longer side, never below
    the LR grid."""
    if fit_side is None or max(hr) <= fit_side:
        return 1.0
    if fit_side < 1:
        raise ValueError(f"fit_side must be a positive number of pixels, got {fit_side}")
    return max(1.0, min(max(hr) / fit_side, hr[0] / size[0], hr[1] / size[1]))


def _fit(guide, size, steps, lr, init_sigma, init_sigma_r, truncate, radius_max, tol, patience,
         callback, path, cuda_graph=True) -> BilateralKernels:
    if guide.is_inference():  # made under inference mode: a normal copy
        guide = guide.clone()
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = Grid.build(guide.shape[-2:], size)
    target_lr = F.interpolate(guide, size=size, mode="bicubic", align_corners=False)
    guide_lr = _range_guide(guide, size)
    b = guide.shape[0]
    raw = torch.stack([
        torch.full((b, *size), math.log(init_sigma)),
        torch.full((b, *size), math.log(init_sigma)),
        torch.zeros(b, *size),
        torch.full((b, *size), math.log(init_sigma_r)),
    ], 1).to(guide.device).requires_grad_(True)
    decay = (1e-9 / 1e-1) ** (1.0 / 5100)  # the reference's schedule: 0.1 -> 1e-9 over 5100 steps

    offsets = window(grid, math.inf, radius_max)  # each step uses the part its sigmas reach
    cache = b * len(offsets) * guide.shape[-2] * guide.shape[-1] * 4 <= _RANGE_CACHE
    if pick_path(path, guide.device) == "batched":
        step = _batched_fit_step(grid, sort_offsets(grid, offsets), guide, guide_lr, target_lr, b, cache)
    else:
        step = _banded_fit_step(grid, offsets, guide, guide_lr, target_lr, b, cache)
    count = b * guide.shape[1] * guide.shape[-2] * guide.shape[-1]
    negligible = 1e-6 * float(guide.abs().mean())  # float rounding: nothing left to fit
    graphed = cuda_graph and guide.device.type == "cuda" and pick_path(path, guide.device) == "batched"
    if graphed:  # graph-safe Adam: step count and lr live on the device, decayed inside the graph
        opt = torch.optim.Adam([raw], lr=torch.tensor(lr, device=guide.device), capturable=True)
    else:
        opt = torch.optim.Adam([raw], lr=lr)
    run = _adam_step(raw, opt, step, count, decay)
    run = _GraphedStep(run, guide.device) if graphed else run
    losses: list[float] = []
    reach = truncate * float(torch.maximum(*_maps(raw)[:2]).detach().max())
    for n in range(steps):
        loss, sigma_max = run(window(grid, reach, radius_max))
        # one host sync per step: the next step's window (trimmed at 3 sigma) needs the sigmas
        losses.append(float(loss) / count)
        reach = truncate * float(sigma_max)
        stop = callback is not None and callback(n + 1, steps, losses[-1])
        stalled = len(losses) > patience and losses[-1] >= losses[-1 - patience] * (1.0 - tol)
        if stop or stalled or losses[-1] <= negligible:
            break
    sx, sy, theta, sr = (m.detach() for m in _maps(raw))
    return BilateralKernels(sx, sy, theta, sr, guide, guide_lr, truncate, radius_max, losses)


def _adam_step(raw: torch.Tensor, opt: torch.optim.Adam, fit_step: "FitStep", count: int,
               decay: float) -> Callable[[list], tuple[torch.Tensor, torch.Tensor]]:
    """One whole fitting step as a function of the active window: forward and hand-written
    gradient (``fit_step``), backward through the parameter maps, Adam, lr decay. Returns (loss
    sum, largest sigma after the update) as device tensors, without a host sync. Run eagerly on
    CPUs; on CUDA this same function is what ``_GraphedStep`` captures (no Python scalar in it
    changes between steps: with a tensor lr the decay is an in-place multiply)."""
    group = opt.param_groups[0]

    def run(window_now: list) -> tuple[torch.Tensor, torch.Tensor]:
        sx, sy, theta, sr = _maps(raw)
        coef = coefficients(sx, sy, theta, sr)
        with torch.no_grad():
            loss, grad = fit_step(coef.detach(), window_now, count)
        opt.zero_grad(set_to_none=False)  # keeps raw.grad one static buffer (zero + g == g)
        coef.backward(grad)
        opt.step()
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].mul_(decay)
        else:
            group["lr"] *= decay
        with torch.no_grad():
            sigma_max = torch.maximum(raw[:, 0].exp(), raw[:, 1].exp()).max()
        return loss, sigma_max
    return run


class _GraphedStep:
    """Replays a CUDA graph of ``run`` (``_adam_step``) for every step with the same window size
    (the window is a prefix of the sorted offsets, so its size fixes every shape). At a new size
    the first step runs eagerly on a side stream (PyTorch's warm-up before capture; it is a real
    step of the fit), the next one is captured and replayed. One graph is held at a time: its
    memory pool is about one eager step's peak. A step that cannot be captured warns, and the
    fit goes on eagerly."""

    def __init__(self, run: Callable[[list], tuple[torch.Tensor, torch.Tensor]], device: torch.device):
        self.run, self.device = run, device
        self.k: int | None = None  # window size of the held graph
        self.warm: int | None = None  # window size of the last eager warm-up step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: tuple[torch.Tensor, torch.Tensor] | None = None
        self.eager = False  # a capture failed

    def __call__(self, window_now: list) -> tuple[torch.Tensor, torch.Tensor]:
        if self.eager:
            return self.run(window_now)
        with torch.cuda.device(self.device):  # streams and capture on the fit's device
            return self._step(window_now)

    def _step(self, window_now: list) -> tuple[torch.Tensor, torch.Tensor]:
        k = len(window_now)
        if self.graph is not None and k == self.k:
            self.graph.replay()
            return self.out
        if self.warm != k:
            self.warm = k
            return cuda_graph.warm_up(lambda: self.run(window_now))
        self.graph = self.out = None  # free the previous graph's pool first
        try:
            self.graph, self.out = cuda_graph.capture(lambda: self.run(window_now))
        except cuda_graph.CaptureError as exc:
            self.eager = True
            cuda_graph.warn_uncaptured("the upsampler's fitting step", exc, "the fit goes on uncaptured, slower")
            return self.run(window_now)
        self.k = k
        return self.out


FitStep = Callable[[torch.Tensor, list, int], "tuple[torch.Tensor, torch.Tensor]"]


def _banded_fit_step(grid: Grid, offsets, guide, guide_lr, target_lr, b: int, cache: bool) -> FitStep:
    """One fitting step's forward and backward over bands of LR rows, one offset at a time:
    (coefficients [B, 4, h, w], active offsets, pixel count) -> (L1 loss sum, d loss / d coef)."""
    size = grid.lr_size
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    # the bands read the (padded) coefficients through views and write gradients likewise
    coef_now = torch.empty(b, 4, size[0] + 2 * pad, size[1] + 2 * pad, device=guide.device)
    grad = torch.empty_like(coef_now)
    bands = []
    for rows in _bands(grid, len(offsets), b):
        cells = grid.to_cells(guide, rows)
        mask = grid.valid_cells(rows, guide.device).to(guide.dtype)
        bands.append((FitBand(grid, offsets, rows, pad, coef_now, cells, guide_lr, target_lr, grad, cache),
                      cells, mask))

    def step(coef: torch.Tensor, window_now: list, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        active = set(window_now)
        total = 0.0
        coef_now.copy_(pad_lr(coef, pad))
        grad.zero_()
        for band, cells, mask in bands:
            shifts = [s for s in band.shifts if (s.dy, s.dx) in active]
            weights, out = band.forward(shifts)
            diff = (out - cells).mul_(mask)
            total += float(diff.abs().sum())
            band.accumulate_grad(weights, shifts, diff.sign_().mul_(mask).div_(count))
        return torch.tensor(total), grad[:, :, pad:pad + size[0], pad:pad + size[1]]
    return step


def _batched_fit_step(grid: Grid, offsets, guide, guide_lr, target_lr, b: int, cache: bool) -> FitStep:
    """``_banded_fit_step`` with all offsets of a band at once (batched.py): ~30 ops per band
    and step; the loss stays on the device."""
    size = grid.lr_size
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    coef_now = torch.empty(b, 4, size[0] + 2 * pad, size[1] + 2 * pad, device=guide.device)
    grad = torch.empty_like(coef_now)
    signal = pad_lr(target_lr, pad)
    bands = []
    for rows in _bands_batched(grid, len(offsets), b, guide.device):
        band = BatchedBand(grid, offsets, rows, pad, guide, guide_lr, cache)
        near = band.neighbours(signal, len(offsets)).contiguous()  # [B, n, w, C, K], fixed
        target = band.cells.permute(0, 2, 3, 1, 4, 5)  # [B, n, w, C, Ly, Lx]
        mask = grid.valid_cell_major(rows, guide.device).to(guide.dtype)
        bands.append((band, near, target, mask))

    def step(coef: torch.Tensor, window_now: list, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = prefix(grid, offsets, window_now)
        coef_now.copy_(pad_lr(coef, pad))
        grad.zero_()
        total = torch.zeros((), device=guide.device)
        for band, near, target, mask in bands:
            near = near[..., :k]
            w, tot = band.weights(coef_now, k)
            out = band._matmul(near, w, tot)
            diff = (out - target).mul_(mask)
            total += diff.abs().sum()
            band.accumulate_grad(w, tot, near, out, diff.sign_().mul_(mask).div_(count), grad)
        return total, grad[:, :, pad:pad + size[0], pad:pad + size[1]]
    return step


def fixed_kernels(guide_hr: torch.Tensor, lr_size: tuple[int, int] | None = None,
                  scale: float | tuple[float, float] | None = None, sigma_spatial: float | None = None,
                  sigma_range: float = 0.1, truncate: float = 3.0, radius_max: int = 8) -> BilateralKernels:
    """Classic joint bilateral upsampling: the same isotropic kernel in every cell, no fitting.
    ``sigma_spatial`` is in HR pixels (default: one LR cell, the larger of the two scales);
    ``sigma_range`` in guide units."""
    guide = _check_guide(guide_hr)
    size = _lr_size(guide, lr_size, scale)
    if sigma_spatial is None:
        sigma_spatial = max(guide.shape[-2] / size[0], guide.shape[-1] / size[1])
    if not sigma_spatial > 0 or not sigma_range > 0:
        raise ValueError(f"sigmas must be positive, got spatial {sigma_spatial}, range {sigma_range}")
    full = lambda v: torch.full((guide.shape[0], *size), float(v), device=guide.device)  # noqa: E731
    return BilateralKernels(full(sigma_spatial), full(sigma_spatial), full(0.0), full(sigma_range),
                            guide, _range_guide(guide, size), truncate, radius_max)


def guided_upsample(signal_lr: torch.Tensor, guide_hr: torch.Tensor, mode: str = "learned",
                    kind: str = "features", **options) -> torch.Tensor:
    """Upsample ``signal_lr`` [B, C, h, w] to the size of ``guide_hr`` [B, Cg, H, W] along the
    guide's edges. ``mode``: "learned" (``fit_kernels``) or "fixed" (``fixed_kernels``);
    ``options`` go to that function."""
    if mode not in ("learned", "fixed"):
        raise ValueError(f"unknown mode {mode!r}; choose 'learned' or 'fixed'")
    if signal_lr.ndim != 4:
        raise ValueError(f"expected a signal [B, C, h, w], got shape {tuple(signal_lr.shape)}")
    make = fit_kernels if mode == "learned" else fixed_kernels
    return make(guide_hr, lr_size=tuple(signal_lr.shape[-2:]), **options).apply(signal_lr, kind=kind)


# --- internals -------------------------------------------------------------------------------

def _maps(raw: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return raw[:, 0].exp(), raw[:, 1].exp(), math.pi * torch.tanh(raw[:, 2]), raw[:, 3].exp()


def _range_guide(guide: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(guide, size=size, mode="bilinear", align_corners=False)


def _bands(grid: Grid, n_offsets: int, batch: int) -> list[tuple[int, int]]:
    """Split the LR rows so one band's weights stay within the memory budget."""
    row_bytes = batch * n_offsets * grid.y.width * grid.x.lr * grid.x.width * 4
    per_band = max(1, _MEMORY // max(row_bytes, 1))
    return [(lo, min(lo + per_band, grid.y.lr)) for lo in range(0, grid.y.lr, per_band)]


def _bands_batched(grid: Grid, n_offsets: int, batch: int, device: torch.device) -> list[tuple[int, int]]:
    """LR row bands for the batched path: one [B, n, w, K, Ly, Lx] float32 tensor within
    ``_MEMORY`` (a fitting step holds about five of them)."""
    row_bytes = batch * n_offsets * grid.x.lr * grid.y.width * grid.x.width * 4
    per_band = max(1, _MEMORY // max(row_bytes, 1))
    return [(lo, min(lo + per_band, grid.y.lr)) for lo in range(0, grid.y.lr, per_band)]


def _upsample_batched(k: BilateralKernels, signal: torch.Tensor, out_dtype: torch.dtype,
                      acc_dtype: torch.dtype) -> torch.Tensor:
    """``_upsample`` through batched.py: per band one weight computation, then one batched
    matmul per channel chunk."""
    grid = k.grid
    offsets = sort_offsets(grid, k.offsets())
    b, c = signal.shape[:2]
    out = torch.empty(b, c, *k.hr_size, dtype=out_dtype, device=signal.device)
    guide = k.guide.expand(b, -1, -1, -1) if k.guide.shape[0] < b else k.guide
    guide_lr = k.guide_lr.expand(b, -1, -1, -1) if k.guide_lr.shape[0] < b else k.guide_lr
    coef = k.coefficients()
    coef = coef.expand(b, -1, -1, -1) if coef.shape[0] < b else coef
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    coef_padded = pad_lr(coef, pad)
    elt = torch.finfo(acc_dtype).bits // 8
    with torch.no_grad():
        for rows in _bands_batched(grid, len(offsets), b, signal.device):
            band = BatchedBand(grid, offsets, rows, pad, guide, guide_lr)
            w, total = band.weights(coef_padded, len(offsets))
            w = w.to(acc_dtype)
            y0, y1 = int(grid.y.start[rows[0]]), int(grid.y.start[rows[1]])
            # per channel: its neighbours [.., K], the matmul's output and its copy to the image
            cells = b * band.n * band.w
            per_channel = cells * (len(offsets) + 3 * band.ly * band.lx) * elt
            chunk = max(1, min(c, _MEMORY // per_channel))
            for c0 in range(0, c, chunk):
                part = pad_lr(signal[:, c0:c0 + chunk].to(acc_dtype), pad)
                acc = band.weighted_sum(w, total, part)
                out[:, c0:c0 + chunk, y0:y1] = grid.from_cell_major(acc, rows).to(out_dtype)
    return out


def _upsample(k: BilateralKernels, signal: torch.Tensor, out_dtype: torch.dtype,
              acc_dtype: torch.dtype, channel_chunk: int) -> torch.Tensor:
    grid, coef = k.grid, k.coefficients()
    offsets = k.offsets()
    b, c = signal.shape[:2]
    out = torch.empty(b, c, *k.hr_size, dtype=out_dtype, device=signal.device)
    guide = k.guide.expand(b, -1, -1, -1) if k.guide.shape[0] < b else k.guide
    guide_lr = k.guide_lr.expand(b, -1, -1, -1) if k.guide_lr.shape[0] < b else k.guide_lr
    coef = coef.expand(b, -1, -1, -1) if coef.shape[0] < b else coef
    pad = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
    coef_padded = pad_lr(coef, pad)
    with torch.no_grad():
        for rows in _bands(grid, len(offsets), b):
            cells = grid.to_cells(guide, rows)
            band = Band(grid, offsets, rows, pad, coef_padded, cells, guide_lr)
            ws = [w.to(acc_dtype) for w in band.weights(band.shifts)]
            y0, y1 = int(grid.y.start[rows[0]]), int(grid.y.start[rows[1]])
            # an accumulator and the ~3 copies of it that leave the cell layout stay in budget
            chunk = max(1, min(channel_chunk, _MEMORY // (16 * b * cells[0, 0].numel())))
            for c0 in range(0, c, chunk):
                part = signal[:, c0:c0 + chunk].to(acc_dtype)
                acc = torch.zeros(b, part.shape[1], *cells.shape[2:], dtype=acc_dtype, device=signal.device)
                band.weighted_sum(ws, band.shifts, part, acc)
                out[:, c0:c0 + chunk, y0:y1] = grid.from_cells(acc, rows).to(out_dtype)
    return out


def _fits_half(signal: torch.Tensor) -> bool:
    return float(signal.abs().max()) < 3e4


def _finish(out: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "mask":
        return out.clamp_(0, 1)
    if kind == "probabilities":
        out = out.clamp_(min=0)
        return out / out.sum(1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)
    return out


def _check_guide(guide: torch.Tensor) -> torch.Tensor:
    if not isinstance(guide, torch.Tensor) or guide.ndim != 4:
        shape = tuple(guide.shape) if isinstance(guide, torch.Tensor) else type(guide).__name__
        raise ValueError(f"expected a guide image [B, C, H, W], got {shape}")
    if guide.numel() == 0:
        raise ValueError(f"the guide is empty: shape {tuple(guide.shape)}")
    guide = guide.float()
    if not torch.isfinite(guide).all():
        raise ValueError("the guide contains NaN or infinite values; clean it (e.g. torch.nan_to_num) first")
    return guide


def _lr_size(guide: torch.Tensor, lr_size, scale) -> tuple[int, int]:
    hr = guide.shape[-2:]
    if (lr_size is None) == (scale is None):
        raise ValueError("give exactly one of lr_size=(h, w) or scale (a number or (sy, sx))")
    if lr_size is None:
        sy, sx = (scale, scale) if isinstance(scale, (int, float)) else scale
        if not (sy >= 1 and sx >= 1):
            raise ValueError(f"scale must be >= 1 (this is an upsampler), got {scale}")
        lr_size = (max(1, round(hr[0] / sy)), max(1, round(hr[1] / sx)))
    h, w = (int(v) for v in lr_size)
    if h < 1 or w < 1:
        raise ValueError(f"low-res size must be positive, got {lr_size}")
    if h > hr[0] or w > hr[1]:
        raise ValueError(f"low-res size {(h, w)} is larger than the guide {tuple(hr)}: scale must be >= 1")
    return h, w


def _check_signal(signal: torch.Tensor, kind: str, k: BilateralKernels) -> torch.Tensor:
    if kind not in KINDS:
        raise ValueError(f"unknown signal kind {kind!r}; choose one of {KINDS}")
    if not isinstance(signal, torch.Tensor) or signal.ndim != 4:
        shape = tuple(signal.shape) if isinstance(signal, torch.Tensor) else type(signal).__name__
        raise ValueError(f"expected a signal [B, C, h, w] (a mask [B, h, w] needs [:, None]), got {shape}")
    if signal.numel() == 0:
        raise ValueError(f"the signal is empty: shape {tuple(signal.shape)}")
    if tuple(signal.shape[-2:]) != k.lr_size:
        raise ValueError(f"signal size {tuple(signal.shape[-2:])} does not match the kernels' low-res "
                         f"grid {k.lr_size}; fit the kernels with lr_size={tuple(signal.shape[-2:])}")
    bs, bk = signal.shape[0], k.guide.shape[0]
    if bs != bk and 1 not in (bs, bk):
        raise ValueError(f"signal batch {bs} and guide batch {bk} differ; use equal batches or one of them 1")
    if not torch.isfinite(signal).all():
        raise ValueError("the signal contains NaN or infinite values; clean it (e.g. torch.nan_to_num) first")
    if kind == "mask" and (signal.min() < 0 or signal.max() > 1):
        raise ValueError(f"a mask must lie in 0..1, got {float(signal.min()):.4g}..{float(signal.max()):.4g}")
    if kind == "probabilities":
        sums = signal.float().sum(1)
        if signal.min() < 0 or not torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
            raise ValueError("probabilities must be non-negative and sum to 1 over channels "
                             "(apply softmax over dim 1 first)")
    return signal
