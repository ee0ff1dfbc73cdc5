"""``coz-upscale``: the whole picture made x2 to x16 larger with a prompt per tile, from a shell.

Per input image it writes ``OUT/<name>/<name>_x<factor>.png`` (RGBA when the input has alpha),
``prompts.txt`` (one line per tile) and ``manifest.json`` (settings, passes, tile grid, every
tile's prompt and timings, memory estimate, versions). Output folders follow ``coz-zoom``'s rules
(coz_core/output.py): checked before any compute, distinct for inputs that share a stem, existing
results refused unless ``--overwrite``, each folder written aside and renamed into place whole, so
an error or Ctrl-C leaves nothing half-written. Backbones and prompt options are those of ``coz-zoom``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from . import __version__, factory, policy
from .cli import add_model_arguments, build_backbone, build_prompt_source, collect_inputs, show_notes, step_texts
from .color import COLOR_METHODS
from .imageops import _read_array, open_image, rgb_profile, save_image
from .output import check_output, folder_names, write_atomically
from .upscale_image import (
    BLENDS, PROMPT_BATCH, PROMPT_TOKENS, UpscaleConfig, UpscaleResult, count_units, upscale_image,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coz-upscale",
        description="Whole-image Chain-of-Zoom: make every image x2, x4, x8, x16 ... larger in tiles, "
        "each tile with its own prompt. Without IMAGE, upscales the bundled sample photo.",
    )
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_FOLDER", help="images or folders of images")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.add_argument("--factor", type=int, default=4, help="magnification, a power of two (x4 passes, then x2)")
    p.add_argument("--tile", type=int, default=None,
                   help="tile side in output pixels (default 512 for SD3, as upstream; 1024 otherwise)")
    p.add_argument("--overlap", type=int, default=None,
                   help="output pixels shared by neighbouring tiles (default 128 for SD3, 64 otherwise)")
    p.add_argument("--blend", choices=BLENDS, default="cosine",
                   help="tile weights: raised cosine over the overlap (default) or upstream's Gaussian")
    p.add_argument("--color", choices=sorted(COLOR_METHODS), default="wavelet",
                   help="colour alignment of every tile to the enlarged input (default wavelet)")
    p.add_argument("--memory-limit", type=float, default=None,
                   help="GB the image buffers may take (default: the memory available now)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no notes")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing result folders in OUT as a whole (default: refuse)")

    add_model_arguments(p, "tile", PROMPT_TOKENS, "--tile-prompts",
                        "without --vlm: prompts per tile in raster order separated by '|' (the last repeats)")
    p.add_argument("--vlm-batch", type=int, default=PROMPT_BATCH,
                   help=f"tile prompts the VLM writes at once (default {PROMPT_BATCH}; halved when memory runs out)")
    return p


def load_with_alpha(path: Path) -> tuple[torch.Tensor, bytes | None]:
    """An image file as float32 [1, C, H, W] in 0..1, alpha kept (C = 1..4), and its RGB colour
    profile (``imageops.rgb_profile``)."""
    with open_image(path) as img:  # over Pillow's limit: ImageTooLarge, skipped as coz-zoom skips it
        array, profile = _read_array(img, path), rgb_profile(img)  # 16-bit and float precision kept
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0), profile


def output_name(result: UpscaleResult, source: Path) -> str:
    return f"{source.stem}_x{result.config.factor}.png"


def write_outputs(result: UpscaleResult, folder: Path, source: Path, extra: dict,
                  icc_profile: bytes | None = None) -> None:
    """The enlarged image(s), tagged with the input's colour profile, prompts.txt and manifest.json into ``folder``."""
    name = output_name(result, source)
    for b in range(result.image.shape[0]):
        target = folder / (name if result.image.shape[0] == 1 else f"{source.stem}_x{result.config.factor}_b{b}.png")
        save_image(result.image[b], target, icc_profile)
    lines = [f"pass {t.pass_index} tile {t.tile.index} (row {t.tile.row}, col {t.tile.col}): {t.prompt}"
             for t in result.tiles]
    (folder / "prompts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    manifest = {"input": str(source), **result.record(), **extra,
                "versions": {"coz_core": __version__, "torch": torch.__version__,
                             "python": platform.python_version()}}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_notes("coz-upscale", args.quiet)
    limit = None if args.memory_limit is None else int(args.memory_limit * 1024**3)
    config = UpscaleConfig(factor=args.factor, tile=args.tile, overlap=args.overlap, color=args.color,
                           blend=args.blend, user_prompt=args.prompt, seed=args.seed, memory_limit=limit)
    try:
        inputs = collect_inputs(args.inputs)
        names = folder_names(inputs)
        check_output(args.output, names, args.overwrite)
        device = policy.parse_device(args.device)
        factory.prompt_type(args.prompt_type, args.vlm, args.vlm_adapter, step_texts(args))  # before loading
        backbone = build_backbone(args, device)
        config = config.resolved(backbone)
        config.validate(backbone)  # before the (slow) VLM load
        prompts = build_prompt_source(args, device)
        if hasattr(prompts, "batch_size"):
            prompts.batch_size = max(1, args.vlm_batch)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"coz-upscale: {exc}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    failures = 0
    for path, name in zip(inputs, names):
        try:
            image, profile = load_with_alpha(path)
        except (ValueError, FileNotFoundError) as exc:
            print(f"coz-upscale: skipping {path}: {exc}", file=sys.stderr)
            failures += 1
            continue
        total = count_units(image.shape[-2], image.shape[-1], backbone, config)
        bar = tqdm(total=total, desc=path.name, unit="tile", disable=args.quiet)
        t0 = time.perf_counter()
        try:
            result = upscale_image(image, backbone, config, prompts, on_tile=lambda e: bar.update(1))
        except KeyboardInterrupt:
            bar.close()
            print(f"coz-upscale: interrupted; nothing written for {path.name}", file=sys.stderr)
            return 130
        except (ValueError, MemoryError) as exc:
            bar.close()
            print(f"coz-upscale: {path.name}: {exc}", file=sys.stderr)
            failures += 1
            continue
        bar.close()
        folder, extra = args.output / name, {"seconds_total": time.perf_counter() - t0}
        try:
            write_atomically(folder, lambda tmp: write_outputs(result, tmp, path, extra, profile))
        except OSError as exc:
            print(f"coz-upscale: could not write the results of {path} to {folder} ({exc}); nothing of it "
                  "was kept", file=sys.stderr)
            failures += 1
            continue
        w, h = result.image.shape[-1], result.image.shape[-2]
        print(f"{path.name}: x{config.factor} -> {w}x{h}, {len(result.tiles)} tiles -> "
              f"{folder / output_name(result, path)}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
