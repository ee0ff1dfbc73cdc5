"""The prompt source protocol, the model-free sources, and how prompts are composed."""
from __future__ import annotations

from dataclasses import dataclass
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


def compose_prompt(generated: str, user: str = "") -> str:
    """The reference's rule: ``"{generated}, {user},"`` when both exist, else whichever exists."""
    generated, user = generated.strip(), user.strip()
    if generated and user:
        return f"{generated}, {user},"
    return generated or user
