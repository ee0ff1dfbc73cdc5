"""Safe loading of weight files: safetensors, or torch pickles read with ``weights_only=True``.

Nothing here ever runs plain unpickling: a pickle that holds anything other than tensors and
plain containers is refused with a message that names the file. Header-only inspection of
safetensors files lets callers detect what a multi-gigabyte checkpoint holds without reading it.
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


class CheckpointError(ValueError):
    """A weight file is missing, damaged, unsafe or not what was expected."""


def _exists(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; check the path or the model folder")
    return path


def is_safetensors(path: str | Path) -> bool:
    return Path(path).suffix.lower() in SAFETENSORS_SUFFIXES


def safetensors_keys(path: str | Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Key -> (shape, dtype name) of a safetensors file, read from its header only."""
    path = _exists(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for key in f.keys():
                sl = f.get_slice(key)
                out[key] = (tuple(sl.get_shape()), str(sl.get_dtype()))
            return out
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable safetensors file ({e}); it may be truncated or damaged: "
            "download it again"
        ) from e


def read_safetensors(
    path: str | Path, select: Callable[[str], bool] | None = None, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, only the keys ``select`` accepts (all when None)."""
    path = _exists(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys() if select is None or select(k)}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"{path}: could not read the safetensors file ({e}); it may be truncated or damaged: "
            "download it again"
        ) from e


def load_pickle_safely(path: str | Path) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, never arbitrary code."""
    path = _exists(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: the pickle holds Python objects other than tensors and plain "
            f"containers ({str(e).splitlines()[0]}). Only tensor files are accepted; obtain the "
            "original weights or a .safetensors version"
        ) from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path}: not a readable PyTorch weight file ({e}); it may be truncated or damaged: "
            "download it again"
        ) from e


def load_weights(path: str | Path) -> Any:
    """A safetensors file (as a dict) or a torch pickle (whatever plain structure it holds)."""
    return read_safetensors(path) if is_safetensors(path) else load_pickle_safely(path)


def expect_tensor_dict(obj: Any, path: str | Path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: expected a state dict (names -> tensors), found {type(obj).__name__}")
    return obj


def expect_tensor_list(obj: Any, path: str | Path) -> list[torch.Tensor]:
    if not isinstance(obj, (list, tuple)) or not all(isinstance(t, torch.Tensor) for t in obj):
        raise CheckpointError(f"{path}: expected a list of tensors, found {type(obj).__name__}")
    return list(obj)


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write ``tensors`` (made contiguous, on CPU) to ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def describe_mismatch(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], limit: int = 8) -> str:
    """A short human summary of missing / unexpected / wrongly shaped keys."""
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected]
    shaped = [f"{k}: {tuple(found[k])} instead of {tuple(expected[k])}"
              for k in expected if k in found and tuple(found[k]) != tuple(expected[k])]
    parts = []
    for label, items in (("missing", missing), ("unexpected", extra), ("wrong shape", shaped)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return "; ".join(parts)

