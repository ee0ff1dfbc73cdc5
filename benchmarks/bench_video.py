"""Zoom video speed and memory: frames per second of rendering (coz_core.video) and of rendering +
encoding (PyAV, H.264), and the peak memory of each, on a synthetic 4-step chain (bicubic mode:
the video does not depend on the backbone). Prints a table.

    python benchmarks/bench_video.py [--size 512] [--frames-per-step 45] [--device cpu]
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from coz_core.imageops import resize  # noqa: E402
from coz_core.video import VideoConfig, ZoomVideo, write_video  # noqa: E402
from coz_core.zoom import ChainConfig, run_chain  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--frames-per-step", type=int, default=45)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()

    g = torch.Generator().manual_seed(0)
    image = resize(torch.rand(1, 3, 64, 64, generator=g), (args.size, args.size), "bicubic").clamp(0, 1)
    result = run_chain(image, None, ChainConfig(mode="bicubic", steps=args.steps, size=args.size))
    scales = [s.image.to(args.device) for s in result.steps]
    boxes = [s.box for s in result.steps]
    rows = []
    for blend in (0.0, 0.5):
        video = ZoomVideo(scales, boxes, VideoConfig(frames_per_step=args.frames_per_step, blend=blend))
        video[1]  # warm up
        t = time.perf_counter()
        for frame in video:
            frame.cpu()
        seconds = time.perf_counter() - t
        rows.append((f"render, blend {blend}", len(video), seconds))
    video = ZoomVideo(scales, boxes, VideoConfig(frames_per_step=args.frames_per_step))
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        count = write_video(iter(video), Path(tmp) / "zoom.mp4", 30.0)
        seconds = time.perf_counter() - t
        size_kb = (Path(tmp) / "zoom.mp4").stat().st_size / 1024
    rows.append(("render + encode (H.264)", count, seconds))

    print(f"{args.steps} steps, {args.size}x{args.size}, {args.frames_per_step} frames/step, device {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    print("| what | frames | seconds | ms/frame | frames/s |\n| --- | --- | --- | --- | --- |")
    for name, n, s in rows:
        print(f"| {name} | {n} | {s:.1f} | {1000 * s / n:.0f} | {n / s:.1f} |")
    frame_mb = args.size * args.size * 3 * 4 / 2**20
    print(f"\nH.264 file: {size_kb:.0f} kB. Peak RSS of this process (lazy frames): {peak_rss_mb():.0f} MB; "
          f"a node's IMAGE batch of these frames holds {len(video) * frame_mb:.0f} MB.")


if __name__ == "__main__":
    main()
