"""Guided bilateral upsampling (Upsample Anything, arXiv 2511.16301): lift any LR signal to the
resolution of an HR guide along the guide's edges."""
from .color_fix import bilateral_color_fix
from .model import KINDS, BilateralKernels, fit_kernels, fixed_kernels, guided_upsample

__all__ = [
    "KINDS", "bilateral_color_fix", "BilateralKernels", "fit_kernels", "fixed_kernels", "guided_upsample",
]
