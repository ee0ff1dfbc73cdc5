"""One policy for where models run and in what precision, shared by the CLI and the nodes.

Every face (``coz-zoom``, the ComfyUI nodes, scripts) asks this module; none re-decides. The
host adapter (nodes/host.py) only supplies the device ComfyUI picked.

- ``auto`` precision: bfloat16 on CUDA GPUs that support it (float16 on older ones), float16 on
  Apple's MPS, bfloat16 on CPUs with native bf16 (2.5x to 5x faster than float32 there and
  visually identical), else float32.
- Compilation: only where torch.compile can generate the device's code (Triton on CUDA).
- SD3 presets name one dtype per component (transformer, VAE, CLIP-L/G, T5).
- Tiles: one default size and overlap for every tiled model run.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# Upscale models run in tiles of at most TILE x TILE input pixels, each with TILE_OVERLAP pixels of
# context on every side (64 keeps Real-ESRGAN x4plus within ~1e-3 of the untiled result).
TILE = 512
TILE_OVERLAP = 64

# New tokens per VLM prompt: the chain's (upstream's current value; the first release used 128).
VLM_TOKENS = 32

# Whole-image upscaling (coz_core.upscale_image), in output pixels: SD3 tiles of upstream's 64
# latent cells with 16 cells of overlap; other backbones larger image tiles with the upscale overlap.
WHOLE_IMAGE_SD3_TILE, WHOLE_IMAGE_SD3_OVERLAP = 512, 128
WHOLE_IMAGE_TILE, WHOLE_IMAGE_OVERLAP = 1024, TILE_OVERLAP
# New tokens per tile prompt (upstream's inference_coz_full.py) and tile prompts per VLM batch.
VLM_TILE_TOKENS = 16
VLM_TILE_BATCH = 4


# --- devices -------------------------------------------------------------------------------

def default_device() -> torch.device:
    """The first CUDA device when there is one, else Apple's MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def parse_device(name: str | torch.device | None) -> torch.device:
    """A device name (``cpu``, ``cuda``, ``cuda:1``, ``mps``; None: :func:`default_device`),
    checked against what this torch build and machine offer."""
    if name is None or isinstance(name, torch.device):
        return name or default_device()
    try:
        device = torch.device(str(name).strip())
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch build" if torch.version.cuda is None else "no visible CUDA GPU"
            raise ValueError(f"device {name!r} is not available here ({build}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA GPU(s) visible")
    elif device.type == "mps" and not _mps_available():
        raise ValueError(f"device {name!r} is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unsupported device {name!r}; use cpu, cuda, cuda:N or mps")
    return device


# --- precision -----------------------------------------------------------------------------

def cpu_has_bf16() -> bool:
    """Whether this CPU runs bfloat16 natively (AVX512-BF16 / AMX / ARM BF16)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def auto_dtype(device: torch.device, half_ok: bool = True, bf16_ok: bool = True) -> torch.dtype:
    """What ``auto`` precision means on ``device`` for a model that allows float16 (``half_ok``)
    and bfloat16 (``bf16_ok``); e.g. spandrel's ``supports_half`` / ``supports_bfloat16``."""
    if device.type == "cuda":
        if bf16_ok and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if half_ok else torch.float32
    if device.type == "mps":
        return torch.float16 if half_ok else torch.float32
    if bf16_ok and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_dtype(precision: str | torch.dtype | None, device: torch.device,
                  half_ok: bool = True, bf16_ok: bool = True) -> torch.dtype:
    """``auto`` / None -> :func:`auto_dtype`; ``fp32`` / ``fp16`` / ``bf16`` (or a dtype) as given."""
    if isinstance(precision, torch.dtype):
        return precision
    if precision is None or precision == "auto":
        return auto_dtype(device, half_ok, bf16_ok)
    if precision not in DTYPES:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return DTYPES[precision]


def warn_slow_precision(dtype: torch.dtype, device: torch.device) -> str | None:
    """A warning when ``dtype`` is known to be much slower than the default on ``device``."""
    if device.type == "cpu" and dtype == torch.float16:
        return "float16 on the CPU is about 10x slower than bf16 or fp32 here; use --precision auto"
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_bf16():
        return "this CPU has no native bfloat16: bf16 is emulated and slow; use --precision auto (fp32)"
    return None


# --- compilation -------------------------------------------------------------------------

def compiles(device: torch.device, fp8: bool = False) -> bool:
    """Whether torch.compile's default backend (inductor) can generate code for ``device``: CUDA
    only here, with Triton (PyTorch bundles it on Linux, not on Windows: ``triton-windows``) and
    compute capability 7.0 or newer; with ``fp8`` (float8 e4m3 weights upcast inside the compiled
    code) 8.9 or newer: Triton has no e4m3 before Ada ("fp8e4nv not supported in this architecture")."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    from torch.utils._triton import has_triton

    return has_triton() and (not fp8 or torch.cuda.get_device_capability(device) >= (8, 9))


NOT_COMPILED = ("torch.compile cannot generate code for this GPU (no Triton: on Windows `pip install "
                "triton-windows`; or compute capability below 7.0)")


def compile_backend(backend: str | None, device: torch.device) -> str | None:
    """``backend``, except "inductor" on a GPU it cannot compile for (:func:`compiles`): "eager",
    dynamo's capture without code generation (the VLM's CUDA graphs still apply, not its fused kernels)."""
    if backend == "inductor" and device.type == "cuda" and not compiles(device):
        return "eager"
    return backend


# --- SD3 presets ---------------------------------------------------------------------------

SD3_PRECISIONS = (*PRECISIONS, "reference")


@dataclass(frozen=True)
class SD3Precision:
    """Storage/compute dtypes per SD3 component."""

    transformer: torch.dtype = torch.bfloat16
    vae: torch.dtype = torch.float32
    text: torch.dtype = torch.float16  # CLIP-L / CLIP-G (the reference runs them in float16)
    t5: torch.dtype = torch.bfloat16  # T5 compute dtype (float16 overflows in T5-XXL)
    # keep T5's linear weights in float8 e4m3, upcast per layer; None: when the file stores float8
    t5_fp8: bool | None = None
    # CoZ's AdaLayerNormZero LoRA: "merged" into the weights (fast) or "reference" (kept apart and
    # rounded to float16 as upstream's layer does; see coz_weights.ReferenceLoraLinear)
    adaln_lora: str = "merged"


def sd3_precision(preset: str, device: torch.device) -> SD3Precision:
    """The SD3 component dtypes of ``preset`` on ``device``.

    ``auto``: transformer in :func:`auto_dtype`, VAE in float32 (as the reference), CLIPs in
    float16 on GPUs (the reference's choice) and in the auto dtype elsewhere, T5 in bfloat16
    where supported. ``fp32`` / ``bf16`` / ``fp16``: everything in that dtype, except T5, which
    stays bfloat16 unless fp32 (float16 overflows in T5-XXL). ``reference``: upstream's own
    precision, bit for bit: transformer and VAE in float32 with CoZ's LoRA unmerged and its
    modulations rounded to float16, CLIPs and T5 in float16 (T5's ``wo`` kept in float32, as
    transformers keeps it); slower, for checking results against the reference code. Apple's GPUs
    (MPS) hold no float8: there T5 files stored in float8 are upcast as they load."""
    precision = _sd3_dtypes(preset, device)
    return replace(precision, t5_fp8=False) if device.type == "mps" else precision


def _sd3_dtypes(preset: str, device: torch.device) -> SD3Precision:
    if preset == "reference":
        return SD3Precision(transformer=torch.float32, vae=torch.float32, text=torch.float16, t5=torch.float16,
                            adaln_lora="reference")
    if preset == "auto":
        dtype = auto_dtype(device)
        text = torch.float16 if device.type == "cuda" else dtype
        t5 = torch.bfloat16 if dtype != torch.float32 or device.type == "cuda" else torch.float32
        return SD3Precision(transformer=dtype, vae=torch.float32, text=text, t5=t5)
    if preset not in DTYPES:
        raise ValueError(f"unknown SD3 precision preset {preset!r}; choose one of {', '.join(SD3_PRECISIONS)}")
    dtype = DTYPES[preset]
    return SD3Precision(transformer=dtype, vae=dtype, text=dtype,
                        t5=torch.float32 if dtype == torch.float32 else torch.bfloat16)


# --- speed and memory presets (SD3 with the VLM beside it) -----------------------------------
# Additive to the precision presets above; benchmarks/bench_gpu.py measures each with full-size
# models beside Qwen2.5-VL-3B in bf16 (targets: compact within 16 GiB, lowvram within 10 GiB).
# - ``fast``: bf16 VAE (its difference from fp32 is measured in the bench and the tests),
#   torch.compile of the transformer and text encoders (regional) and of the VAE (CUDA only, where
#   Triton can compile: :func:`compiles`; once per model).
# - ``compact``: ``fast`` with the linear weights of the transformer and of CLIP-L/G stored in
#   float8 (per-row scaled, upcast per layer) and T5 in float8: every model resident within 16 GiB.
# - ``lowvram``: ``compact`` without compilation, and the VLM and SD3 take turns on the GPU
#   (outside ComfyUI: coz_core/residency.py; inside it, ComfyUI's model management).
SD3_SPEED_PRESETS = ("fast", "compact", "lowvram")
SD3_PRESETS = (*SD3_PRECISIONS, *SD3_SPEED_PRESETS)  # what the CLI and the SD3 loader node offer


# ``auto`` on a CUDA GPU fits every model, Qwen2.5-VL-3B (bf16) beside SD3, into the card: the
# first tier whose floor the card's total memory reaches. Measured all-resident peaks (bench_gpu.py,
# H200, T5 in float8): auto 19.2 GiB, compact 15.6 GiB, lowvram 8.2 GiB; a T5 file in float16
# would add 4.4 GiB to auto, so below 32 GiB T5 is stored in float8 whatever the file holds.
AUTO_MEMORY_TIERS = ((32.0, "auto"), (22.0, "auto+t5fp8"), (15.0, "compact"), (0.0, "lowvram"))


@dataclass(frozen=True)
class SD3Setup:
    """How SD3 is stored, compiled and placed: the dtypes plus storage and residency switches."""

    precision: SD3Precision
    transformer_fp8: bool = False  # linear weights in float8 e4m3 with per-row scales
    text_fp8: bool = False  # CLIP-L/G linear weights likewise (T5: precision.t5_fp8)
    compile: bool = False  # CoZSD3Backbone.enable_compile (CUDA GPUs torch.compile can compile for)
    take_turns: bool = False  # the VLM leaves the GPU while SD3 runs, and SD3 while the VLM runs
    chosen: str = ""  # what ``auto`` chose for this card's memory ("" when not auto on a GPU)
    not_compiled: str = ""  # why a preset that compiles does not on this device ("" otherwise)


def device_memory_gib(device: torch.device) -> float | None:
    """Total memory of a CUDA device in GiB (None: not CUDA, or no such device here)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(device).total_memory / 1024**3


def sd3_setup(preset: str, device: torch.device, memory_gib: float | None = None) -> SD3Setup:
    """The :class:`SD3Setup` of a precision preset (``auto``, ``fp32``...) or a speed preset.

    ``auto`` on a CUDA GPU picks by the card's total memory (``memory_gib``; None: asks the
    device) from :data:`AUTO_MEMORY_TIERS`, and says which in ``chosen``."""
    if preset == "auto" and device.type == "cuda":
        memory = device_memory_gib(device) if memory_gib is None else memory_gib
        if memory is not None:
            tier = next(name for floor, name in AUTO_MEMORY_TIERS if memory >= floor)
            if tier.startswith("auto"):
                precision = sd3_precision("auto", device)
                if tier == "auto+t5fp8":
                    precision = replace(precision, t5_fp8=True)
                return SD3Setup(precision, chosen=f"{tier} ({memory:.0f} GiB GPU)")
            return replace(sd3_setup(tier, device), chosen=f"{tier} ({memory:.0f} GiB GPU)")
    if preset not in SD3_SPEED_PRESETS:
        return SD3Setup(sd3_precision(preset, device))
    if preset != "fast" and device.type == "mps":
        raise ValueError(f"the {preset} preset stores weights in float8, which Apple's GPUs (MPS) cannot hold; "
                         "choose auto or fast")
    precision = sd3_precision("auto", device)
    if precision.transformer == torch.bfloat16:  # never fp16: as ComfyUI, which runs this VAE in bf16 or fp32 only
        precision = replace(precision, vae=torch.bfloat16)
    compile = compiles(device)
    why = "" if compile or device.type != "cuda" else NOT_COMPILED
    if preset == "fast":
        return SD3Setup(precision, compile=compile, not_compiled=why)
    compact = replace(precision, t5_fp8=True)
    if preset == "compact":  # the float8 models stay uncompiled before Ada (CoZSD3Backbone.enable_compile)
        return SD3Setup(compact, transformer_fp8=True, text_fp8=True, compile=compile, not_compiled=why)
    return SD3Setup(compact, transformer_fp8=True, text_fp8=True, take_turns=True)


def vlm_fast_decode(device: torch.device, force: bool | None = None) -> bool:
    """Whether the VLM decodes through a static KV cache with compiled, CUDA-graph decoding:
    on for CUDA, off elsewhere (``force`` overrides)."""
    return device.type == "cuda" if force is None else bool(force)
