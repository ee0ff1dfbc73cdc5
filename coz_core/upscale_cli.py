"""``coz-upscale``: the whole picture made x2 to x16 larger with a prompt per tile, from a shell.

Per input image it writes ``OUT/<name>/<name>_x<factor>.png`` (RGBA when the input has alpha),
``prompts.txt`` (one line per tile) and ``manifest.json`` (settings, passes, tile grid, every
tile's prompt and timings, memory estimate, versions). Files appear only when complete: they are
written under a temporary name and renamed; an error or Ctrl-C leaves nothing half-written.
Backbones and prompt options are those of ``coz-zoom``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from . import __version__, factory, policy
from .cli import build_backbone, build_prompt_source, collect_inputs, step_texts
from .color import COLOR_METHODS
from .imageops import _read_array, save_image
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
    p.add_argument("--backbone", default="x4plus",
                   help="embedded Real-ESRGAN name (x4plus, x4plus_anime, animevideov3) or a "
                   "Real-ESRGAN .safetensors/.pth file (default x4plus)")
    p.add_argument("--prompt", default="", help="user prompt appended to every tile's prompt")
    p.add_argument("--precision", default="auto", choices=list(policy.PRECISIONS))
    p.add_argument("--device", default=None, help="torch device (default: first CUDA GPU, else CPU)")
    p.add_argument("--seed", type=int, default=42, help="seed of the latent sample (default 42)")
    p.add_argument("--memory-limit", type=float, default=None,
                   help="GB the image buffers may take (default: the memory available now)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    sd3 = p.add_argument_group("CoZ one-step SD3 backbone (replaces --backbone)")
    sd3.add_argument("--sd3", type=Path, help="SD3 medium: a diffusers folder or sd3_medium*.safetensors")
    sd3.add_argument("--coz-lora", type=Path, help="CoZ SR LoRA: model_20001.pkl or its .safetensors")
    sd3.add_argument("--coz-vae", type=Path, help="CoZ VAE encoder: vae_encoder_20001.pt or its .safetensors")
    sd3.add_argument("--clip-l", type=Path, help="CLIP-L file (single-file SD3 without clips)")
    sd3.add_argument("--clip-g", type=Path, help="CLIP-G file")
    sd3.add_argument("--t5", type=Path, help="T5-XXL file (optional)")
    sd3.add_argument("--no-t5", action="store_true", help="leave T5 out (SD3's zero path)")
    sd3.add_argument("--tokenizers", type=Path, help="tokenizer folder for single-file checkpoints")
    sd3.add_argument("--latent", choices=["sample", "mean"], default="sample",
                     help="sample the VAE latent with --seed as the reference does, or take its mean")

    vlm = p.add_argument_group("tile prompts")
    vlm.add_argument("--vlm", type=Path, help="a Qwen2.5-VL-Instruct folder: writes every tile's prompt")
    vlm.add_argument("--vlm-adapter", type=Path, help="a PEFT LoRA folder for the VLM (e.g. CoZ's GRPO adapter)")
    vlm.add_argument("--prompt-type", choices=factory.PROMPT_TYPES, default=None,
                     help="vlm: --vlm with the GRPO --vlm-adapter; vlm_base: plain --vlm; fixed: --tile-prompts; "
                     "none: --prompt alone. Default: what the options given make")
    vlm.add_argument("--vlm-tokens", type=int, default=PROMPT_TOKENS,
                     help=f"max new tokens per tile prompt (default {PROMPT_TOKENS}, as upstream)")
    vlm.add_argument("--vlm-batch", type=int, default=PROMPT_BATCH,
                     help=f"tile prompts the VLM writes at once (default {PROMPT_BATCH}; halved when memory runs out)")
    vlm.add_argument("--tile-prompts", dest="step_prompts", default=None,
                     help="without --vlm: prompts per tile in raster order separated by '|' (the last repeats)")
    return p


def load_with_alpha(path: Path) -> torch.Tensor:
    """An image file as float32 [1, C, H, W] in 0..1, alpha kept (C = 1..4)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            array = _read_array(img, path)  # 16-bit and float precision kept
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path} is not an image Pillow can read ({exc})") from exc
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def _atomic(path: Path, write) -> None:
    """``write(tmp)`` then rename onto ``path``: readers never see a partial file."""
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_outputs(result: UpscaleResult, folder: Path, source: Path, extra: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{source.stem}_x{result.config.factor}.png"
    for b in range(result.image.shape[0]):
        target = folder / (name if result.image.shape[0] == 1 else f"{source.stem}_x{result.config.factor}_b{b}.png")
        _atomic(target, lambda tmp: save_image(result.image[b], tmp))
    lines = [f"pass {t.pass_index} tile {t.tile.index} (row {t.tile.row}, col {t.tile.col}): {t.prompt}"
             for t in result.tiles]
    _atomic(folder / "prompts.txt", lambda tmp: tmp.write_text("\n".join(lines) + "\n", encoding="utf-8"))
    manifest = {"input": str(source), **result.record(), **extra,
                "versions": {"coz_core": __version__, "torch": torch.__version__,
                             "python": platform.python_version()}}
    _atomic(folder / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=2), encoding="utf-8"))
    return folder / name


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    limit = None if args.memory_limit is None else int(args.memory_limit * 1024**3)
    config = UpscaleConfig(factor=args.factor, tile=args.tile, overlap=args.overlap, color=args.color,
                           blend=args.blend, user_prompt=args.prompt, seed=args.seed, memory_limit=limit)
    try:
        inputs = collect_inputs(args.inputs)
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
    for path in inputs:
        try:
            image = load_with_alpha(path)
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
        out = write_outputs(result, args.output / path.stem, path, {"seconds_total": time.perf_counter() - t0})
        w, h = result.image.shape[-1], result.image.shape[-2]
        print(f"{path.name}: x{config.factor} -> {w}x{h}, {len(result.tiles)} tiles -> {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
