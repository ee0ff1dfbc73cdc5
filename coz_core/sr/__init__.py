"""SR backbones behind the SRBackbone protocol (see base.py).

The heavy backends (Real-ESRGAN, CoZ SD3) live in their own modules and are imported from there,
so that ``import coz_core`` stays light (no diffusers import).
"""
from .base import SRBackbone, SRRequest

__all__ = ["SRBackbone", "SRRequest"]
