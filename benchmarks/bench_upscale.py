"""Benchmark of the embedded Real-ESRGAN backbone: seconds and peak RSS per dtype/layout.

Each configuration runs in a fresh subprocess (so its peak RSS is its own), on a real photo crop,
one warm-up call and then the best of ``--repeat`` timed calls (robust to a busy machine).

    python benchmarks/bench_upscale.py [--threads 2] [--size 128] [--repeat 2] [--models x4plus]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [  # (label, dtype, channels_last, tile)
    ("fp32", "float32", False, None),
    ("fp32 channels_last", "float32", True, None),
    ("bf16 channels_last", "bfloat16", True, None),
]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_one(model: str, size: int, dtype: str, channels_last: bool, tile: int | None, threads: int,
            repeat: int) -> dict:
    import numpy as np
    import torch
    from skimage import data

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from coz_core.sr.realesrgan import ensure_converted, load_upscale_state_dict
    from coz_core.sr.upscale import UpscaleModelBackbone

    torch.set_num_threads(threads)
    photo = np.ascontiguousarray(data.astronaut()[:size, 128:128 + size], dtype=np.float32) / 255.0
    image = torch.from_numpy(photo).permute(2, 0, 1)[None].contiguous()
    module = load_upscale_state_dict(ensure_converted(model))
    backbone = UpscaleModelBackbone(module, dtype=getattr(torch, dtype), channels_last=channels_last,
                                    tile=tile)
    rss_loaded = _peak_rss_mb()
    backbone.upscale(image)  # warm-up (oneDNN primitive creation)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = backbone.upscale(image)
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "rss_loaded_mb": rss_loaded,
            "peak_rss_mb": _peak_rss_mb(), "out": list(out.shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=128, help="input side (output is 4x)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=["x4plus"])
    parser.add_argument("--tile", type=int, default=None, help="also run bf16 tiled with this tile")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one configuration as JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(**json.loads(args.one))))
        return
    configs = CONFIGS + ([(f"bf16 channels_last tile {args.tile}", "bfloat16", True, args.tile)]
                         if args.tile else [])
    print(f"threads={args.threads} input={args.size}x{args.size} -> x4, load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| model | config | seconds | RSS after load (MB) | peak RSS (MB) |")
    print("| --- | --- | --- | --- | --- |")
    for model in args.models:
        for label, dtype, channels_last, tile in configs:
            job = {"model": model, "size": args.size, "dtype": dtype, "channels_last": channels_last,
                   "tile": tile, "threads": args.threads, "repeat": args.repeat}
            done = subprocess.run([sys.executable, __file__, "--one", json.dumps(job)],
                                  capture_output=True, text=True, check=True)
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {model} | {label} | {r['seconds']:.2f} | {r['rss_loaded_mb']:.0f} | {r['peak_rss_mb']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
