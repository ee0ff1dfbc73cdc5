"""The host adapter: the ONLY module of the pack that imports ComfyUI (comfy, folder_paths).

Inside ComfyUI it uses the host's device and dtype choices, model management (models wrapped in
ModelPatcher and loaded with ``load_models_gpu``, so CoZ models take turns on the GPU with
everything else), progress bar with previews, user cancellation and model folders. Without
ComfyUI (tests, scripts) it falls back to plain torch: the first CUDA device or the CPU, a
cancellation flag, and model folders under ``$COZ_MODELS_DIR`` (default ``./models``).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..coz_core import policy

try:  # ComfyUI puts these on the import path; nothing else of the pack imports them
    import comfy.model_management as _mm
    import comfy.model_patcher as _patcher
    import comfy.patcher_extension as _extension
    import comfy.utils as _cutils
    import folder_paths as _folders
except ImportError:
    _mm = _patcher = _extension = _cutils = _folders = None

IN_COMFY = _folders is not None

# (folder name, extensions, default sub-folder of the models directory)
WEIGHT_EXTENSIONS = (".safetensors", ".pt", ".pth", ".pkl", ".bin", ".ckpt")
FOLDERS = {
    "coz": "coz",  # CoZ LoRA + VAE-encoder files, converted Real-ESRGAN weights
    "LLM": "LLM",  # VLM folders (Qwen2.5-VL) and their PEFT adapters
    "diffusers": "diffusers",  # SD3 diffusers folders
    "checkpoints": "checkpoints",  # SD3 single-file checkpoints
    "text_encoders": "text_encoders",  # CLIP-L, CLIP-G, T5-XXL single files
    "vae": "vae",
    "upscale_models": "upscale_models",
}
OWN_FOLDERS = ("coz", "LLM")  # the pack's own, created when registered (ComfyUI makes the rest)


# --- cancellation --------------------------------------------------------------------------

class Cancelled(Exception):
    """Raised without ComfyUI when :func:`request_cancel` was called (ComfyUI raises its own)."""


_cancel = threading.Event()


def request_cancel() -> None:
    """Ask the running chain to stop at the next step (the fallback for ComfyUI's Cancel)."""
    _cancel.set()


def interrupts() -> tuple[type[BaseException], ...]:
    """The exceptions a user's cancel raises here (ComfyUI's InterruptProcessingException too)."""
    return (Cancelled, _mm.InterruptProcessingException) if IN_COMFY else (Cancelled,)


def throw_if_cancelled() -> None:
    """Raise if the user cancelled: ComfyUI's InterruptProcessingException, else :class:`Cancelled`."""
    if IN_COMFY:
        _mm.throw_exception_if_processing_interrupted()
    elif _cancel.is_set():
        _cancel.clear()
        raise Cancelled("cancelled by request")


# --- progress ------------------------------------------------------------------------------

PREVIEW_SIZE = 512


def preview_image(image: torch.Tensor):
    """A ComfyUI progress preview ("JPEG", PIL image, max size) of the first image of a
    [B, H, W, C] batch."""
    from PIL import Image

    array = (image[0, ..., :3].detach().float().clamp(0, 1) * 255).round().byte().cpu().numpy()
    return ("JPEG", Image.fromarray(array), PREVIEW_SIZE)


class Progress:
    """One progress bar; ``update`` also stops the work when the user cancelled."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.value = 0
        self.previews = 0  # how many preview images were produced (visible to tests)
        self._bar = _cutils.ProgressBar(total) if IN_COMFY else None

    def update(self, value: int, preview: torch.Tensor | None = None) -> None:
        """Set the bar to ``value``; ``preview`` is an IMAGE [B, H, W, C] shown on the node."""
        self.value = value
        shown = None
        if preview is not None:
            shown = preview_image(preview)
            self.previews += 1
        if self._bar is not None:
            self._bar.update_absolute(value, self.total, shown)  # raises on interrupt in a server
        throw_if_cancelled()


# --- devices and dtypes --------------------------------------------------------------------

def torch_device() -> torch.device:
    """Where models run: ComfyUI's choice, else the first CUDA device, else the CPU."""
    if IN_COMFY:
        return _mm.get_torch_device()
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def offload_device() -> torch.device:
    """Where idle models wait (the CPU unless ComfyUI keeps everything on the GPU)."""
    return _mm.unet_offload_device() if IN_COMFY else torch.device("cpu")


def pick_dtype(precision: str = "auto", device: torch.device | None = None) -> torch.dtype:
    """The weight dtype for ``precision`` on ``device`` (default: the compute device), by the pack's
    one policy (coz_core.policy), the same inside ComfyUI and on the command line."""
    return policy.resolve_dtype(precision, device or torch_device())


# --- model management ----------------------------------------------------------------------

class _Holder(torch.nn.Module):
    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.held = module


class ManagedModule:
    """A torch module the host loads onto the compute device on demand and offloads when another
    model needs the memory (ComfyUI: a ModelPatcher loaded with ``load_models_gpu``).
    ``on_offload``: called when ComfyUI unloads it, to free device memory it does not count (the
    VLM's static caches and CUDA graphs: QwenVL.release)."""

    def __init__(self, module: torch.nn.Module, name: str = "", on_offload: Callable[[], None] | None = None) -> None:
        self.module = module
        self.name = name or type(module).__name__
        self.patcher = None
        if IN_COMFY:
            # a holder: ModelPatcher sets `.device` on its model, a read-only property of diffusers models
            self.patcher = _patcher.ModelPatcher(_Holder(module), load_device=torch_device(),
                                                 offload_device=offload_device())
            if on_offload is not None:
                self.patcher.add_callback(_extension.CallbacksMP.ON_DETACH, lambda patcher, unpatch_all: on_offload())

    def __repr__(self) -> str:
        return f"ManagedModule({self.name})"


def load_all(models: Iterable[ManagedModule]) -> None:
    """Load several modules at once so the host fits them together (e.g. VAE + transformer)."""
    models = list(models)
    if IN_COMFY:
        # full loads: the pack's modules are plain torch layers, not ComfyUI's casting ops
        _mm.load_models_gpu([m.patcher for m in models], force_full_load=True)
        return
    device = torch_device()
    for m in models:
        m.module.to(device)


class Hosted:
    """An SR backbone or prompt source whose torch modules the host loads before every call, so it
    takes turns on the GPU with the other models; every other attribute is the wrapped object's.
    A wrapped object with ``to(device, dtype)`` is told where its weights went; ``on_offload``
    as :class:`ManagedModule` takes it."""

    def __init__(self, inner, modules: dict[str, torch.nn.Module],
                 on_offload: Callable[[], None] | None = None) -> None:
        self.inner = inner
        self.managed = [ManagedModule(m, name, on_offload) for name, m in modules.items()]

    def __getattr__(self, name: str):
        if name == "inner":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __call__(self, request):
        load_all(self.managed)
        if hasattr(self.inner, "to"):
            self.inner.to(torch_device(), getattr(self.inner, "dtype", None))
        return self.inner(request)

    def __repr__(self) -> str:
        return f"Hosted({self.inner!r})"


def host_tokenizers() -> dict[str, Path]:
    """Tokenizer folders the host ships, for SD3 single files that carry none (ComfyUI: its CLIP
    and T5 tokenizers; SD3's CLIP-G uses the CLIP vocabulary); {} without ComfyUI."""
    if not IN_COMFY:
        return {}
    root = Path(_cutils.__file__).parent
    return {"clip_l": root / "sd1_tokenizer", "clip_g": root / "sd1_tokenizer",
            "t5": root / "text_encoders" / "t5_tokenizer"}


# --- model folders -------------------------------------------------------------------------

def models_root() -> Path:
    """The models directory: ComfyUI's, else ``$COZ_MODELS_DIR`` (default ``./models``)."""
    if IN_COMFY:
        return Path(_folders.models_dir)
    return Path(os.environ.get("COZ_MODELS_DIR", "models"))


def register_folders() -> None:
    """Make ComfyUI list the pack's model folders (models/coz, models/LLM) and create those two,
    so users see where CoZ's files go; idempotent."""
    if not IN_COMFY:
        return
    for name, sub in FOLDERS.items():
        if name not in _folders.folder_names_and_paths:
            _folders.add_model_folder_path(name, str(Path(_folders.models_dir) / sub), is_default=True)
    for name in OWN_FOLDERS:
        try:
            (Path(_folders.models_dir) / FOLDERS[name]).mkdir(parents=True, exist_ok=True)
        except OSError:  # a read-only install: the folders are listed all the same
            pass


SAMPLE_IMAGE_NAME = "coz_sample.png"  # what the shipped workflows' Load Image nodes open


def install_sample_image(sample: Path) -> Path | None:
    """Copy the bundled sample into ComfyUI's input folder once, so the example workflows run as
    loaded. Never overwrites; returns the path, or None outside ComfyUI or when it cannot write."""
    if not IN_COMFY:
        return None
    target = Path(_folders.get_input_directory()) / SAMPLE_IMAGE_NAME
    if not target.exists():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(sample.read_bytes())
        except OSError:
            return None
    return target


def folder_paths(name: str) -> list[Path]:
    """Every directory of the model folder ``name`` (a key of :data:`FOLDERS`)."""
    if IN_COMFY:
        return [Path(p) for p in _folders.get_folder_paths(name)]
    return [models_root() / FOLDERS.get(name, name)]


def list_files(name: str, extensions: Iterable[str] = WEIGHT_EXTENSIONS) -> list[str]:
    """Weight files of the model folder ``name``, relative to it (sub-folders included)."""
    extensions = tuple(e.lower() for e in extensions)
    found: set[str] = set()
    for root in folder_paths(name):
        if root.is_dir():
            for p in root.rglob("*"):
                if p.is_file() and p.name.lower().endswith(extensions):
                    found.add(p.relative_to(root).as_posix())
    return sorted(found)


def list_model_dirs(name: str, marker: str = "config.json") -> list[str]:
    """Model folders (holding ``marker``) inside the model folder ``name``, relative to it."""
    found: set[str] = set()
    for root in folder_paths(name):
        if root.is_dir():
            for p in root.rglob(marker):
                if p.parent != root:
                    found.add(p.parent.relative_to(root).as_posix())
    return sorted(found)


def resolve(name: str, relative: str) -> Path:
    """The full path of ``relative`` (a file or folder listed by this module) in folder ``name``."""
    for root in folder_paths(name):
        path = root / relative
        if path.exists():
            return path
    places = ", ".join(str(p) for p in folder_paths(name))
    raise FileNotFoundError(f"{relative!r} was not found in the {name!r} model folder ({places}); "
                            f"put it there and refresh the node list")
