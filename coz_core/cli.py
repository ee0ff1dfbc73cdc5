"""``coz-zoom``: run the Chain-of-Zoom chain from a shell, no ComfyUI needed.

Writes, per input image, into ``OUT/<name>/``: every scale (``scale_0.png`` ...), the zoomed SR
inputs (``zoomed_1.png`` ...), a side-by-side ``strip.png`` with the next zoom box drawn on each
scale, ``prompts.txt`` and ``manifest.json`` (settings, crop boxes, timings, versions).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from . import __version__
from .color import COLOR_METHODS
from . import factory, policy
from .imageops import IMAGE_SUFFIXES, load_image, resize, save_image
from .prompt.base import FixedPrompts
from .zoom import MODES, ChainConfig, ChainResult, ZoomStep, run_chain


# Where the chain zooms on the sample when no --center is given: the mission patch on the suit.
SAMPLE_CENTER = (0.34, 0.75)


def sample_image_path() -> Path:
    """The bundled sample photo (public domain, see data/SAMPLE_CREDITS.txt)."""
    return Path(str(resources.files("coz_core") / "data" / "sample.png"))


def _pair(text: str, kind: type, name: str) -> tuple:
    parts = text.lower().replace("x", ",").split(",")
    try:
        values = tuple(kind(p) for p in parts if p.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name} must look like 512 or 512x384, got {text!r}")
    if len(values) == 1:
        values = values * 2
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"{name} takes one or two values, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coz-zoom",
        description="Chain-of-Zoom: zoom into an image step by step (4x, 16x, 64x, 256x ...) "
        "with one SR model. Without IMAGE, zooms into the bundled sample photo.",
    )
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_FOLDER", help="images or folders of images")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.add_argument("--steps", type=int, default=4, help="zoom steps (default 4: 256x at zoom 4)")
    p.add_argument("--zoom", type=float, default=4.0, help="magnification per step (default 4)")
    p.add_argument("--size", type=lambda t: _pair(t, int, "--size"), default=(512, 512),
                   help="process size, W or WxH (default 512)")
    p.add_argument("--center", type=lambda t: _pair(t, float, "--center"), default=None,
                   help="zoom target x,y in 0..1 of the input (default 0.5,0.5; on the bundled "
                   "sample its mission patch)")
    p.add_argument("--mode", choices=MODES, default="recursive_multiscale")
    p.add_argument("--color", choices=sorted(COLOR_METHODS), default="wavelet",
                   help="colour alignment after each SR step (default wavelet)")
    p.add_argument("--backbone", default="x4plus",
                   help="embedded Real-ESRGAN name (x4plus, x4plus_anime, animevideov3) or a "
                   "Real-ESRGAN .safetensors/.pth file (default x4plus)")
    p.add_argument("--prompt", default="", help="user prompt appended to every step's prompt")
    p.add_argument("--precision", default="auto", choices=policy.PRECISIONS,
                   help="model precision (auto: bf16 where the device runs it well, else fp32; for SD3 "
                   "a preset: auto keeps the VAE in fp32 as the reference)")
    p.add_argument("--device", default=None, help="torch device (default: first CUDA GPU, else CPU)")
    p.add_argument("--seed", type=int, default=42, help="seed for sampling backbones (default 42, as the reference)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    sd3 = p.add_argument_group("CoZ one-step SD3 backbone (replaces --backbone)")
    sd3.add_argument("--sd3", type=Path, help="SD3 medium: a diffusers folder or sd3_medium*.safetensors")
    sd3.add_argument("--coz-lora", type=Path, help="CoZ SR LoRA: model_20001.pkl or its .safetensors")
    sd3.add_argument("--coz-vae", type=Path, help="CoZ VAE encoder: vae_encoder_20001.pt or its .safetensors")
    sd3.add_argument("--clip-l", type=Path, help="CLIP-L file (single-file SD3 without clips)")
    sd3.add_argument("--clip-g", type=Path, help="CLIP-G file")
    sd3.add_argument("--t5", type=Path, help="T5-XXL file (optional)")
    sd3.add_argument("--no-t5", action="store_true", help="leave T5 out (saves ~10 GB; SD3's zero path)")
    sd3.add_argument("--tokenizers", type=Path,
                     help="tokenizer folder for single-file checkpoints (a diffusers SD3 folder)")
    sd3.add_argument("--latent", choices=["sample", "mean"], default="sample",
                     help="sample the VAE latent with --seed as the reference does, or take its mean")

    vlm = p.add_argument_group("VLM prompts (Qwen2.5-VL)")
    vlm.add_argument("--vlm", type=Path, help="a Qwen2.5-VL-Instruct folder: writes each step's prompt")
    vlm.add_argument("--vlm-adapter", type=Path, help="a PEFT LoRA folder for the VLM (optional)")
    vlm.add_argument("--vlm-tokens", type=int, default=policy.VLM_TOKENS,
                     help=f"max new tokens per prompt (default {policy.VLM_TOKENS}, as CoZ's current code; "
                     "its first release used 128)")
    vlm.add_argument("--step-prompts", default=None,
                     help="without --vlm: prompts per step separated by '|' (the last repeats)")
    return p


def build_prompt_source(args: argparse.Namespace, device: torch.device):
    """Qwen2.5-VL with --vlm, else fixed per-step texts (possibly none)."""
    if args.vlm is None:
        return factory.fixed_prompt_source(args.step_prompts.split("|") if args.step_prompts else "")
    return factory.vlm_prompt_source(args.vlm, device, args.precision, adapter=args.vlm_adapter,
                                     max_new_tokens=args.vlm_tokens)


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Expand folders (their images, sorted); every named file must exist."""
    if not inputs:
        return [sample_image_path()]
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            images = sorted(f for f in item.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if not images:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {item}")
            found.extend(images)
        elif item.is_file():
            found.append(item)
        else:
            raise FileNotFoundError(f"input not found: {item}")
    return found


def build_backbone(args: argparse.Namespace, device: torch.device):
    """The SR backbone the arguments ask for: CoZ SD3 with --sd3, else a Real-ESRGAN model."""
    if args.sd3 is None:
        return factory.upscale_backbone(args.backbone, device, args.precision)
    if args.coz_lora is None or args.coz_vae is None:
        print("coz-zoom: warning: without --coz-lora and --coz-vae this is plain SD3, not CoZ",
              file=sys.stderr)
    encoders = ("clip_l", "clip_g") if args.no_t5 else ("clip_l", "clip_g", "t5")
    return factory.sd3_backbone(
        args.sd3, args.coz_lora, args.coz_vae, device, args.precision, clip_l=args.clip_l,
        clip_g=args.clip_g, t5=args.t5, text_encoders=encoders, tokenizers=args.tokenizers,
        latent_mode=args.latent,
    )


def make_strip(result: ChainResult, height: int = 256) -> torch.Tensor:
    """All scales side by side (first batch element), each with the next zoom box outlined."""
    tiles = []
    for i, step in enumerate(result.steps):
        img = step.image[:1].clone()
        nxt = result.steps[i + 1] if i + 1 < len(result.steps) else None
        if nxt is not None and nxt.crop is not None and result.config.mode not in ("onestep", "bicubic", "nearest"):
            l, t, r, b = nxt.crop
            color = torch.tensor([1.0, 0.85, 0.0]).view(1, 3, 1, 1)
            lw = max(1, img.shape[-1] // 128)
            img[..., t:b, l:l + lw] = color
            img[..., t:b, r - lw:r] = color
            img[..., t:t + lw, l:r] = color
            img[..., b - lw:b, l:r] = color
        w = round(img.shape[-1] * height / img.shape[-2])
        tiles.append(resize(img, (height, w), "bicubic").clamp(0, 1))
        tiles.append(torch.ones(1, 3, height, 4))
    return torch.cat(tiles[:-1], dim=-1)


def write_outputs(result: ChainResult, folder: Path, source: Path, backbone_name: str, extra: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    batch = result.final.shape[0]
    for step in result.steps:
        for b in range(batch):
            suffix = f"_b{b}" if batch > 1 else ""
            save_image(step.image[b], folder / f"scale_{step.index}{suffix}.png")
            if step.zoomed is not None:
                save_image(step.zoomed[b], folder / f"zoomed_{step.index}{suffix}.png")
    save_image(make_strip(result), folder / "strip.png")
    lines = [f"{s.index}: {' | '.join(s.prompts)}" for s in result.steps[1:]]
    (folder / "prompts.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    manifest = {
        "input": str(source),
        "backbone": backbone_name,
        **result.record(),
        **extra,
        "versions": {"coz_core": __version__, "torch": torch.__version__,
                     "python": platform.python_version()},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    center = args.center or (SAMPLE_CENTER if not args.inputs else (0.5, 0.5))
    config = ChainConfig(mode=args.mode, steps=args.steps, zoom=args.zoom, size=args.size,
                         center=center, color=args.color, user_prompt=args.prompt, seed=args.seed)
    try:
        inputs = collect_inputs(args.inputs)
        device = policy.parse_device(args.device)
        backbone = None
        if config.mode in ("recursive_multiscale", "recursive", "onestep"):
            backbone = build_backbone(args, device)
        config.validate(backbone)
        prompts = build_prompt_source(args, device)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"coz-zoom: {exc}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    failures = 0
    for path in inputs:
        try:
            image = load_image(path)
        except (ValueError, FileNotFoundError) as exc:
            print(f"coz-zoom: skipping {path}: {exc}", file=sys.stderr)
            failures += 1
            continue
        bar = tqdm(total=config.steps + 1, desc=path.name, unit="scale", disable=args.quiet)
        done: list[ZoomStep] = []
        t0 = time.perf_counter()
        try:
            result = run_chain(image, backbone, config, prompts, on_step=lambda s: (done.append(s), bar.update(1)))
        except KeyboardInterrupt:  # Ctrl-C: keep the scales already made
            result = ChainResult(done, config, (image.shape[-1], image.shape[-2]), cancelled=True)
        bar.close()
        name = backbone.name if backbone is not None else config.mode
        out = args.output / path.stem
        if result.steps:
            write_outputs(result, out, path, name, {"seconds_total": time.perf_counter() - t0})
        if result.cancelled:
            print(f"coz-zoom: interrupted; {len(result.steps)} scales of {path.name} kept in {out}", file=sys.stderr)
            return 130
        print(f"{path.name}: {len(result.steps) - 1} steps, {result.zoom_of(result.steps[-1]):g}x -> {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
