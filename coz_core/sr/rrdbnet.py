"""Real-ESRGAN's two generator architectures in plain PyTorch.

Parameter names follow the Real-ESRGAN release (``conv_first``, ``body.{b}.rdb{r}.conv{c}``,
``conv_body``, ``conv_up1``, ``conv_up2``, ``conv_hr``, ``conv_last``; ``body.{i}`` for the
compact model), so the state dicts made here load in ComfyUI's Load Upscale Model (spandrel) and
users' own Real-ESRGAN files load here.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

_LRELU = 0.2  # LeakyReLU slope used throughout RRDBNet
_RESIDUAL = 0.2  # residual scaling of the dense blocks and of each RRDB


def _conv(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, 1, 1)


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs; each sees the input and all earlier outputs."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        for c in range(1, 5):
            setattr(self, f"conv{c}", _conv(num_feat + (c - 1) * num_grow_ch, num_grow_ch))
        self.conv5 = _conv(num_feat + 4 * num_grow_ch, num_feat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for c in range(1, 5):
            conv = getattr(self, f"conv{c}")
            features.append(F.leaky_relu(conv(torch.cat(features, 1)), _LRELU))
        return self.conv5(torch.cat(features, 1)) * _RESIDUAL + x


class RRDB(nn.Module):
    """Residual-in-residual dense block: three dense blocks and a scaled skip."""

    def __init__(self, num_feat: int = 64, num_grow_ch: int = 32):
        super().__init__()
        self.rdb1 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb2 = ResidualDenseBlock(num_feat, num_grow_ch)
        self.rdb3 = ResidualDenseBlock(num_feat, num_grow_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rdb3(self.rdb2(self.rdb1(x))) * _RESIDUAL + x


class RRDBNet(nn.Module):
    """ESRGAN / Real-ESRGAN generator (x4plus: 23 blocks; x4plus_anime: 6 blocks).

    The trunk always upsamples 4x (nearest x2, twice); for scale 2 and 1 the input is first
    pixel-unshuffled by 2 or 4, as in Real-ESRGAN.
    """

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, scale: int = 4, num_feat: int = 64,
                 num_block: int = 23, num_grow_ch: int = 32):
        super().__init__()
        if scale not in (1, 2, 4):
            raise ValueError(f"RRDBNet supports scale 1, 2 or 4, got {scale}")
        self.scale = scale
        self.unshuffle = 4 // scale
        self.conv_first = _conv(num_in_ch * self.unshuffle**2, num_feat)
        self.body = nn.Sequential(*(RRDB(num_feat, num_grow_ch) for _ in range(num_block)))
        self.conv_body = _conv(num_feat, num_feat)
        self.conv_up1 = _conv(num_feat, num_feat)
        self.conv_up2 = _conv(num_feat, num_feat)
        self.conv_hr = _conv(num_feat, num_feat)
        self.conv_last = _conv(num_feat, num_out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        feat = F.leaky_relu(self.conv_up1(F.interpolate(feat, scale_factor=2.0, mode="nearest")), _LRELU)
        feat = F.leaky_relu(self.conv_up2(F.interpolate(feat, scale_factor=2.0, mode="nearest")), _LRELU)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), _LRELU))


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact VGG-style model (realesr-animevideov3, realesr-general-x4v3).

    ``body`` alternates convs and PReLUs; the last conv makes ``3 * scale**2`` channels that are
    pixel-shuffled and added to the nearest-upsampled input.
    """

    def __init__(self, num_in_ch: int = 3, num_out_ch: int = 3, num_feat: int = 64, num_conv: int = 16,
                 upscale: int = 4):
        super().__init__()
        self.scale = upscale
        layers: list[nn.Module] = [_conv(num_in_ch, num_feat), nn.PReLU(num_feat)]
        for _ in range(num_conv):
            layers += [_conv(num_feat, num_feat), nn.PReLU(num_feat)]
        layers.append(_conv(num_feat, num_out_ch * upscale**2))
        self.body = nn.ModuleList(layers)
        self.upsampler = nn.PixelShuffle(upscale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        return self.upsampler(out) + F.interpolate(x, scale_factor=float(self.scale), mode="nearest")


class UnsupportedArchitecture(ValueError):
    """A state dict that is neither a Real-ESRGAN RRDBNet nor an SRVGGNetCompact."""


def unwrap_state_dict(state: dict) -> dict[str, torch.Tensor]:
    """The tensors of a Real-ESRGAN checkpoint: a plain state dict or ``{"params_ema"|"params": ...}``."""
    for key in ("params_ema", "params", "state_dict"):
        if isinstance(state.get(key), dict):
            state = state[key]
            break
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return state


def architecture_of(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, int]]:
    """(class name, constructor kwargs) for a Real-ESRGAN state dict, read from its keys and shapes."""
    if "conv_first.weight" in state and "conv_last.weight" in state and "body.0.rdb1.conv1.weight" in state:
        blocks = {int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.rdb1\.conv1\.weight$", k))}
        first = state["conv_first.weight"]
        num_feat, in_ch = int(first.shape[0]), int(first.shape[1])
        out_ch = int(state["conv_last.weight"].shape[0])
        unshuffle_sq = in_ch // out_ch  # 1, 4 or 16 input channel groups
        scale = {1: 4, 4: 2, 16: 1}.get(unshuffle_sq)
        if scale is None or in_ch % out_ch:
            raise UnsupportedArchitecture(f"RRDBNet conv_first has {in_ch} input channels for {out_ch} outputs")
        return "RRDBNet", {
            "num_in_ch": out_ch, "num_out_ch": out_ch, "scale": scale, "num_feat": num_feat,
            "num_block": max(blocks) + 1, "num_grow_ch": int(state["body.0.rdb1.conv1.weight"].shape[0]),
        }
    convs = sorted(int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.weight$", k))
                   and state[k].ndim == 4)
    if convs and convs == list(range(0, convs[-1] + 1, 2)) and "body.1.weight" in state:
        first, last = state["body.0.weight"], state[f"body.{convs[-1]}.weight"]
        in_ch, num_feat = int(first.shape[1]), int(first.shape[0])
        upscale = math.isqrt(int(last.shape[0]) // in_ch)
        if upscale**2 * in_ch != last.shape[0]:
            raise UnsupportedArchitecture(f"compact model's last conv has {last.shape[0]} outputs")
        return "SRVGGNetCompact", {
            "num_in_ch": in_ch, "num_out_ch": in_ch, "num_feat": num_feat,
            "num_conv": len(convs) - 2, "upscale": upscale,
        }
    raise UnsupportedArchitecture(
        "not a Real-ESRGAN RRDBNet or SRVGGNetCompact (PReLU) state dict; keys start with "
        f"{sorted(state)[:4]}"
    )


ARCHITECTURES: dict[str, type[nn.Module]] = {"RRDBNet": RRDBNet, "SRVGGNetCompact": SRVGGNetCompact}


def build_from_state_dict(state: dict[str, torch.Tensor]) -> nn.Module:
    """Build the matching module for a Real-ESRGAN state dict and load it (strict), in eval mode."""
    arch, kwargs = architecture_of(state)
    with torch.device("meta"):
        module = ARCHITECTURES[arch](**kwargs)
    module = module.to_empty(device="cpu").float()
    module.load_state_dict(state, strict=True)
    return module.eval().requires_grad_(False)
