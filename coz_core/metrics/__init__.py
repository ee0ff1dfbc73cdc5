"""No-reference image quality metrics that run offline, by name.

Each metric takes an 8-bit RGB image ([H, W, 3] uint8) and returns a float. ``LOWER_IS_BETTER``
says which way each one points. Their packages are optional (``pip install 'chain-of-zoom[eval]'``);
``check_available`` names what is missing before any long computation starts.
"""
from __future__ import annotations

import importlib.util
from typing import Callable

import numpy as np

EXTRA = "pip install 'chain-of-zoom[eval]'"

# metric -> (python modules it needs, pip packages that provide them)
REQUIREMENTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "niqe": (("scipy", "skvideo"), ("scipy", "scikit-video")),
    "piqe": (("pypiqe", "cv2"), ("pypiqe", "opencv-python")),
}
LOWER_IS_BETTER = {"niqe": True, "piqe": True}
METRICS = tuple(REQUIREMENTS)


def missing_packages(name: str) -> list[str]:
    """The pip packages metric ``name`` needs that are not installed."""
    modules, packages = REQUIREMENTS[name]
    return [pkg for mod, pkg in zip(modules, packages) if importlib.util.find_spec(mod) is None]


def check_available(names: list[str] | tuple[str, ...]) -> None:
    """Raise ImportError naming the packages and the extra to install if any metric cannot run."""
    unknown = [n for n in names if n not in REQUIREMENTS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    missing = {n: missing_packages(n) for n in names}
    missing = {n: m for n, m in missing.items() if m}
    if missing:
        what = "; ".join(f"{n} needs {', '.join(m)}" for n, m in missing.items())
        raise ImportError(f"{what}: install them with {EXTRA}")


def _niqe(image: np.ndarray) -> float:
    from .niqe import niqe

    return niqe(image)


def _piqe(image: np.ndarray) -> float:
    from pypiqe import piqe

    from .niqe import luminance

    # pypiqe converts colour with OpenCV's BGR weights; give it MATLAB's rgb2gray, as piqe.m does
    return float(piqe(luminance(image))[0])


SCORERS: dict[str, Callable[[np.ndarray], float]] = {"niqe": _niqe, "piqe": _piqe}


def score(name: str, image: np.ndarray) -> float:
    """Metric ``name`` of an 8-bit RGB image [H, W, 3]."""
    check_available([name])
    return SCORERS[name](image)
