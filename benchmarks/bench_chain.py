"""Benchmark the default chain on the bundled sample: per-step model time, chain overhead
(everything that is not the model), total wall time and peak RSS, per precision.

    python benchmarks/bench_chain.py [--size 512] [--steps 4] [--threads 2]

Each precision runs in its own subprocess so that peak RSS is measured independently.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run_one(precision: str, size: int, steps: int, threads: int) -> dict:
    import torch

    from coz_core import ChainConfig, run_chain
    from coz_core.cli import sample_image_path
    from coz_core.policy import resolve_dtype
    from coz_core.imageops import load_image
    from coz_core.sr.realesrgan import load_embedded

    torch.set_num_threads(threads)
    backbone = load_embedded("x4plus", device=torch.device("cpu"), dtype=resolve_dtype(precision, torch.device("cpu")))
    image = load_image(sample_image_path())
    t0 = time.perf_counter()
    result = run_chain(image, backbone, ChainConfig(steps=steps, size=size))
    wall = time.perf_counter() - t0
    rows = [{"step": s.index, "model": s.seconds.get("model", 0.0),
             "overhead": s.seconds["total"] - s.seconds.get("model", 0.0) - s.seconds.get("prompt", 0.0)}
            for s in result.steps]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"precision": precision, "rows": rows, "wall": wall, "peak_rss_mb": peak_mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args.size, args.steps, args.threads)))
        return

    print(f"default chain on the sample: x4plus, {args.steps} steps, {args.size}px, "
          f"{args.threads} threads, wavelet colour fix")
    print(f"{'precision':>9} {'step':>4} {'model s':>8} {'overhead s':>10} {'overhead %':>10}")
    for precision in args.precisions.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", precision, "--size", str(args.size),
                              "--steps", str(args.steps), "--threads", str(args.threads)],
                             check=True, capture_output=True, text=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
        model_total = sum(r["model"] for r in res["rows"])
        overhead_total = sum(r["overhead"] for r in res["rows"])
        for r in res["rows"]:
            pct = 100 * r["overhead"] / r["model"] if r["model"] else float("nan")
            print(f"{precision:>9} {r['step']:>4} {r['model']:>8.2f} {r['overhead']:>10.3f} {pct:>10.1f}")
        print(f"{precision:>9}  all {model_total:>8.2f} {overhead_total:>10.3f} "
              f"{100 * overhead_total / model_total:>10.1f}   wall {res['wall']:.2f} s, "
              f"peak RSS {res['peak_rss_mb']:.0f} MB")


if __name__ == "__main__":
    main()
