"""The learned bilateral upsampler beside the reference Upsample Anything (its own code, unmodified):
time, peak memory and quality at the sizes of the paper's feature and depth use.

Rows (guide photo: skimage's astronaut, Lanczos-resized; 50 fitting steps, as the reference):
- 224 guide, 16x16x384 features; 448 guide, 32x32x384 features: the signal is a deterministic
  384-channel feature map of the HR photo (bench_upsample.features), area-reduced; quality is
  the mean cosine similarity and the RMSE against the HR features;
- 224 guide, 56x56x1 map: the photo's Cr chroma plane, area-reduced; PSNR against the HR plane.
Each method also reconstructs the guide from its bicubic reduction (the fitting objective):
"recon" PSNR. Times are one fit + apply after one warm-up run, with ``torch.cuda.synchronize``;
peak memory is ``torch.cuda.max_memory_allocated`` above what was allocated before the call.
The reference runs as its README shows (``UPA(image, lr_signal)``: fp16 autocast, 51 Adam
steps); ours picks its own precision (float32 fit, float16 accumulation on CUDA) and may stop
early when the loss stalls. Ours runs the batched path (the GPU default: on CUDA each fitting
step is replayed as one CUDA graph); on CUDA also with 100 steps (the loss still falls at 50),
without the CUDA graph ("no CUDA graph": ~450 launches a step) and the banded path (the CPU
design: the "before").

The reference is imported from ``$UPSAMPLE_ANYTHING_PATH`` (default ``.ref/upsample_anything``,
relative to the working directory or the repository; a copy of its ``src/``); without it its
rows are skipped. The reference runs on CUDA only (its ``UPA`` calls ``.cuda()``); with
``UPSAMPLE_ANYTHING_CPU=1`` its ``.cuda()`` calls are redirected to the CPU (its autocast then
disables itself; minutes even at the tiny sizes), to check this script without a GPU.

    python benchmarks/upsample_gpu.py [--tiny] [--device cuda]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import sys
import time
import traceback
import types
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coz_core.upsample import fit_kernels  # noqa: E402

STEPS = 50
# (guide size, LR size, channels)
FULL = [(224, 16, 384), (448, 32, 384), (224, 56, 1)]
TINY = [(32, 8, 24), (32, 8, 1)]


def _bench_upsample():
    spec = importlib.util.spec_from_file_location("bench_upsample", Path(__file__).with_name("bench_upsample.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_reference() -> tuple[types.ModuleType | None, str]:
    """(the reference's ``upsample_anything`` module or None, a note)."""
    folder = Path(os.environ.get("UPSAMPLE_ANYTHING_PATH", ".ref/upsample_anything"))
    candidates = [folder] if folder.is_absolute() else [Path.cwd() / folder, ROOT / folder]
    path = next((c / "upsample_anything.py" for c in candidates if (c / "upsample_anything.py").is_file()), None)
    if path is None:
        return None, (f"reference absent: no upsample_anything.py under {folder} (set UPSAMPLE_ANYTHING_PATH "
                      "to a copy of seominseok0429/Upsample-Anything_Pytorch's src/)")
    note = f"reference: {path}"
    try:
        import torchvision.transforms  # noqa: F401 - the reference imports it for its demo only
    except ImportError:
        stub = types.ModuleType("torchvision")
        stub.transforms = types.ModuleType("torchvision.transforms")
        sys.modules.setdefault("torchvision", stub)
        sys.modules.setdefault("torchvision.transforms", stub.transforms)
        note += " (torchvision absent: stubbed; only the reference's DINOv2 demo uses it)"
    spec = importlib.util.spec_from_file_location("upsample_anything", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, note


@contextlib.contextmanager
def _on_cpu(device: torch.device):
    """On a CPU, make the reference's ``.cuda()`` calls no-ops (and quiet its CUDA-only AMP)."""
    if device.type != "cpu":
        yield
        return
    saved = torch.Tensor.cuda, torch.nn.Module.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.Tensor.cuda, torch.nn.Module.cuda = saved


def _timed(fn, device: torch.device):
    """(result, seconds, peak MiB above the memory allocated before; NaN on CPU) after one warm-up."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20 if device.type == "cuda" else float("nan")
    return out, seconds, peak


def _task(bench, size: int, lr: int, channels: int, device: torch.device):
    """(guide [1, 3, S, S], guide as uint8 HxWx3, LR signal, HR truth, quality function)."""
    guide = bench.load_photo("astronaut", size)
    image = (guide[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    if channels == 1:
        truth = bench.chroma(guide)[:, 1:]

        def quality(out):
            return f"PSNR {bench.psnr(out.float().cpu(), truth):.2f} dB"
    else:
        truth = bench.features(guide, channels=channels)

        def quality(out):
            out = out.float().cpu()
            cos = float(F.cosine_similarity(out, truth, dim=1, eps=1e-8).mean())
            return f"cos {cos:.4f}, RMSE {float(((out - truth) ** 2).mean().sqrt()):.4f}"
    signal = F.adaptive_avg_pool2d(truth, (lr, lr))
    return guide.to(device), Image.fromarray(image), signal.to(device), quality


def measure(device: torch.device, tiny: bool) -> list[tuple[str, str]]:
    """(label, figure) rows: ours and the reference at each size, then speed-up and memory ratio.
    Each row is measured on its own: an error is printed and reported as that row's figure."""
    bench = _bench_upsample()
    rows: list[tuple[str, str]] = []

    def add(label: str, figure: str) -> None:
        rows.append((label, figure))
        print(f"{label:44s} {figure}", flush=True)

    try:
        ref, note = load_reference()
    except Exception as exc:  # noqa: BLE001 - a broken reference copy must not stop our rows
        traceback.print_exc()
        ref, note = None, f"reference failed to import: {type(exc).__name__}: {exc}"
    add("upsampler reference", note)
    steps = 3 if tiny else STEPS
    for size, lr, channels in TINY if tiny else FULL:
        name = f"upsampler {size} guide, {lr}x{lr}x{channels}"
        try:
            guide, image, signal, quality = _task(bench, size, lr, channels, device)
            low = F.interpolate(guide, size=(lr, lr), mode="bicubic", align_corners=False)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            add(name, f"error building the task: {type(exc).__name__}: {exc}")
            continue
        results = {}
        # the batched path (the default; on CUDA each fitting step replayed as a CUDA graph), on
        # CUDA also with twice the steps (the loss still falls at 50), without the CUDA graph and
        # the banded path (the CPU design) for the before/after
        variants = [("batched", steps, True)]
        if device.type == "cuda":
            variants += [("batched", 2 * steps, True), ("batched", steps, False), ("banded", steps, True)]
        for path, n_steps, graph in variants:
            label = (f"{name}: ours ({path}{'' if n_steps == steps else f', {n_steps} steps'}"
                     f"{'' if graph or path != 'batched' else ', no CUDA graph'})")
            try:
                kernels_box = {}

                def ours(path=path, n_steps=n_steps, graph=graph):
                    kernels_box["k"] = fit_kernels(guide, lr_size=(lr, lr), steps=n_steps, path=path,
                                                   cuda_graph=graph)
                    return kernels_box["k"].apply(signal, path=path)

                out, sec, mb = _timed(ours, device)
                k = kernels_box["k"]
                recon = bench.psnr(k.apply(low, path=path).clamp(0, 1).float().cpu(), guide.cpu())
                results.setdefault(path, (sec, mb))
                add(label, f"{sec:.3f} s, peak {mb:.0f} MiB, {quality(out)}, recon {recon:.2f} dB, "
                           f"{len(k.losses)} steps")
            except Exception as exc:  # noqa: BLE001
                traceback.print_exc()
                add(label, f"error: {type(exc).__name__}: {exc}")
        if ref is None or (device.type != "cuda" and os.environ.get("UPSAMPLE_ANYTHING_CPU") != "1"):
            add(f"{name}: reference", "skipped: " + ("reference absent" if ref is None else
                                                     "it runs on CUDA only (UPSAMPLE_ANYTHING_CPU=1 forces it)"))
            continue
        try:
            with _on_cpu(device):
                out, sec, mb = _timed(lambda: ref.UPA(image, signal), device)
                recon = bench.psnr(ref.UPA(image, low).clamp(0, 1).float().cpu(), guide.cpu())
            results["reference"] = (sec, mb)
            add(f"{name}: reference", f"{sec:.3f} s, peak {mb:.0f} MiB, {quality(out)}, recon {recon:.2f} dB, "
                                      "51 steps")
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            add(f"{name}: reference", f"error: {type(exc).__name__}: {exc}")
        if "reference" in results and "batched" in results:
            (rs, rm), (os_, om) = results["reference"], results["batched"]
            add(f"{name}: ours (batched) vs reference",
                f"{rs / os_:.1f}x faster, memory {om / rm:.3f} of it" if device.type == "cuda"
                else f"{rs / os_:.1f}x faster (CPU, tiny: not a GPU figure)")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="small sizes (default on a CPU)")
    args = ap.parse_args()
    device = torch.device(args.device)
    tiny = args.tiny or device.type == "cpu"
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"## Upsampler vs Upsample Anything on {name}, torch {torch.__version__}"
          f"{' (tiny sizes)' if tiny else ''}", flush=True)
    measure(device, tiny)


if __name__ == "__main__":
    main()
