"""CUDA-graph capture, shared by the VLM's decoding step and prefill and the upsampler's fit.

PyTorch's recipe (``torch.cuda.graphs``): run the work on a side stream first (the warm-up: lazy
allocations, cuBLAS workspaces, compilation), then capture it once and replay it. A capture
records kernels without running them, so one that fails (an operation a capturing stream may
not do, a driver that refuses) leaves the state as it was: it raises :class:`CaptureError`, and
the callers run the work eagerly, with :func:`warn_uncaptured`. Running out of memory is not a
failed capture: it propagates (callers halve their batch or report it).
"""
from __future__ import annotations

import warnings
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def warm_up(work: Callable[[], T], times: int = 1) -> T:
    """``work()`` run ``times`` times (at least once) on a side stream; its last result."""
    side, main = torch.cuda.Stream(), torch.cuda.current_stream()
    side.wait_stream(main)
    with torch.cuda.stream(side):
        for _ in range(max(1, times)):
            out = work()
    main.wait_stream(side)
    return out


class CaptureError(RuntimeError):
    """``work`` could not be captured (nothing of it ran): run it eagerly instead."""


def capture(work: Callable[[], T]) -> tuple[torch.cuda.CUDAGraph, T]:
    """``work()`` captured as a CUDA graph, then replayed once (the capture itself runs nothing):
    the graph and the result tensors it writes on every replay."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = work()
    except RuntimeError as exc:  # ending a broken capture may raise its own error over the first
        first = exc if isinstance(exc, torch.OutOfMemoryError) else exc.__context__
        if isinstance(first, torch.OutOfMemoryError):
            raise first
        raise CaptureError(str(exc)) from exc
    graph.replay()
    return graph, out


def warn_uncaptured(what: str, error: Exception, then: str) -> None:
    warnings.warn(f"{what} could not be captured as a CUDA graph ({error}); {then}", stacklevel=3)
