"""The VLM and the SR model taking turns on one accelerator, outside ComfyUI.

Inside ComfyUI its model management loads and offloads the models (nodes/host.py). Outside it,
with a preset that asks for it (policy.SD3Setup.take_turns, the ``lowvram`` preset), the chain's
prompt source and backbone are wrapped so that before the prompt source runs the SR model's modules
go to the host and the VLM to the device, and before the SR step the reverse: the peak is the larger
of the two models, not their sum. The price is moving both every step (host <-> device copies).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .prompt.base import PromptRequest, PromptSource
from .sr.base import SRBackbone, SRRequest

HOST = torch.device("cpu")


class Turns:
    """Named groups of modules of which one at a time sits on ``device``; the others on the host.
    ``on_leave``: per group, what drops its other device memory as it leaves (QwenVL.release)."""

    def __init__(self, device: torch.device | str, groups: dict[str, list[torch.nn.Module]],
                 on_leave: dict[str, Callable[[], None]] | None = None) -> None:
        self.device = torch.device(device)
        self.groups = groups
        self.on_leave = on_leave or {}
        self.active: str | None = None

    def activate(self, name: str) -> None:
        if name == self.active:
            return
        for other, modules in self.groups.items():
            if other != name:
                if other in self.on_leave:
                    self.on_leave[other]()
                for module in modules:
                    module.to(HOST)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the freed blocks back before the other group arrives
        for module in self.groups[name]:
            module.to(self.device)
        self.active = name


class _TurnSource:
    def __init__(self, source: PromptSource, turns: Turns) -> None:
        self.source, self.turns = source, turns

    def __call__(self, request: PromptRequest) -> list[str]:
        self.turns.activate("prompt")
        return self.source(request)

    def __getattr__(self, name: str) -> Any:  # records, settings of the wrapped source
        return getattr(self.source, name)


class _TurnBackbone:
    def __init__(self, backbone: SRBackbone, turns: Turns) -> None:
        self.backbone, self.turns = backbone, turns
        self.name, self.size_multiple, self.uses_prompt = backbone.name, backbone.size_multiple, backbone.uses_prompt

    @property
    def device(self) -> torch.device:  # where the chain keeps its images: the turn's device
        return self.turns.device

    def __call__(self, request: SRRequest) -> torch.Tensor:
        self.turns.activate("sr")
        return self.backbone(request)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backbone, name)


def take_turns(
    backbone: SRBackbone,
    source: PromptSource,
    device: torch.device | str,
    backbone_modules: list[torch.nn.Module] | None = None,
    source_modules: list[torch.nn.Module] | None = None,
) -> tuple[SRBackbone, PromptSource]:
    """(backbone, prompt source) that take turns on ``device``; pass them to ``run_chain``.

    Modules default to ``backbone.modules()`` (CoZSD3Backbone) and the prompt source's VLM model
    (``source.vlm.model``, QwenPromptSource); a VLM with ``release`` drops its static caches and
    CUDA graphs each time it leaves the device."""
    if backbone_modules is None:
        if not callable(getattr(backbone, "modules", None)):
            raise TypeError(f"give the modules of the {backbone.name} backbone to move (backbone_modules)")
        backbone_modules = backbone.modules()
    vlm = getattr(source, "vlm", None)
    if source_modules is None:
        if vlm is None:
            raise TypeError(f"give the modules of the prompt source {type(source).__name__} to move (source_modules)")
        source_modules = [vlm.model]
    release = getattr(vlm, "release", None)  # its static caches and CUDA graphs leave with it
    turns = Turns(device, {"sr": list(backbone_modules), "prompt": list(source_modules)},
                  on_leave={"prompt": release} if release else None)
    return _TurnBackbone(backbone, turns), _TurnSource(source, turns)
