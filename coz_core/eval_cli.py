"""``coz-eval``: the paper's quality table on your own images, offline.

For each image: nearest, bicubic, direct SR (``onestep``) and the chain (``recursive_multiscale``)
at every scale of the chain (4x, 16x, 64x, 256x by default), scored with no-reference metrics
(NIQE, PIQE). Prints the mean per method and scale, and writes into OUT ``quality.csv`` (every
image, method and scale), ``quality.md`` (the mean table) and ``quality.png`` (a plot).
Backbone and prompt options are coz-zoom's (embedded Real-ESRGAN x4plus by default, CoZ SD3
with ``--sd3 --coz-lora --coz-vae``, prompts with ``--vlm``).
"""
from __future__ import annotations

import argparse
import sys
import time

from . import cli, policy
from .evaluate import METHODS, evaluate_image, format_table, mean_table, plot, write_csv
from .imageops import load_image
from .metrics import METRICS, check_available
from .zoom import ChainConfig


class _NoMode(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("coz-eval runs every method (nearest, bicubic, direct SR, CoZ); use --methods")


def build_parser() -> argparse.ArgumentParser:
    # coz-zoom's own argument builders (inputs, -o, geometry, backbone, SD3, VLM), so both stay
    # alike; coz-zoom's output options (--video, --overwrite, ...) do not apply here
    p = argparse.ArgumentParser(
        prog="coz-eval",
        description="Quality table like the CoZ paper's: nearest, bicubic, direct SR and the chain "
        "at 4x, 16x, 64x, 256x, scored with no-reference metrics. Without IMAGE, uses the bundled "
        "sample. Needs pip install 'chain-of-zoom[eval]'.",
    )
    cli.add_chain_arguments(p)
    cli.add_model_arguments(p, "step", policy.VLM_TOKENS, "--step-prompts",
                            "without --vlm: prompts per step separated by '|' (the last repeats)")
    p.add_argument("--mode", action=_NoMode, help=argparse.SUPPRESS)
    p.add_argument("--metrics", default=",".join(METRICS),
                   help=f"comma-separated metrics (default {','.join(METRICS)})")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated methods (default {','.join(METHODS)})")
    p.add_argument("--no-plot", action="store_true", help="skip quality.png (no matplotlib needed)")
    return p


def _split(text: str, allowed, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise ValueError(f"unknown {what} {', '.join(bad) or '(none given)'}; choose from {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    center = args.center or (cli.SAMPLE_CENTER if not args.inputs else (0.5, 0.5))
    config = ChainConfig(steps=args.steps, zoom=args.zoom, size=args.size, center=center,
                         color=args.color, user_prompt=args.prompt, seed=args.seed)
    try:  # everything that can fail fast does, before any model runs
        metrics = _split(args.metrics, METRICS, "metric")
        methods = _split(args.methods, tuple(METHODS), "method")
        check_available(metrics)
        if not args.no_plot:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise ImportError("the plot needs matplotlib: pip install 'chain-of-zoom[eval]' (or pass --no-plot)")
        if min(config.size) <= 193 and "niqe" in metrics:
            raise ValueError(f"NIQE needs a process size above 193 pixels (its 96-pixel patches at two "
                             f"scales); got {config.size[0]}x{config.size[1]}")
        inputs = cli.collect_inputs(args.inputs)
        images = [(path, load_image(path)) for path in inputs]
        device = policy.parse_device(args.device)
        needs_model = any(METHODS[m] in ("onestep", "recursive_multiscale") for m in methods)
        backbone = cli.build_backbone(args, device) if needs_model else None
        for m in methods:
            ChainConfig(**{**config.__dict__, "mode": METHODS[m]}).validate(backbone)
        prompts = cli.build_prompt_source(args, device) if needs_model else None
    except (ValueError, FileNotFoundError, OSError, ImportError) as exc:
        print(f"coz-eval: {exc}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    backbone_name = backbone.name if backbone is not None else "none"
    rows = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(images) * len(methods) * config.steps, unit="scale", disable=args.quiet)
    args.output.mkdir(parents=True, exist_ok=True)
    for path, image in images:
        bar.set_description(path.name)
        rows += evaluate_image(image, path.stem, backbone, config, metrics, prompts, methods,
                               on_scale=lambda *_: bar.update(1))
        write_csv(rows, metrics, args.output / "quality.csv", backbone_name)  # kept if stopped later
    bar.close()

    table = mean_table(rows, metrics)
    settings = (f"backbone {backbone_name}, {config.size[0]}x{config.size[1]}, zoom {config.zoom:g} "
                f"per step, colour {config.color}, precision {args.precision}, device {device}")
    text = format_table(table, metrics, len(images)) + f"; {settings}"
    print(text)
    (args.output / "quality.md").write_text(text + "\n", encoding="utf-8")
    if not args.no_plot:
        plot(table, metrics, args.output / "quality.png", settings)
    print(f"coz-eval: {len(images)} image(s) in {time.perf_counter() - t0:.0f} s -> {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
