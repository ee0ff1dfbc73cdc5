"""Whole-image upscale x4: time and peak memory for 512 -> 2048 and 1024 -> 4096.

CPU rows (each in its own process, so peak RSS is that run's): the embedded Real-ESRGAN (offline
backbone, image tiles) and the tiny SD3 of the tests (latent tiles, a prompt per tile). Peak RSS
includes the Python/torch baseline (measured before the run and shown apart) and the output
buffer (float32, 12 bytes per output pixel).

``gpu_rows(backbone, device)`` is what benchmarks/bench_gpu.py calls with a full-size random-weight
CoZ SD3 backbone: 512 -> 2048 with upstream's tiles (64 latent cells, overlap 16).

    python benchmarks/bench_upscale_image.py [--realesrgan x4plus] [--sizes 512,1024]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from coz_core.imageops import load_image, resize  # noqa: E402
from coz_core.prompt.base import FixedPrompts  # noqa: E402
from coz_core.upscale_image import UpscaleConfig, upscale_image  # noqa: E402

PROMPTS = FixedPrompts(["a photo", "an astronaut", "a space suit", "a mission patch"])


def photo(side: int) -> torch.Tensor:
    return resize(load_image(ROOT / "coz_core" / "data" / "sample.png"), (side, side), "lanczos").clamp(0, 1)


def _rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def one(kind: str, side: int, model: str) -> dict:
    """One run in this process: seconds, tiles, peak RSS, baseline RSS."""
    torch.manual_seed(0)
    if kind == "realesrgan":
        from coz_core.sr.realesrgan import load_embedded

        backbone = load_embedded(model, device="cpu")
        config = UpscaleConfig(factor=4)
    else:
        from tests.sd3_fixtures import build_tiny_sd3

        from coz_core.sr.coz_sd3 import CoZSD3Backbone
        from coz_core.sr.sd3_loading import SD3Precision

        tiny = build_tiny_sd3(Path(tempfile.mkdtemp()))
        fp32 = SD3Precision(transformer=torch.float32, vae=torch.float32, text=torch.float32, t5=torch.float32)
        backbone = CoZSD3Backbone.from_files(tiny.folder, tiny.lora_pkl, tiny.vae_pt, precision=fp32)
        config = UpscaleConfig(factor=4, tile=256, overlap=64)  # the tiny model's positional range: 256 px
    image = photo(side)
    upscale_image(photo(32), backbone, UpscaleConfig(**{**config.__dict__, "factor": 2}), PROMPTS)  # warm up
    base = _rss()
    t0 = time.perf_counter()
    result = upscale_image(image, backbone, config, PROMPTS)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "tiles": len(result.tiles), "peak": _rss(), "base": base,
            "output": result.image.numel() * 4}


def gpu_rows(backbone, device: torch.device, side: int = 512) -> list[tuple[str, str]]:
    """``side`` -> 4 x ``side`` (default 512 -> 2048) with a (full-size) CoZ SD3 backbone on ``device``:
    upstream's tiles (512 output pixels, overlap 128), fixed prompts, wavelet colour fix."""
    config = UpscaleConfig(factor=4, tile=512, overlap=128)
    upscale_image(photo(max(side // 4, 16)), backbone, config, PROMPTS)  # warm up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = upscale_image(photo(side), backbone, config, PROMPTS)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    tiles, label = len(result.tiles), f"whole image x4 {side}->{4 * side}"
    rows = [(f"{label}: tiles", str(tiles)),
            (f"{label}: time", f"{seconds:.2f} s ({1000 * seconds / tiles:.0f} ms per tile)")]
    if device.type == "cuda":
        rows.append((f"{label}: peak GPU memory", f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--realesrgan", default="x4plus", help="embedded Real-ESRGAN model (default x4plus)")
    p.add_argument("--sizes", default="512,1024", help="input sides (default 512,1024)")
    p.add_argument("--kinds", default="realesrgan,tiny-sd3")
    p.add_argument("--one", nargs=2, metavar=("KIND", "SIDE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), args.realesrgan)))
        return
    print("| backbone | input -> output | tiles | time | peak RSS | of which baseline | output buffer |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind in args.kinds.split(","):
        for side in map(int, args.sizes.split(",")):
            out = subprocess.run([sys.executable, __file__, "--one", kind, str(side), "--realesrgan", args.realesrgan],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                print(f"| {kind} | {side} | failed: {out.stderr.strip().splitlines()[-1]} |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            name = f"Real-ESRGAN {args.realesrgan}" if kind == "realesrgan" else "tiny SD3 (fp32)"
            mb = 2**20
            print(f"| {name} | {side} -> {4 * side} | {r['tiles']} | {r['seconds']:.1f} s | {r['peak'] / mb:.0f} MB "
                  f"| {r['base'] / mb:.0f} MB | {r['output'] / mb:.0f} MB |", flush=True)


if __name__ == "__main__":
    main()
