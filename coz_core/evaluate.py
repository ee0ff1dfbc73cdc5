"""The paper's comparison on your own images: nearest, bicubic, direct SR and the chain, per scale.

For every image, each method runs once as a chain of ``steps`` zoom steps (4x, 16x, 64x, 256x
by default) with one configuration (size, zoom, centre, colour) and every scale from the first
step on is scored with no-reference metrics (``coz_core.metrics``):

- ``nearest`` / ``bicubic``: the crop of scale 0 enlarged by that filter (``nearest`` /
  ``bicubic`` modes);
- ``direct SR``: the crop of scale 0 enlarged bicubically and passed once through the SR model
  (``onestep``, the paper's baseline);
- ``CoZ``: the chain, one SR step per scale (``recursive_multiscale``).

This mirrors the paper's table (CoZ, arXiv 2505.18600, NIQE and MUSIQ at 4x, 64x, 256x), with the
metrics that run offline here instead of MUSIQ.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from .metrics import LOWER_IS_BETTER, score
from .prompt.base import PromptSource
from .sr.base import SRBackbone
from .zoom import MODEL_MODES, ChainConfig, run_chain

METHODS = {"nearest": "nearest", "bicubic": "bicubic", "direct SR": "onestep", "CoZ": "recursive_multiscale"}


@dataclass
class Row:
    image: str
    method: str
    scale: float  # magnification relative to scale 0
    scores: dict[str, float]


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] float 0..1 -> [H, W, 3] uint8, rounded as PNG saving does."""
    return (image.detach().float().clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)


def evaluate_image(
    image: torch.Tensor,
    name: str,
    backbone: SRBackbone | None,
    config: ChainConfig,
    metrics: Iterable[str],
    prompt_source: PromptSource | None = None,
    methods: Iterable[str] = tuple(METHODS),
    on_scale: Callable[[str, int], None] | None = None,
) -> list[Row]:
    """Rows (method x scale) for one image [1, C, H, W]; ``config.mode`` is ignored."""
    metrics = list(metrics)
    rows = []
    for method in methods:
        cfg = ChainConfig(**{**config.__dict__, "mode": METHODS[method]})
        progress = (lambda s: on_scale(method, s.index) if s.index else None) if on_scale else None
        result = run_chain(image, backbone if cfg.mode in MODEL_MODES else None, cfg,
                           prompt_source if cfg.mode in MODEL_MODES else None, on_step=progress)
        for step in result.steps[1:]:
            pixels = to_uint8(step.image[0])
            rows.append(Row(name, method, round(result.zoom_of(step), 6),
                            {m: score(m, pixels) for m in metrics}))
    return rows


def mean_table(rows: list[Row], metrics: list[str]) -> dict[tuple[str, float], dict[str, float]]:
    """{(method, scale): {metric: mean over images}} (NaN scores are left out of the mean)."""
    groups: dict[tuple[str, float], list[Row]] = {}
    for row in rows:
        groups.setdefault((row.method, row.scale), []).append(row)
    table = {}
    for key, group in groups.items():
        table[key] = {}
        for m in metrics:
            values = [r.scores[m] for r in group if not math.isnan(r.scores[m])]
            table[key][m] = float(np.mean(values)) if values else math.nan
    return table


def format_table(table: dict[tuple[str, float], dict[str, float]], metrics: list[str], n_images: int) -> str:
    """A Markdown table: one row per method, one column per scale and metric."""
    methods = list(dict.fromkeys(k[0] for k in table))
    scales = sorted({k[1] for k in table})
    arrows = {m: "↓" if LOWER_IS_BETTER.get(m, True) else "↑" for m in metrics}
    head = ["method"] + [f"{s:g}x {m.upper()}{arrows[m]}" for s in scales for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for method in methods:
        cells = [method] + [f"{table[(method, s)][m]:.2f}" if (method, s) in table else ""
                            for s in scales for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n(mean over {n_images} image{'s' if n_images != 1 else ''})"


def write_csv(rows: list[Row], metrics: list[str], path: Path, backbone: str) -> None:
    """One line per image, method and scale: image, method, mode, scale, backbone, metrics..."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "method", "mode", "scale", "backbone", *metrics])
        for r in rows:
            model = backbone if METHODS[r.method] in MODEL_MODES else ""
            writer.writerow([r.image, r.method, METHODS[r.method], f"{r.scale:g}", model,
                             *(f"{r.scores[m]:.4f}" for m in metrics)])


def plot(table: dict[tuple[str, float], dict[str, float]], metrics: list[str], path: Path, title: str) -> None:
    """One panel per metric: mean score against scale (log axis), one line per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("the plot needs matplotlib: pip install 'chain-of-zoom[eval]' "
                          "(or pass --no-plot)") from exc
    methods = list(dict.fromkeys(k[0] for k in table))
    scales = sorted({k[1] for k in table})
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for method in methods:
            ax.plot(scales, [table[(method, s)][m] for s in scales], marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(scales, [f"{s:g}x" for s in scales])
        ax.set_title(f"{m.upper()} ({'lower' if LOWER_IS_BETTER.get(m, True) else 'higher'} is better)")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
