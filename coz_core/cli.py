"""``coz-zoom``: run the Chain-of-Zoom chain from a shell, no ComfyUI needed.

Writes, per input image, into ``OUT/<name>/``: every scale (``scale_0.png`` ...), the zoomed SR
inputs (``zoomed_1.png`` ...), a side-by-side ``strip.png`` with the next zoom box drawn on each
scale, ``prompts.txt`` and ``manifest.json`` (settings, crop boxes, timings, device, precision,
backbone, versions). Folder names and atomic writing: :mod:`coz_core.output`.

Every argument is checked before a model loads: settings, device, inputs and the output folder.
Transparent inputs are composited on white (recorded in the manifest).
"""
from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, is_dataclass
import math
import platform
import sys
import time
from importlib import resources
from pathlib import Path

import torch

from . import __version__
from .color import COLOR_METHODS
from . import factory, policy
from .imageops import IMAGE_SUFFIXES, ImageTooLarge, LoadedImage, read_image, resize, save_image
from .output import check_output, folder_names, write_atomically
from .prompt.base import prompt_info
from .zoom import MAX_MAGNIFICATION_LOG2, MODES, Box, ChainConfig, ChainResult, ZoomStep, run_chain


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


def _center(text: str) -> tuple[float, float]:
    parts = [p for p in text.replace(" ", "").split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--center takes two numbers x,y in 0..1 such as 0.34,0.75, got {text!r}")
    if len(values) != 2:
        raise argparse.ArgumentTypeError(f"--center takes both x and y (e.g. {text},0.5), got {text!r}")
    return values


MODE_HELP = ("recursive_multiscale: CoZ, each step's prompt sees the previous scale and the zoomed "
             "input (default); recursive: prompts from the zoomed input only; onestep: one SR step "
             "on the crop of scale 0 (the paper's baseline); bicubic, nearest: no model")


def add_model_arguments(p: argparse.ArgumentParser, unit: str, tokens: int, texts_flag: str, texts_help: str) -> None:
    """The backbone, precision, device and prompt options shared by coz-zoom, coz-upscale and
    coz-eval (``unit``: what gets a prompt, "step" or "tile"; ``texts_flag``: the option of the
    fixed per-unit prompts, stored as ``step_prompts``)."""
    p.add_argument("--backbone", default="x4plus",
                   help="embedded Real-ESRGAN name (x4plus, x4plus_anime, animevideov3) or a "
                   "Real-ESRGAN .safetensors/.pth file (default x4plus)")
    p.add_argument("--prompt", default="", help=f"user prompt appended to every {unit}'s prompt")
    p.add_argument("--precision", default="auto", choices=policy.SD3_PRESETS,
                   help="model precision (auto: bf16 where the device runs it well, else fp32). SD3 presets: "
                   "auto keeps the VAE in fp32 as the reference; reference: upstream's own precision bit for "
                   "bit, slower; fast: bf16 VAE, compiled; compact: fast with fp8 transformer and T5; "
                   "lowvram: compact, the VLM and SD3 take turns on the GPU")
    p.add_argument("--device", default=None,
                   help="torch device: cpu, cuda, cuda:N, mps (default: first CUDA GPU, else CPU)")
    p.add_argument("--seed", type=int, default=42, help="seed for sampling backbones (default 42, as the reference)")

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
    vlm.add_argument("--vlm", type=Path, help=f"a Qwen2.5-VL-Instruct folder: writes each {unit}'s prompt")
    vlm.add_argument("--vlm-adapter", type=Path,
                     help="CoZ's GRPO prompt adapter folder (ckpt/VLM_LoRA/checkpoint-10000) or another PEFT LoRA "
                     "folder, merged into the VLM")
    vlm.add_argument("--prompt-type", choices=factory.PROMPT_TYPES, default=None,
                     help="vlm: --vlm with the GRPO --vlm-adapter (CoZ's paper); vlm_base: plain --vlm; fixed: "
                     f"{texts_flag}; none: --prompt alone. Default: what the options given make")
    vlm.add_argument("--vlm-tokens", type=int, default=tokens,
                     help=f"max new tokens per prompt (default {tokens}, as CoZ's current code)")
    vlm.add_argument(texts_flag, dest="step_prompts", default=None, help=texts_help)


def add_chain_arguments(p: argparse.ArgumentParser) -> None:
    """Inputs, output, chain geometry and colour: shared by coz-zoom and coz-eval."""
    p.add_argument("inputs", nargs="*", metavar="IMAGE_OR_FOLDER", help="images or folders of images")
    p.add_argument("-o", "--output", required=True, type=Path, help="output folder")
    p.add_argument("--steps", type=int, default=4,
                   help="zoom steps, 1 to 64 with zoom ^ steps at most 2^%d (default 4: 256x at zoom 4)"
                   % MAX_MAGNIFICATION_LOG2)
    p.add_argument("--zoom", type=float, default=4.0, help="magnification per step, above 1 and at most 64 (default 4)")
    p.add_argument("--size", type=lambda t: _pair(t, int, "--size"), default=(512, 512),
                   help="process size, W or WxH, 8 to 16384 pixels (default 512)")
    p.add_argument("--center", type=_center, default=None,
                   help="zoom target x,y, each 0..1 of the input (default 0.5,0.5; on the bundled "
                   "sample its mission patch)")
    p.add_argument("--color", choices=sorted(COLOR_METHODS), default="wavelet",
                   help="colour alignment after each SR step: wavelet (default), adain, bilateral "
                   "(edge-aware) or none (the reference)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no notes")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="coz-zoom",
        description="Chain-of-Zoom: zoom into an image step by step (4x, 16x, 64x, 256x ...) "
        "with one SR model. Without IMAGE, zooms into the bundled sample photo.",
    )
    add_chain_arguments(p)
    p.add_argument("--mode", choices=MODES, default="recursive_multiscale", help=MODE_HELP)
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing result folders in OUT as a whole (default: refuse)")
    p.add_argument("--allow-large", action="store_true",
                   help="read images above Pillow's pixel limit (a guard against decompression bombs); "
                   "they are reduced while read, since scale 0 needs only a downscaled copy")

    add_model_arguments(p, "step", policy.VLM_TOKENS, "--step-prompts",
                        "without --vlm: prompts per step separated by '|' (the last repeats)")

    video = p.add_argument_group("zoom video (encoded with PyAV, no ffmpeg program needed)")
    video.add_argument("--video", type=Path, default=None,
                       help="also write a continuous zoom video from the scales: a file name (.mp4, .mov, "
                       ".mkv, .webm), written into each input's output folder")
    video.add_argument("--fps", type=float, default=30.0, help="video frame rate (default 30)")
    video.add_argument("--seconds", type=float, default=8.0, help="video length in seconds (default 8)")
    video.add_argument("--video-direction", choices=["in", "out", "pingpong"], default="in",
                       help="zoom in, out, or in and back out (loops seamlessly); default in")
    return p


def step_texts(args: argparse.Namespace) -> list[str]:
    return args.step_prompts.split("|") if args.step_prompts else []


class _Notes(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)  # the stderr of the moment


_NOTES = _Notes()


def show_notes(prog: str, quiet: bool) -> None:
    """The library's notes (``coz_core`` INFO logs: one-time compilation) on stderr as "prog: ...",
    unless ``quiet``; one handler however often it is called."""
    logger = logging.getLogger(__package__)
    logger.removeHandler(_NOTES)
    if quiet:
        return
    _NOTES.setFormatter(logging.Formatter(f"{prog}: %(message)s"))
    logger.addHandler(_NOTES)
    logger.setLevel(logging.INFO)


def build_prompt_source(args: argparse.Namespace, device: torch.device):
    """The prompt source of --prompt-type: Qwen2.5-VL (vlm, vlm_base), per-step texts or none."""
    return factory.prompt_source(args.prompt_type, device, args.precision, vlm=args.vlm, adapter=args.vlm_adapter,
                                 texts=step_texts(args), max_new_tokens=args.vlm_tokens)


def collect_inputs(inputs: list[str]) -> list[Path]:
    """Expand folders (their images, sorted; other files are reported); every named file must exist."""
    if not inputs:
        return [sample_image_path()]
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(f for f in item.iterdir() if f.is_file() and not f.name.startswith("."))
            images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
            if not images:
                raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in folder {item}")
            others = [f.name for f in files if f not in images]
            if others:
                shown = ", ".join(others[:5]) + (" ..." if len(others) > 5 else "")
                print(f"coz-zoom: {item}: skipping {len(others)} file(s) without an image suffix: {shown}",
                      file=sys.stderr)
            found.extend(images)
        elif item.is_file():
            found.append(item)
        else:
            raise FileNotFoundError(f"input not found: {item}")
    return found


def build_backbone(args: argparse.Namespace, device: torch.device):
    """The SR backbone the arguments ask for: CoZ SD3 with --sd3, else a Real-ESRGAN model."""
    if args.sd3 is None:
        if args.precision not in policy.PRECISIONS:
            raise ValueError(f"--precision {args.precision} is a preset of the CoZ SD3 backbone (--sd3) only; "
                             f"choose one of {', '.join(policy.PRECISIONS)}")
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
        img = step.image[:1].clone().cpu()
        nxt = result.steps[i + 1] if i + 1 < len(result.steps) else None
        if nxt is not None and nxt.crop is not None and result.config.mode not in ("onestep", "bicubic", "nearest"):
            x0, y0, x1, y1 = nxt.crop
            color = torch.tensor([1.0, 0.85, 0.0]).view(1, 3, 1, 1)
            lw = max(1, img.shape[-1] // 128)
            img[..., y0:y1, x0:x0 + lw] = color
            img[..., y0:y1, x1 - lw:x1] = color
            img[..., y0:y0 + lw, x0:x1] = color
            img[..., y1 - lw:y1, x0:x1] = color
        w = round(img.shape[-1] * height / img.shape[-2])
        tiles.append(resize(img, (height, w), "bicubic").clamp(0, 1))
        tiles.append(torch.ones(1, 3, height, 4))
    return torch.cat(tiles[:-1], dim=-1)


def backbone_details(backbone, file: str | None) -> dict:
    """What the manifest records about the SR model: results differ by each of these."""
    details: dict = {"name": backbone.name, "file": file, "uses_prompt": bool(getattr(backbone, "uses_prompt", False))}
    for attr in ("scale", "tile", "overlap", "latent_mode"):
        if getattr(backbone, attr, None) is not None:
            details[attr] = getattr(backbone, attr)
    if is_dataclass(getattr(backbone, "tiles", None)):
        details["tiles"] = asdict(backbone.tiles)
    dtypes = {}
    if isinstance(getattr(backbone, "dtype", None), torch.dtype):
        dtypes["model"] = backbone.dtype
    for part in ("transformer", "vae"):
        module = getattr(backbone, part, None)
        if isinstance(module, torch.nn.Module):
            dtypes[part] = next(module.parameters()).dtype
    details["dtypes"] = {k: str(v).removeprefix("torch.") for k, v in dtypes.items()}
    return details


def _in_file_pixels(result: ChainResult, loaded: LoadedImage) -> ChainResult:
    """Boxes and magnifications of a chain run on a reduced copy, in the file's own pixels."""
    sx, sy = loaded.scale
    if (sx, sy) != (1.0, 1.0):
        for step in result.steps:
            b = step.box
            step.box = Box(b.left * sx, b.top * sy, b.right * sx, b.bottom * sy)
            if step.magnification_log2 is not None:
                step.magnification_log2 -= math.log2(sx)
        result.input_size = loaded.size
    return result


def write_outputs(result: ChainResult, folder: Path, source: Path, backbone_name: str, extra: dict,
                  icc_profile: bytes | None = None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    batch = result.final.shape[0]
    for step in result.steps:
        for b in range(batch):
            suffix = f"_b{b}" if batch > 1 else ""
            save_image(step.image[b], folder / f"scale_{step.index}{suffix}.png", icc_profile)
            if step.zoomed is not None:
                save_image(step.zoomed[b], folder / f"zoomed_{step.index}{suffix}.png", icc_profile)
    save_image(make_strip(result), folder / "strip.png", icc_profile)
    lines = [f"{s.index}: {' | '.join(s.prompts)}" for s in result.steps[1:]]
    if not extra.get("prompts_used", True):
        lines.insert(0, f"# unused: the {backbone_name} backbone takes no prompt; these are recorded only")
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


def write_results(result: ChainResult, folder: Path, source: Path, label: str, extra: dict,
                  args: argparse.Namespace, icc_profile: bytes | None = None) -> None:
    """Every file of one input into ``folder``: the scales, strip, prompts, manifest, and the zoom
    video when asked for (not for a cancelled chain)."""
    write_outputs(result, folder, source, label, extra, icc_profile)
    if args.video is not None and len(result.steps) > 1 and not result.cancelled:
        write_video_of(result, folder / args.video, args)


def write_video_of(result: ChainResult, path: Path, args: argparse.Namespace) -> None:
    """The zoom video of ``result`` (coz_core.video), with a progress bar per frame."""
    from tqdm import tqdm

    from .video import save_zoom_video

    with tqdm(desc=path.name, unit="frame", disable=args.quiet) as bar:
        def on_frame(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        save_zoom_video(result, path, args.fps, args.seconds, args.video_direction, on_frame)


MODEL_PATHS = ("sd3", "coz_lora", "coz_vae", "clip_l", "clip_g", "t5", "tokenizers", "vlm", "vlm_adapter")


def check_model_paths(args: argparse.Namespace) -> None:
    """Every model file or folder named on the command line exists (before any of them loads)."""
    for name in MODEL_PATHS:
        path = getattr(args, name, None)
        if path is not None and not Path(path).exists():
            raise FileNotFoundError(f"--{name.replace('_', '-')} {path}: no such file or folder")


def prepare(args: argparse.Namespace, config: ChainConfig):
    """Every check that needs no model (settings, device, inputs, output), then the models.

    Returns (inputs, folder names, backbone or None, prompt source, manifest facts)."""
    config.validate_settings()
    factory.prompt_type(args.prompt_type, args.vlm, args.vlm_adapter, step_texts(args))
    check_model_paths(args)
    device = policy.parse_device(args.device)
    inputs = collect_inputs(args.inputs)
    names = folder_names(inputs)
    check_output(args.output, names, args.overwrite)
    if args.video is not None:
        from .video import check_output as check_video

        check_video(args.video, args.fps, args.seconds)
    dtype = policy.resolve_dtype(args.precision if args.precision in policy.PRECISIONS else "auto", device)
    warning = policy.warn_slow_precision(dtype, device)
    if warning:
        print(f"coz-zoom: warning: {warning}", file=sys.stderr)
    backbone = None
    if config.mode in ("recursive_multiscale", "recursive", "onestep"):
        backbone = build_backbone(args, device)
    config.validate(backbone)
    prompts = build_prompt_source(args, device)
    setup = policy.sd3_setup(args.precision, device) if args.sd3 is not None else None
    if setup is not None and setup.take_turns:
        from .residency import take_turns

        backbone, prompts = take_turns(backbone, prompts, device)
    used = backbone is not None and bool(getattr(backbone, "uses_prompt", False))
    if not used and (args.prompt or args.step_prompts or args.vlm):
        print(f"coz-zoom: note: {backbone.name if backbone else config.mode} takes no prompt; "
              "prompts are recorded as unused", file=sys.stderr)
    file = str(args.sd3) if args.sd3 else args.backbone
    facts = {"device": str(device), "precision": {"requested": args.precision},
             "prompts_used": used}
    if setup is not None and setup.chosen:
        facts["precision"]["auto_chose"] = setup.chosen
    if backbone is not None:
        facts["backbone_details"] = backbone_details(backbone, file)
        facts["precision"]["dtypes"] = facts["backbone_details"]["dtypes"]
    return inputs, names, backbone, prompts, facts


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except KeyboardInterrupt:  # during start-up (model loading); the chain keeps its own scales
        print("coz-zoom: interrupted", file=sys.stderr)
        return 130


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_notes("coz-zoom", args.quiet)
    center = args.center or (SAMPLE_CENTER if not args.inputs else (0.5, 0.5))
    config = ChainConfig(mode=args.mode, steps=args.steps, zoom=args.zoom, size=args.size,
                         center=center, color=args.color, user_prompt=args.prompt, seed=args.seed)
    try:
        inputs, names, backbone, prompts, facts = prepare(args, config)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"coz-zoom: {exc}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    failures = 0
    for path, name in zip(inputs, names):
        try:
            loaded = read_image(path, allow_large=args.allow_large, process_size=config.size)
        except ImageTooLarge as exc:
            print(f"coz-zoom: skipping: {exc}; pass --allow-large to process it", file=sys.stderr)
            failures += 1
            continue
        except (ValueError, FileNotFoundError) as exc:  # the message names the file
            print(f"coz-zoom: skipping: {exc}", file=sys.stderr)
            failures += 1
            continue
        image = loaded.image
        bar = tqdm(total=config.steps + 1, desc=path.name, unit="scale", disable=args.quiet)
        done: list[ZoomStep] = []
        t0 = time.perf_counter()
        try:
            result = run_chain(image, backbone, config, prompts, on_step=lambda s: (done.append(s), bar.update(1)))
        except KeyboardInterrupt:  # Ctrl-C: keep the scales already made
            result = ChainResult(done, config, (image.shape[-1], image.shape[-2]), cancelled=True,
                                 prompt=prompt_info(prompts))
        bar.close()
        result = _in_file_pixels(result, loaded)
        label = backbone.name if backbone is not None else config.mode
        out = args.output / name
        extra = {**facts, "input_notes": loaded.notes, "seconds_total": time.perf_counter() - t0}
        if result.steps:
            try:
                write_atomically(out, lambda tmp: write_results(result, tmp, path, label, extra, args,
                                                                loaded.icc_profile))
            except OSError as exc:
                print(f"coz-zoom: could not write the results of {path} to {out} ({exc}); "
                      "nothing of it was kept", file=sys.stderr)
                if result.cancelled:
                    return 130
                failures += 1
                continue
        if result.cancelled:
            print(f"coz-zoom: interrupted; {len(result.steps)} scales of {path.name} kept in {out}", file=sys.stderr)
            return 130
        print(f"{path.name}: {len(result.steps) - 1} steps, {result.zoom_of(result.steps[-1]):g}x -> {out}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
