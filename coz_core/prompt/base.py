"""The prompt source protocol, the model-free sources, and how prompts are composed."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import torch


@dataclass(frozen=True)
class PromptRequest:
    previous: torch.Tensor  # [B, 3, H, W] float 0..1: scale k-1 (the whole previous output)
    zoomed: torch.Tensor  # [B, 3, H, W] float 0..1: the zoomed input of step k
    step: int  # k, 1-based
    multiscale: bool = True  # True: look at both images (recursive_multiscale); False: zoomed only
    user_prompt: str = ""  # the user's text the chain appends (a source may leave room for it)

    @property
    def batch(self) -> int:
        return int(self.zoomed.shape[0])


@runtime_checkable
class PromptSource(Protocol):
    """Writes one prompt per batch element for a zoom step ("" means no generated text)."""

    def __call__(self, request: PromptRequest) -> list[str]: ...


class FixedPrompts:
    """No model: the same text every step, or one text per step (the last one repeats)."""

    def __init__(self, texts: str | Sequence[str] = "") -> None:
        self.texts = [texts] if isinstance(texts, str) else list(texts) or [""]

    def __call__(self, request: PromptRequest) -> list[str]:
        text = self.texts[min(request.step - 1, len(self.texts) - 1)]
        return [text] * request.batch

    @property
    def info(self) -> dict:
        """Which prompts run (see :func:`describe_prompts`): ``fixed`` texts, or ``none``."""
        return {"type": "fixed", "texts": list(self.texts)} if any(t.strip() for t in self.texts) else {"type": "none"}


def prompt_info(source: object) -> dict | None:
    """A prompt source's ``info`` (prompt type, model, adapter, token limit), None if it has none."""
    info = getattr(source, "info", None)
    return dict(info) if isinstance(info, dict) else None


def describe_prompts(info: dict | None) -> str:
    """One line saying which prompts ran, for node outputs: the prompt type (upstream's names:
    ``vlm`` = Qwen2.5-VL + the GRPO adapter, ``vlm_base``, ``fixed``, ``none``), model, adapter
    and token limit."""
    if not info:
        return "prompts: from a source that does not say what it is"
    kind = info.get("type")
    if kind in ("vlm", "vlm_base"):
        text = f"prompts: {kind} ({Path(str(info.get('model'))).name}"
        adapter = info.get("adapter")
        if adapter:
            text += (f" + adapter {Path(adapter['path']).name}: {adapter['modules']} linears merged, "
                     f"scale {adapter['scale']:g}")
        else:
            text += ", no adapter"
        return text + f"), up to {info.get('max_new_tokens')} new tokens"
    if kind == "fixed":
        texts = info.get("texts") or []
        return (f"prompts: fixed ({len(texts)} per-step texts, the last repeats)" if len(texts) > 1
                else "prompts: fixed text")
    if kind == "none":
        return "prompts: none (the user prompt alone)"
    return f"prompts: {kind}"


def compose_prompt(generated: str, user: str = "") -> str:
    """The reference's rule: ``"{generated}, {user},"`` when both exist, else whichever exists."""
    generated, user = generated.strip(), user.strip()
    if generated and user:
        return f"{generated}, {user},"
    return generated or user
