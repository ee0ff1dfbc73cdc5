"""The pack on a GPU, full-size models with random weights: one table of speed and memory.

Compute and memory do not depend on weight values, so the models are built from their
configurations directly on the device (SD3 medium from coz_core/configs/sd3_medium with CLIP-L/G
and T5-XXL, Qwen2.5-VL-3B from benchmarks/bench_vlm.py), and the pack's own classes run them:
- ``vlm``: one prompt step (2 images at 512, N new tokens) through plain ``generate`` and through
  the fast path (static KV cache, the decoding step compiled and replayed as one CUDA graph):
  prefill (also with transformers' window-by-window vision attention; alone, transformers' forward
  against prefill.py's, with the host syncs each makes), decode tokens/s (``--vlm-unfused``: also
  with the projections not fused), the prompt step and its preparation, the one-time compile and
  capture, whether both give the same tokens;
- ``sd3``: the SR step's parts (text encoding of a new prompt, VAE encode, transformer, VAE
  decode), VAE in float32 and bfloat16 with their difference, then compiled (transformer and VAE,
  then the text encoders' layers too);
- ``chain``: 4 steps at 512 with N-token prompts, per preset (default, fast, compact, lowvram):
  time, chain overhead (everything but the models), peak memory and how far above the resident
  weights each part of a step goes; and what ``auto`` chooses on 16, 24 and 80 GiB cards;
- ``upsample``: benchmarks/upsample_gpu.py's rows; ``wholeimage``: bench_upscale_image.gpu_rows.
Random VLM weights never emit the end token: ``min_new_tokens`` makes every prompt run to N.

Each section runs under its own time limit and never stops the others; rows print as they come
and go to ``--out`` (JSON) as they come; the table is printed again at the end.

    python benchmarks/bench_gpu.py                      # CUDA: full size; CPU: --tiny (seconds)
    python benchmarks/bench_gpu.py --sections vlm chain --out /tmp/bench_gpu.json
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import itertools
import json
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from coz_core.imageops import load_image  # noqa: E402
from coz_core import policy  # noqa: E402
from coz_core.policy import sd3_precision  # noqa: E402
from coz_core.prompt import attention, fused, prefill  # noqa: E402
from coz_core.prompt.base import PromptRequest  # noqa: E402
from coz_core.prompt.qwen import MULTISCALE_SYSTEM, QwenPromptSource, QwenVL  # noqa: E402
from coz_core.prompt.vision import prepare_images, prepare_on  # noqa: E402
from coz_core.residency import take_turns  # noqa: E402
from coz_core.sr.base import SRRequest  # noqa: E402
from coz_core.sr.coz_sd3 import CoZSD3Backbone  # noqa: E402
from coz_core.sr.sd3_loading import FP8, store_linears, tokenizer_paths_from_folder  # noqa: E402
from coz_core.sr.sd3_text import SD3TextEncoder  # noqa: E402
from coz_core.zoom import ChainConfig, run_chain  # noqa: E402

SECTIONS = ("vlm", "sd3", "chain", "upsample", "wholeimage")
GIB = 1024**3
# seconds per section (full size, H100/H200), each cut further so the whole run ends by --budget
LIMITS = {"build": 60, "vlm": 110, "sd3": 110, "chain": 130, "wholeimage": 40, "upsample": 60}
RESERVE = 25  # seconds kept for each section still to come


# --- reporting ---------------------------------------------------------------------------------

class Report:
    """Rows printed as they come and written to a JSON file after each one."""

    def __init__(self, path: Path | None, meta: dict) -> None:
        self.path, self.meta, self.rows = path, meta, []
        print(f"{'section':10} {'what':64} value", flush=True)

    def row(self, section: str, what: str, value: str, **data) -> None:
        self.rows.append({"section": section, "what": what, "value": value, **data})
        print(f"{section:10} {what:64} {value}", flush=True)
        self.save()

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({**self.meta, "rows": self.rows}, indent=1, default=str))

    def table(self) -> None:
        print("\n" + "=" * 100 + f"\n{'section':10} {'what':64} value\n" + "-" * 100)
        for r in self.rows:
            print(f"{r['section']:10} {r['what']:64} {r['value']}")
        print("=" * 100, flush=True)


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise SectionTimeout in this (main) thread after ``seconds``."""
    def fire(signum, frame):
        raise SectionTimeout(f"over its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_section(report: Report, name: str, seconds: float, fn, *args) -> None:
    start = time.perf_counter()
    print(f"--- {name} (limit {seconds:.0f} s)", flush=True)
    try:
        with time_limit(seconds):
            fn(*args)
    except Exception as exc:  # one failing section never stops the others
        report.row(name, "FAILED", f"{type(exc).__name__}: {str(exc)[:300]}")
        traceback.print_exc()
    print(f"--- {name} done in {time.perf_counter() - start:.1f} s", flush=True)


# --- measuring -----------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int = 2) -> float:
    """Best of ``repeats`` calls (callers warm up first)."""
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def dt(module: torch.nn.Module) -> str:
    """Short name of a module's (floating, non-float8) parameter dtype."""
    dtype = next(p.dtype for p in module.parameters() if p.dtype.itemsize > 1)
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def reset_peak(device: torch.device) -> float:
    """Reset the peak counter; the bytes allocated now (GiB)."""
    if device.type != "cuda":
        return 0.0
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / GIB


def peak(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else float("nan")


# --- models --------------------------------------------------------------------------------------

@dataclass
class Models:
    vlm: QwenVL | None = None
    sd3: CoZSD3Backbone | None = None


def build_vlm(tiny: bool, device: torch.device, tokens: int) -> QwenVL:
    from bench_vlm import make_config, vlm_from_config
    from qwen_fixtures import build_tokenizer, tiny_config
    from transformers import AutoTokenizer, Qwen2_5_VLConfig

    with tempfile.TemporaryDirectory() as tmp:
        ids = build_tokenizer(Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    if tiny:
        config, dtype = Qwen2_5_VLConfig(**tiny_config(ids, max(ids.values()) + 1)), torch.float32
    else:
        config, dtype = make_config(1.0, ids), torch.bfloat16
    vlm = vlm_from_config(config, dtype, str(device), tokenizer, ids)
    vlm.model.generation_config.min_new_tokens = tokens  # random weights: every prompt runs to the limit
    if tiny:
        vlm.compile_backend = None  # CPU smoke test: the static-cache path without code generation
    return vlm


def build_sd3(tiny: bool, device: torch.device, folder: Path) -> CoZSD3Backbone:
    """The default preset (policy ``auto``): transformer bf16, VAE fp32, CLIPs fp16, T5 bf16 with
    float8-stored linears (as sd3_medium_incl_clips_t5xxlfp8.safetensors gives); tiny: float32."""
    from sd3_fixtures import build_models, save_clip_tokenizer, save_t5_tokenizer

    save_clip_tokenizer(folder / "tokenizer", "<|endoftext|>")
    save_clip_tokenizer(folder / "tokenizer_2", "!")
    save_t5_tokenizer(folder / "tokenizer_3")
    if tiny:
        parts = {k: m.to(device) for k, m in build_models().items()}
    else:
        from bench_coz_sd3 import build

        d = sd3_precision("auto", device)
        parts = {"transformer": build("transformer", d.transformer, str(device)),
                 "vae": build("vae", d.vae, str(device)),
                 "clip_l": build("clip_l", d.text, str(device)), "clip_g": build("clip_g", d.text, str(device)),
                 "t5": build("t5", d.t5, str(device), fp8=True)}
    text = SD3TextEncoder(parts["clip_l"], parts["clip_g"], parts["t5"], tokenizer_paths_from_folder(folder),
                          joint_dim=parts["transformer"].config.joint_attention_dim)
    return CoZSD3Backbone(parts["transformer"], parts["vae"], text, latent_mode="sample")


def uncompile(backbone: CoZSD3Backbone) -> None:
    """Back to eager modules (Module.compile keeps the compiled call in _compiled_call_impl)."""
    for model in backbone.modules():
        for module in model.modules():
            if getattr(module, "_compiled_call_impl", None) is not None:
                module._compiled_call_impl = None
    backbone.compiled = False


# --- sections ------------------------------------------------------------------------------------

def section_vlm(report: Report, models: Models, args, device: torch.device) -> None:
    vlm, n, size = models.vlm, args.tokens, args.size
    g = torch.Generator().manual_seed(0)
    previous, zoomed = (torch.rand(1, 3, size, size, generator=g).to(device) for _ in range(2))
    request = PromptRequest(previous, zoomed, step=1)
    inputs = vlm.inputs(prepare_images(previous) + prepare_images(zoomed), MULTISCALE_SYSTEM)
    length = int(inputs["input_ids"].shape[1])
    source = QwenPromptSource(vlm, max_new_tokens=n, clean=False)
    results = {}
    runs = [("plain generate", False, False), ("fast path", True, True)]
    if device.type == "cuda" and args.vlm_unfused:
        runs.insert(1, ("fast path, projections as loaded", True, False))
    for label, fast, fuse in runs:
        vlm.fast_decode, vlm.fuse = fast, fuse
        if fast and vlm._step is not None and fuse != fused.is_fused(vlm.model):
            vlm.release()  # fused now: compiled and captured again
            vlm._forward = None
        try:
            results[label] = _vlm_rows(report, vlm, label, inputs, source, request, args, device, length)
            if fast:
                which = "fused" if fused.is_fused(vlm.model) else "as loaded"
                _prefill_rows(report, vlm, inputs, device, args.repeats, which)
        except SectionTimeout:
            raise
        except Exception as exc:
            if not fast:
                raise
            vlm.fast_decode = False  # the later sections run with plain generate
            report.row("vlm", "fast path FAILED (later sections use plain generate)",
                       f"{type(exc).__name__}: {str(exc)[:300]}")
            traceback.print_exc()
            return
    for label, tokens in results.items():
        if label != "plain generate":
            plain = results["plain generate"]
            same = torch.equal(plain, tokens)
            agree = int((plain[:tokens.numel()] == tokens[:plain.numel()]).long().cumprod(0).sum())
            report.row("vlm", f"{label} tokens == plain generate tokens ({n} greedy)",
                       "yes" if same else f"NO (the first {agree} agree)", identical=same, agree=agree)
    decoder = vlm._step
    if decoder is not None:
        report.row("vlm", "fast path: CUDA graphs captured (one per loaded model)", str(decoder.captures))
    resize = timed(lambda: prepare_images(previous) + prepare_images(zoomed), device, args.repeats)
    report.row("vlm", "prompt step: images to 8 bits, resized by Pillow (the reference's pixels)", ms(resize),
               seconds=resize)
    images = prepare_images(previous) + prepare_images(zoomed)
    on_device = timed(lambda: prepare_on(previous, device) + prepare_on(zoomed, device), device, args.repeats)
    report.row("vlm", "prompt step: the same with torch on the device (pillow_resize; a GPU's route)",
               ms(on_device), seconds=on_device)
    ours = prepare_on(previous, device) + prepare_on(zoomed, device)
    same = all(torch.equal(t.cpu(), torch.from_numpy(a)) for t, a in zip(ours, images, strict=True))
    report.row("vlm", "prompt step: its pixels == Pillow's", "yes" if same else "NO", identical=same)
    prep = timed(lambda: vlm.inputs(images, MULTISCALE_SYSTEM), device, args.repeats)
    report.row("vlm", "prompt step: its inputs (chat template, tokens, pixels patchified on the device)", ms(prep),
               seconds=prep)
    # whole-image tile prompts (one length): one by one, batches padded through generate (before),
    # batches decoded together on the fast path (the default on a GPU; last: it compiles first)
    tiles, tokens, batch = 8, args.tokens if args.tiny else policy.VLM_TILE_TOKENS, policy.VLM_TILE_BATCH
    views = torch.rand(tiles, 3, size, size, generator=g).to(device)
    request = PromptRequest(previous.expand(tiles, -1, -1, -1), views, 1)
    fast = vlm.fast_decode
    for label, size_of_batch, fast_decode in (
            ("one by one (a GPU: the fast path)", 1, fast),
            (f"{batch} per batch through generate, padded (before)", batch, False),
            (f"{batch} per batch, decoded together (a GPU: the fast path)", batch, fast)):
        vlm.fast_decode = fast_decode
        tile_source = QwenPromptSource(vlm, max_new_tokens=tokens, clean=False, batch_size=size_of_batch)
        tile_source(request)  # warm-up (and the batch's compile and capture)
        per_tile = timed(lambda: tile_source(request), device, 1) / tiles
        report.row("vlm", f"whole-image tile prompts ({tiles} tiles, {tokens} tokens): {label}",
                   f"{ms(per_tile)} per tile", seconds=per_tile)
    vlm.fast_decode = fast
    if vlm.model.config.vision_config._attn_implementation == attention.NAME:
        # the vision tower's attention as transformers runs it with "sdpa": one call per window
        vlm.model.set_attn_implementation({"vision_config": "sdpa"})
        try:
            before = timed(lambda: vlm.generate_ids(inputs, 1, min_new_tokens=1), device, args.repeats)
        finally:
            attention.use_fast_vision_attention(vlm.model)
        report.row("vlm", "fast path: prefill + 1st token, vision attention window by window (sdpa)", ms(before),
                   seconds=before)
    vlm.fast_decode = None  # policy default from here on: on for CUDA


@torch.inference_mode()
def _prefill_rows(report: Report, vlm: QwenVL, inputs: dict, device: torch.device, repeats: int, which: str) -> None:
    """The prompt's forward pass into the static cache: transformers' ``model(**batch)`` (inputs moved
    to the device first) against prefill.py's, eager and captured, with the host syncs each makes
    once its inputs are there."""
    model, cache = vlm.model, vlm._cache[0]
    positions = prefill.prompt_positions(model, inputs)
    options = {"cache": cache, "use_cache": True, "logits_to_keep": 1}

    def moved() -> dict:
        batch = {k: v.to(device) for k, v in inputs.items()}
        return {**batch, "pixel_values": batch["pixel_values"].to(vlm.dtype), "position_ids": positions.to(device)}

    def prepare() -> prefill.Prompt:
        return prefill.prepare(model, inputs, device, vlm.dtype)

    ways = {"transformers' forward": (moved, lambda batch: model(**batch, **options)),
            "prefill.py": (prepare, lambda prompt: prefill.run(model, prompt, **options))}
    if device.type == "cuda":
        captured = prefill.CapturedPrefill(model, cache)

        def replay(prompt: prefill.Prompt) -> None:
            if captured(prompt) is None:
                raise RuntimeError("this prefill could not be captured")

        ways["prefill.py, one CUDA graph"] = (prepare, replay)
    for label, (make, run) in ways.items():
        def once():
            cache.reset()
            run(make())
        try:
            once()
        except RuntimeError as exc:
            report.row("vlm", f"prefill alone, {label}, {which}: FAILED", f"{type(exc).__name__}: {str(exc)[:300]}")
            traceback.print_exc()
            continue
        seconds = timed(once, device, repeats)
        syncs, wall, busy = [], float("nan"), float("nan")
        if device.type == "cuda":
            walls = []
            for _ in range(repeats):  # with its inputs on the device
                cache.reset()
                ready = make()
                sync(device)
                t0 = time.perf_counter()
                run(ready)
                sync(device)
                walls.append(time.perf_counter() - t0)
            wall = min(walls)
            cache.reset()
            ready = make()
            sync(device)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profile:
                run(ready)
                sync(device)
            kernels = profile.key_averages()  # the GPU's own time: its kernels' durations, summed
            busy = sum(k.self_device_time_total for k in kernels) / 1e6
            table = kernels.table(sort_by="self_cuda_time_total", row_limit=14)
            print(f"prefill kernels ({label}, {which}):\n{table}", flush=True)
            cache.reset()
            ready = make()
            sync(device)
            torch.cuda.set_sync_debug_mode("warn")
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    run(ready)
            finally:
                torch.cuda.set_sync_debug_mode(0)
            syncs = [w for w in caught if "synchroniz" in str(w.message)]
            for w in syncs:
                print(f"  sync in the prefill ({label}, {which}): {w.filename}:{w.lineno}", flush=True)
        report.row("vlm", f"prefill alone, {label}, {which}: time; inputs on the GPU; its kernels; host syncs",
                   f"{ms(seconds)}; {ms(wall)}; {ms(busy)}; {len(syncs)}", seconds=seconds, gpu=busy,
                   syncs=len(syncs))


def _vlm_rows(report, vlm, label, inputs, source, request, args, device, length) -> torch.Tensor:
    n, fast = args.tokens, bool(vlm.fast_decode)
    start = time.perf_counter()
    ids = vlm.generate_ids(inputs, n, min_new_tokens=n)  # warm-up; the fast path compiles here
    sync(device)
    first = time.perf_counter() - start
    step_n = timed(lambda: vlm.generate_ids(inputs, n, min_new_tokens=n), device, args.repeats)
    prefill = timed(lambda: vlm.generate_ids(inputs, 1, min_new_tokens=1), device, args.repeats)
    step = timed(lambda: source(request), device, args.repeats)
    rate = (n - 1) / (step_n - prefill) if step_n > prefill else float("nan")  # nan: too short to time
    report.row("vlm", f"{label}: prefill + 1st token ({length} prompt tokens)", ms(prefill), seconds=prefill)
    report.row("vlm", f"{label}: decode", f"{rate:.0f} tokens/s", tokens_per_s=rate)
    report.row("vlm", f"{label}: prompt step, 2 images {args.size}, {n} new tokens", ms(step), seconds=step)
    if fast:
        report.row("vlm", "fast path: one-time compile/capture (first call - steady)",
                   f"{first - step_n:.1f} s", seconds=first - step_n)
    return ids


_PROMPTS = itertools.count()  # every "new prompt" is new to the text encoder's cache


def _sd3_parts(report: Report, b: CoZSD3Backbone, label: str, x: torch.Tensor, device, repeats: int) -> None:
    counter = _PROMPTS
    b.latent_mode = "sample"
    cond = b.text_encoder(["a photo"])
    z = b.encode(x * 2 - 1)
    v = b.velocity(z, cond)
    b.decode(z - v)
    prompt_s = timed(lambda: b.text_encoder([f"new prompt {next(counter)}"]), device, repeats)
    enc = timed(lambda: b.encode(x * 2 - 1), device, repeats)
    vel = timed(lambda: b.velocity(z, cond), device, repeats)
    dec = timed(lambda: b.decode(z - v), device, repeats)
    req = SRRequest(x, x, ["a photo"])
    step = timed(lambda: b(req), device, repeats)
    step_new = timed(lambda: b(SRRequest(x, x, [f"new prompt {next(counter)}"])), device, repeats)
    for what, s in (("text encoding of a new prompt (CLIP-L/G, T5)", prompt_s), ("VAE encode", enc),
                    ("transformer", vel), ("VAE decode", dec), ("whole step, prompt cached", step),
                    ("whole step, new prompt", step_new)):
        report.row("sd3", f"{label}: {what}", ms(s), seconds=s)


def section_sd3(report: Report, models: Models, args, device: torch.device) -> None:
    b, size = models.sd3, args.size
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)
    _sd3_parts(report, b, f"{dt(b.transformer)} transformer, {dt(b.vae)} VAE", x, device, args.repeats)
    # bf16 VAE: the same weights, cast; the difference of the whole step, deterministic latents
    vae32 = b.vae
    half = next(b.transformer.parameters()).dtype if device.type == "cuda" else torch.bfloat16
    vae16 = copy.deepcopy(vae32).to(half)
    b.latent_mode = "mean"
    req = SRRequest(x, x, ["a photo"])
    ref = b(req)
    b.vae = vae16
    out = b(req)
    diff = (out - ref).abs()
    psnr = float(-10 * torch.log10(((out - ref) ** 2).mean().clamp_min(1e-20)))
    report.row("sd3", f"VAE {dt(vae16)} vs {dt(vae32)}, whole step output (0..1)",
               f"max {diff.max():.4f}, mean {diff.mean():.5f}, PSNR {psnr:.1f} dB",
               max=float(diff.max()), mean=float(diff.mean()), psnr=psnr)
    _sd3_parts(report, b, f"{dt(b.transformer)} transformer, {dt(vae16)} VAE", x, device, args.repeats)
    del vae32
    if device.type != "cuda" and not args.compile_on_cpu:
        report.row("sd3", "compiled", "skipped on CPU")
        return
    # in two stages, so that the transformer's rows are in even if the text encoders run out of time
    b.latent_mode = "sample"
    vae = not args.no_compile_vae
    for label, options in (("transformer" + (" + VAE" if vae else ""), {"text": False, "vae": vae}),
                           ("+ CLIP/T5 layers", {"transformer": False, "text": True, "vae": False})):
        b.enable_compile(**options, backend=args.compile_backend)
        start = time.perf_counter()
        b(SRRequest(x, x, [f"compile warm-up {label}"]))
        sync(device)
        report.row("sd3", f"compile of the {label}: first step", f"{time.perf_counter() - start:.1f} s")
        _sd3_parts(report, b, f"compiled {label}, {dt(b.vae)} VAE", x, device, args.repeats)


def _chain_rows(report: Report, label: str, models: Models, args, device, backbone=None, source=None) -> None:
    image = load_image(ROOT / "coz_core" / "data" / "sample.png").to(device)
    config = ChainConfig(steps=args.steps, size=(args.size, args.size))
    backbone = backbone or models.sd3
    source = source or QwenPromptSource(models.vlm, max_new_tokens=args.tokens)
    run_chain(image, backbone, ChainConfig(steps=1, size=config.size), source)  # warm-up (compiles)
    resident = reset_peak(device)
    sync(device)
    start = time.perf_counter()
    result = run_chain(image, backbone, config, source)
    sync(device)
    wall = time.perf_counter() - start
    steps = result.steps[1:]
    prompt = sum(s.seconds["prompt"] for s in steps) / len(steps)
    model = sum(s.seconds["model"] for s in steps) / len(steps)
    total = sum(s.seconds["total"] for s in steps) / len(steps)
    overhead = total - prompt - model
    report.row("chain", f"{label}: {args.steps} steps at {args.size}, {args.tokens}-token prompts", f"{wall:.2f} s",
               seconds=wall)
    report.row("chain", f"{label}: per step prompt / SR model / chain overhead",
               f"{ms(prompt)} / {ms(model)} / {ms(overhead)} ({100 * overhead / total:.1f}% of {ms(total)})",
               prompt=prompt, model=model, overhead=overhead, total=total)
    if device.type == "cuda":
        report.row("chain", f"{label}: GPU memory resident before / peak", f"{resident:.2f} / {peak(device):.2f} GiB",
                   resident_gib=resident, peak_gib=peak(device))
    if isinstance(backbone, CoZSD3Backbone):
        _phase_peaks(report, label, backbone, source, device, args.size)


def _phase_peaks(report: Report, label: str, b: CoZSD3Backbone, source, device, size: int) -> None:
    """How far above the resident weights each part of a step goes: where the peak comes from."""
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(2)).to(device)
    z = b.encode(x * 2 - 1)
    cond = b.text_encoder(["a photo"])
    parts = {"prompt step": lambda: source(PromptRequest(x, x, step=1)),
             "text encoding": lambda: b.text_encoder([f"peak {next(_PROMPTS)}"]),
             "VAE encode": lambda: b.encode(x * 2 - 1), "transformer": lambda: b.velocity(z, cond),
             "VAE decode": lambda: b.decode(z)}
    above = []
    for name, fn in parts.items():
        base = reset_peak(device)
        fn()
        above.append(f"{name} {peak(device) - base:.2f}")
    report.row("chain", f"{label}: GiB above resident per part", ", ".join(above))


def section_chain(report: Report, models: Models, args, device: torch.device) -> None:
    b = models.sd3
    b.latent_mode = "sample"
    cuda = device.type == "cuda"
    # fast: bf16 VAE, compiled (as the sd3 section left it, or compiled here)
    if cuda:
        b.vae = b.vae.to(torch.bfloat16)
    if not b.compiled and (cuda or args.compile_on_cpu):
        b.enable_compile(vae=not args.no_compile_vae, backend=args.compile_backend)
    _chain_rows(report, "fast", models, args, device)
    # default preset: fp32 VAE, not compiled (the VLM's fast path is on by default on CUDA)
    uncompile(b)
    b.vae = b.vae.float()
    _chain_rows(report, "default (auto)", models, args, device)
    # compact: bf16 VAE, the linears of the transformer and CLIP-L/G in scaled float8 (T5's already), compiled
    if cuda:
        b.vae = b.vae.to(torch.bfloat16)
    for model in (b.transformer, b.text_encoder.models["clip_l"], b.text_encoder.models["clip_g"]):
        store_linears(model, FP8, scaled=True)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    if cuda or args.compile_on_cpu:
        b.enable_compile(vae=not args.no_compile_vae, backend=args.compile_backend)
    _chain_rows(report, "compact", models, args, device)
    chosen = [policy.sd3_setup("auto", torch.device("cuda"), memory_gib=m).chosen.split()[0] for m in (16, 24, 80)]
    report.row("chain", "what auto chooses on a 16 / 24 / 80 GiB GPU", " / ".join(chosen), auto_16=chosen[0])
    if args.no_lowvram:
        return
    # lowvram: compact, and the VLM and SD3 take turns on the GPU; as coz-zoom runs it, the VLM on
    # its fast path (its CUDA graphs captured again after every move; measured until 2026-11-26
    # with plain generate instead)
    turned, source = take_turns(b, QwenPromptSource(models.vlm, max_new_tokens=args.tokens), device)
    try:
        _chain_rows(report, "lowvram (compact + VLM/SD3 take turns)", models, args, device, turned, source)
    finally:
        turned.turns.activate("sr")
        for m in turned.turns.groups["prompt"]:
            m.to(device)


def section_upsample(report: Report, models: Models, args, device: torch.device) -> None:
    try:
        import upsample_gpu
    except ImportError:
        report.row("upsample", "benchmarks/upsample_gpu.py", "absent")
        return
    for what, value in upsample_gpu.measure(device, args.tiny):
        report.row("upsample", what, value)


def section_wholeimage(report: Report, models: Models, args, device: torch.device) -> None:
    try:
        import bench_upscale_image
    except ImportError:
        report.row("wholeimage", "benchmarks/bench_upscale_image.py", "absent")
        return
    if not hasattr(bench_upscale_image, "gpu_rows"):
        report.row("wholeimage", "bench_upscale_image.gpu_rows", "absent")
        return
    for what, value in bench_upscale_image.gpu_rows(models.sd3, device):
        report.row("wholeimage", what, value)


# --- main ----------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", default=None, help="tiny models (default on CPU)")
    parser.add_argument("--size", type=int, default=None, help="process size (512; tiny: 32)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per prompt (32; tiny: 4)")
    parser.add_argument("--steps", type=int, default=None, help="chain steps (4; tiny: 2)")
    parser.add_argument("--repeats", type=int, default=None, help="best of (3; tiny: 1)")
    parser.add_argument("--no-compile-vae", action="store_true", help="compile the transformer and text encoders only")
    parser.add_argument("--no-lowvram", action="store_true", help="leave out the lowvram chain (slow: weights move)")
    parser.add_argument("--vlm-unfused", action="store_true",
                        help="also time the fast path with the projections as loaded (another compile)")
    parser.add_argument("--compile-on-cpu", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)  # "eager": CPU checks
    parser.add_argument("--time-scale", type=float, default=1.0, help="multiply every section's time limit")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds for the whole run (full size)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "bench_gpu.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.tiny is None:
        args.tiny = device.type != "cuda"
    args.size = args.size or (32 if args.tiny else 512)
    args.tokens = args.tokens or (4 if args.tiny else 32)
    args.steps = args.steps or (2 if args.tiny else 4)
    args.repeats = args.repeats or (1 if args.tiny else 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    import transformers

    meta = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "tiny": args.tiny, "size": args.size, "tokens": args.tokens, "steps": args.steps}
    print(f"bench_gpu: {name}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{'tiny models' if args.tiny else 'full-size models, random weights'}", flush=True)
    report = Report(args.out, meta)
    deadline = time.perf_counter() + args.budget * args.time_scale
    order = [k for k in LIMITS if k == "build" or k in args.sections]

    def limit(key: str) -> float:
        later = len(order) - order.index(key) - 1
        return max(5.0, min(LIMITS[key] * args.time_scale, deadline - time.perf_counter() - RESERVE * later))
    torch.manual_seed(0)

    models = Models()
    need_vlm = {"vlm", "chain"} & set(args.sections)
    need_sd3 = {"sd3", "chain", "wholeimage"} & set(args.sections)
    with tempfile.TemporaryDirectory() as tmp:
        def build() -> None:
            if need_vlm:
                models.vlm = build_vlm(args.tiny, device, args.tokens)
                report.row("build", "Qwen2.5-VL" + (" (tiny)" if args.tiny else "-3B bf16"),
                           f"{sum(p.numel() for p in models.vlm.model.parameters()) / 1e9:.3f} B parameters")
            if need_sd3:
                models.sd3 = build_sd3(args.tiny, device, Path(tmp))
                params = sum(p.numel() for m in models.sd3.modules() for p in m.parameters())
                params += sum(b.numel() for m in models.sd3.modules() for b in m.buffers())
                report.row("build", "SD3 medium + CLIP-L/G + T5-XXL" + (" (tiny)" if args.tiny else ""),
                           f"{params / 1e9:.3f} B parameters")
            if device.type == "cuda":
                report.row("build", "GPU memory allocated after building",
                           f"{torch.cuda.memory_allocated(device) / GIB:.2f} GiB")

        if need_vlm or need_sd3:
            run_section(report, "build", limit("build"), build)
        for name_ in ("vlm", "sd3", "chain", "wholeimage"):
            if name_ in args.sections:
                if (name_ in need_vlm and models.vlm is None) or (name_ in need_sd3 and models.sd3 is None):
                    report.row(name_, "skipped", "its models were not built")
                    continue
                run_section(report, name_, limit(name_), globals()[f"section_{name_}"], report, models, args, device)
        models.vlm = models.sd3 = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if "upsample" in args.sections:
            run_section(report, "upsample", limit("upsample"), section_upsample, report, models, args, device)
    report.table()


if __name__ == "__main__":
    main()
