"""Guided upsampling benchmark: bilinear, bicubic, fixed JBU and learned kernels (Upsample
Anything) on tasks with ground truth built from real photos (scikit-image's sample images),
plus the chain's colour fixes. Prints tables; nothing is downloaded.

Tasks (every photo resized to --size, Lanczos; the guide is always the HR photo):
- recon: the guide itself from its bicubic reduction (the fitting objective). PSNR.
- chroma: the photo's CbCr planes (ground truth), area-reduced. PSNR on CbCr.
- kmeans: a 6-colour k-means quantisation of the HR photo (deterministic), one-hot,
  area-reduced to soft probabilities, upsampled, argmax. mIoU against the HR labels. Its
  boundaries are colour edges by construction.
- slic: the same with SLIC superpixels (24 segments; boundaries partly colour edges, partly
  compactness-driven straight lines a guide cannot show).
- features: a deterministic 32-channel feature map: a fixed random projection (seed 0) of the
  7x7 RGB patch around every HR pixel, then ReLU; area-reduced. Mean cosine similarity and
  RMSE against the HR features.
There is no ground-truth depth among the sample images, so there is no depth task.
The learned kernels are fitted once per photo and scale and reused for every task; their
"fit" row gives the fitting time, task rows the apply time only.

Colour fixes: a 3-step zoom chain (coz_core.zoom.run_chain, 4x per step) with an SR stand-in
that sharpens the zoomed input (unsharp mask) and, as diffusion SR models do, drifts colour:
a warm cast on bright regions plus a slight global shift. The same chain without the drift is
the ground truth. PSNR against it, and the mean error on pixels near strong edges (halos).

Peak memory: on CPU the peak resident memory of a forked child running the method, minus its
resident memory at the fork; on CUDA torch.cuda.max_memory_allocated minus what was allocated.

    python benchmarks/bench_upsample.py [--size 256] [--scales 4 8 16] [--images astronaut coffee]
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from coz_core.color import COLOR_METHODS  # noqa: E402
from coz_core.sr.base import SRRequest  # noqa: E402
from coz_core.upsample import fit_kernels, fixed_kernels  # noqa: E402
from coz_core.zoom import ChainConfig, run_chain  # noqa: E402


# --- measurement -----------------------------------------------------------------------------

def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(fn, device: torch.device):
    """(result, seconds, peak extra memory in MB). On CPU the call runs in a forked child whose
    peak resident memory (VmHWM) minus its resident memory at the fork is the peak."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, time.perf_counter() - t, (torch.cuda.max_memory_allocated() - base) / 2**20
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: run, report, exit without cleanup
        try:
            base = _status("VmRSS:")
            t = time.perf_counter()
            out = fn()
            seconds = time.perf_counter() - t
            payload = pickle.dumps((out, seconds, (_status("VmHWM:") - base) / 2**20))
        except BaseException as exc:  # noqa: BLE001 - handed to the parent
            payload = pickle.dumps(exc)
        with os.fdopen(write, "wb") as f:
            f.write(payload)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        result = pickle.loads(f.read())
    os.waitpid(pid, 0)
    if isinstance(result, BaseException):
        raise result
    return result


# --- tasks -----------------------------------------------------------------------------------

def load_photo(name: str, size: int) -> torch.Tensor:
    import skimage.data

    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    img = Image.fromarray(img[..., :3])
    side = min(img.size)  # centre square, then resize
    left, top = (img.width - side) // 2, (img.height - side) // 2
    img = img.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def chroma(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img.unbind(1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    return torch.stack([0.564 * (b - y), 0.713 * (r - y)], 1) + 0.5


def colour_labels(img: torch.Tensor, k: int = 6, iters: int = 20) -> torch.Tensor:
    """k-means colour quantisation (deterministic: centres start at luminance quantiles)."""
    x = img[0].flatten(1).T  # [N, 3]
    lum = x.mean(1)
    centres = x[lum.argsort()[((torch.arange(k) + 0.5) / k * len(x)).long()]]
    for _ in range(iters):
        assign = torch.cdist(x, centres).argmin(1)
        centres = torch.stack([x[assign == c].mean(0) if (assign == c).any() else centres[c] for c in range(k)])
    return torch.cdist(x, centres).argmin(1).view(img.shape[-2:])


def slic_labels(img: torch.Tensor) -> torch.Tensor:
    from skimage.segmentation import slic

    lab = slic(img[0].permute(1, 2, 0).numpy().astype(np.float64), n_segments=24, compactness=10,
               start_label=0, channel_axis=-1)
    return torch.from_numpy(lab).long()


def features(img: torch.Tensor, channels: int = 32, patch: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(channels, 3 * patch * patch, generator=g) / math.sqrt(3 * patch * patch)
    bias = torch.randn(channels, 1, generator=g) * 0.1
    cols = F.unfold(F.pad(img, (patch // 2,) * 4, mode="reflect"), patch)  # [1, 3*p*p, H*W]
    return F.relu(proj @ cols[0] + bias).view(1, channels, *img.shape[-2:])


def psnr(a: torch.Tensor, b: torch.Tensor, peak: float = 1.0) -> float:
    return 10 * math.log10(peak**2 / float(((a.double() - b.double()) ** 2).mean()))


def miou(pred: torch.Tensor, truth: torch.Tensor) -> float:
    ious = []
    for c in truth.unique():
        p, t = pred == c, truth == c
        ious.append(float((p & t).sum()) / float((p | t).sum()))
    return float(np.mean(ious))


# --- methods ---------------------------------------------------------------------------------

def interpolate(mode):
    def run(signal, size, kind):
        out = F.interpolate(signal, size=size, mode=mode, align_corners=False)
        if kind == "probabilities":
            out = out.clamp(min=0)
            out = out / out.sum(1, keepdim=True).clamp_min(1e-12)
        return out
    return run


def upsample_table(names: list[str], size: int, scales: list[int], steps: int, device: torch.device,
                   path: str = "auto") -> None:
    print(f"\n## Guided upsampling, {size}x{size} photos: {', '.join(names)}; torch threads "
          f"{torch.get_num_threads()}, device {device}, path {path}")
    print(f"{'task':9s} {'scale':>5s} {'method':9s} {'quality':>20s} {'seconds':>8s} {'peak MB':>8s}")
    rows: dict[tuple, list] = {}
    for name in names:
        hr = load_photo(name, size).to(device)
        truths = {"chroma": chroma(hr), "kmeans": colour_labels(hr.cpu()).to(device),
                  "slic": slic_labels(hr.cpu()).to(device), "features": features(hr)}
        for s in scales:
            lr_size = (size // s, size // s)
            signals = {
                "recon": (F.interpolate(hr, size=lr_size, mode="bicubic", align_corners=False), "features"),
                "chroma": (F.adaptive_avg_pool2d(truths["chroma"], lr_size), "features"),
                **{task: (F.adaptive_avg_pool2d(F.one_hot(truths[task]).permute(2, 0, 1)[None].float(),
                                                lr_size), "probabilities") for task in ("kmeans", "slic")},
                "features": (F.adaptive_avg_pool2d(truths["features"], lr_size), "features"),
            }
            learned, fit_s, fit_mb = measure(lambda: fit_kernels(hr, lr_size=lr_size, steps=steps, path=path), device)
            rows.setdefault(("fit", s, "learned"), []).append((float("nan"), fit_s, fit_mb, len(learned.losses)))
            fixed = fixed_kernels(hr, lr_size=lr_size)
            methods = {
                "bilinear": interpolate("bilinear"),
                "bicubic": interpolate("bicubic"),
                "fixed": lambda sig, sz, kind: fixed.apply(sig, kind=kind, path=path),
                "learned": lambda sig, sz, kind: learned.apply(sig, kind=kind, path=path),
            }
            for task, (signal, kind) in signals.items():
                for method, run in methods.items():
                    out, sec, mb = measure(lambda: run(signal, (size, size), kind), device)
                    rows.setdefault((task, s, method), []).append((score(task, out, hr, truths), sec, mb))
    for (task, s, method), vals in rows.items():
        sec = np.mean([v[1] for v in vals])
        mb = np.max([v[2] for v in vals])
        if task == "fit":
            quality = f"{np.mean([v[3] for v in vals]):.0f} steps"
        else:
            q = np.array([v[0] for v in vals])
            quality = " ".join(f"{x:.3f}" if abs(x) < 2 else f"{x:.2f}" for x in q.mean(0))
        print(f"{task:9s} {'x' + str(s):>5s} {method:9s} {quality:>20s} {sec:8.3f} {mb:8.1f}")
    print("quality: recon, chroma: PSNR dB; kmeans, slic: mIoU; features: cosine RMSE (means over photos)")


def score(task, out, hr, truths):
    if task == "recon":
        return [psnr(out.clamp(0, 1), hr)]
    if task == "chroma":
        return [psnr(out, truths["chroma"])]
    if task in ("kmeans", "slic"):
        return [miou(out.argmax(1)[0], truths[task])]
    f = truths["features"]
    cos = F.cosine_similarity(out, f, dim=1, eps=1e-8).mean()
    return [float(cos), float(((out - f) ** 2).mean().sqrt())]


# --- colour fixes on a zoom chain ------------------------------------------------------------

class DriftSR:
    """SR stand-in: unsharp-masked zoomed input, optionally with a diffusion-like colour drift."""

    name, size_multiple, uses_prompt = "drift-sr", 1, False

    def __init__(self, drift: bool):
        self.drift = drift

    def __call__(self, request: SRRequest) -> torch.Tensor:
        x = request.zoomed
        blur = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
        out = x + 0.8 * (x - blur)
        if self.drift:
            bright = torch.sigmoid((x.mean(1, keepdim=True) - 0.5) * 30)
            cast = torch.tensor([0.07, 0.0, -0.06], device=x.device)[:, None, None]
            out = out + bright * cast + torch.tensor([0.0, 0.02, 0.02], device=x.device)[:, None, None]
        return out.clamp(0, 1)


def color_table(names: list[str], size: int) -> None:
    print(f"\n## Colour fixes on a 3-step x4 zoom chain at {size}x{size} (sharpening SR with colour drift)")
    print(f"{'method':10s} {'PSNR dB':>8s} {'edge MAE':>9s} {'flat MAE':>9s} {'seconds/step':>13s}")
    results: dict[str, list] = {}
    for name in names:
        img = load_photo(name, size)
        cfg = dict(steps=3, zoom=4.0, size=(size, size))
        truth = run_chain(img, DriftSR(False), ChainConfig(color="none", **cfg)).final
        gray = truth.mean(1, keepdim=True)
        grad = (gray[..., 1:, 1:] - gray[..., :-1, 1:]).abs() + (gray[..., 1:, 1:] - gray[..., 1:, :-1]).abs()
        grad = F.pad(grad, (1, 0, 1, 0))
        edges = F.max_pool2d((grad > grad.quantile(0.9)).float(), 9, stride=1, padding=4) > 0
        for method in COLOR_METHODS:
            t = time.perf_counter()
            out = run_chain(img, DriftSR(True), ChainConfig(color=method, **cfg)).final
            sec = (time.perf_counter() - t) / 3
            err = (out - truth).abs().mean(1, keepdim=True)
            results.setdefault(method, []).append((psnr(out, truth), float(err[edges].mean()),
                                                    float(err[~edges].mean()), sec))
    for method, vals in results.items():
        v = np.array(vals).mean(0)
        print(f"{method:10s} {v[0]:8.2f} {v[1]:9.4f} {v[2]:9.4f} {v[3]:13.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--scales", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--images", nargs="+", default=["astronaut", "coffee", "chelsea", "rocket"])
    ap.add_argument("--steps", type=int, default=50, help="fitting steps of the learned kernels")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--skip-color", action="store_true")
    ap.add_argument("--path", default="auto", choices=["auto", "banded", "batched"],
                    help="the upsampler's implementation (coz_core.upsample.model.pick_path)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with torch.no_grad():
        upsample_table(args.images, args.size, args.scales, args.steps, device, args.path)
    if not args.skip_color:
        color_table(args.images, args.size)


if __name__ == "__main__":
    main()
