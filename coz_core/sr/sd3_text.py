"""SD3 prompt encoding (CLIP-L + CLIP-G + optional T5-XXL), with a cache for repeated prompts.

Layout (the reference's ``encode_prompt``): CLIP-L and CLIP-G see the prompt padded/truncated
to 77 tokens; their penultimate hidden states are concatenated (768 + 1280) and zero-padded to
the joint width (4096); T5 sees it padded/truncated to 512 tokens. Sequence = [clip ; t5]
(77 + 512 tokens), pooled = [CLIP-L projected ; CLIP-G projected] (2048). Without T5, 512 zero
tokens take its place (SD3's zero-embedding path), so the sequence keeps the reference's shape.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

CLIP_TOKENS = 77
T5_TOKENS = 512


@dataclass
class SD3Conditioning:
    """Precomputed SD3 text conditioning: one row per batch element (or one row for all)."""

    prompt_embeds: torch.Tensor  # [B, L, joint_dim] (L = 589 for the reference's encoding)
    pooled: torch.Tensor  # [B, 2048]

    def __post_init__(self) -> None:
        if self.prompt_embeds.ndim != 3 or self.pooled.ndim != 2 or self.prompt_embeds.shape[0] != self.pooled.shape[0]:
            raise ValueError(
                "SD3 conditioning needs prompt_embeds [B, L, D] and pooled [B, P] with the same B; got "
                f"{tuple(self.prompt_embeds.shape)} and {tuple(self.pooled.shape)}"
            )

    def expand(self, batch: int) -> "SD3Conditioning":
        """Repeat a single row to ``batch`` rows (or check the batch matches)."""
        n = self.prompt_embeds.shape[0]
        if n == batch:
            return self
        if n != 1:
            raise ValueError(f"conditioning has {n} rows for a batch of {batch} images")
        return SD3Conditioning(self.prompt_embeds.expand(batch, -1, -1), self.pooled.expand(batch, -1))

    @classmethod
    def from_comfy(cls, conditioning: Sequence[Any]) -> "SD3Conditioning":
        """From ComfyUI's CONDITIONING (``[[embeds [1, L, D], {"pooled_output": [1, P]}], ...]``), first entry."""
        try:
            embeds, extra = conditioning[0][0], conditioning[0][1]
            pooled = extra["pooled_output"]
        except (IndexError, KeyError, TypeError) as e:
            raise ValueError("expected ComfyUI SD3 conditioning: [[embeddings, {'pooled_output': ...}]]") from e
        return cls(embeds, pooled)


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class SD3TextEncoder:
    """Turns prompts into :class:`SD3Conditioning`; encoders run where the caller placed them."""

    def __init__(
        self,
        clip_l: torch.nn.Module,
        clip_g: torch.nn.Module,
        t5: torch.nn.Module | None,
        tokenizer_paths: dict[str, str | Path],
        joint_dim: int = 4096,
        cache_size: int = 16,
    ) -> None:
        self.models = {"clip_l": clip_l, "clip_g": clip_g, "t5": t5}
        self.tokenizer_paths = {k: Path(v) for k, v in tokenizer_paths.items()}
        self.joint_dim = joint_dim
        self.cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self.cache_size = cache_size
        self._tokenizers: dict[str, Any] = {}

    def tokenizer(self, name: str):
        if name not in self._tokenizers:
            path = self.tokenizer_paths.get(name)
            if path is None or not path.is_dir():
                raise FileNotFoundError(
                    f"no tokenizer folder for {name} ({path}); SD3 single-file checkpoints do not contain "
                    "tokenizers: point to a diffusers SD3 folder's tokenizer/, tokenizer_2/, tokenizer_3/ "
                    "(or ComfyUI's comfy/sd1_tokenizer for CLIP and comfy/text_encoders/t5_tokenizer for T5)"
                )
            from transformers import AutoTokenizer, CLIPTokenizer

            if name == "t5":
                tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            else:
                tok = CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
                if name == "clip_g":
                    tok.pad_token = "!"  # SD3's CLIP-G pads with "!" (id 0), CLIP-L with <|endoftext|>
            self._tokenizers[name] = tok
        return self._tokenizers[name]

    @torch.no_grad()
    def _clip(self, name: str, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.models[name]
        ids = self.tokenizer(name)([prompt], padding="max_length", max_length=CLIP_TOKENS,
                                   truncation=True, return_tensors="pt").input_ids
        out = model(ids.to(_device(model)), output_hidden_states=True)
        return out.hidden_states[-2].float(), out.text_embeds.float()

    @torch.no_grad()
    def _t5(self, prompt: str, device: torch.device) -> torch.Tensor:
        model = self.models["t5"]
        if model is None:
            return torch.zeros(1, T5_TOKENS, self.joint_dim, device=device)
        ids = self.tokenizer("t5")([prompt], padding="max_length", max_length=T5_TOKENS, truncation=True,
                                   add_special_tokens=True, return_tensors="pt").input_ids
        return model(ids.to(_device(model)))[0].float().to(device)

    def encode_one(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """([1, 589, D], [1, 2048]) float32 for one prompt, from the cache when seen recently."""
        if prompt in self.cache:
            self.cache.move_to_end(prompt)
            return self.cache[prompt]
        hl, pl = self._clip("clip_l", prompt)
        hg, pg = self._clip("clip_g", prompt)
        device = hl.device
        clip = torch.cat([hl, hg.to(device)], dim=-1)
        clip = torch.nn.functional.pad(clip, (0, self.joint_dim - clip.shape[-1]))
        seq = torch.cat([clip, self._t5(prompt, device)], dim=-2)
        result = (seq, torch.cat([pl, pg.to(device)], dim=-1))
        self.cache[prompt] = result
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return result

    def __call__(self, prompts: Sequence[str]) -> SD3Conditioning:
        encoded = [self.encode_one(p) for p in prompts]
        return SD3Conditioning(torch.cat([e[0] for e in encoded]), torch.cat([e[1] for e in encoded]))
