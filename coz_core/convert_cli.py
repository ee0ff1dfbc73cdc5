"""``coz-convert``: rewrite CoZ's pickled weight files as .safetensors, so the pickles can go.

The pickles are read with ``torch.load(weights_only=True)`` (plain tensors only); the values
are written unchanged. The loaders accept either form.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checkpoints import CheckpointError
from .sr.coz_weights import convert_coz_weights


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="coz-convert", description=__doc__.splitlines()[0])
    p.add_argument("--lora", type=Path, help="CoZ's SR_LoRA/model_20001.pkl")
    p.add_argument("--vae", type=Path, help="CoZ's SR_VAE/vae_encoder_20001.pt")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder for the .safetensors files")
    args = p.parse_args(argv)
    if args.lora is None and args.vae is None:
        p.error("give --lora and/or --vae")
    try:
        written = convert_coz_weights(args.lora, args.vae, args.output)
    except (CheckpointError, OSError) as exc:
        print(f"coz-convert: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
