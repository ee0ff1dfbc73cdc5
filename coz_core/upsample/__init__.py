"""Guided bilateral upsampling (Upsample Anything, arXiv 2511.16301): lift any LR signal to the
resolution of an HR guide along the guide's edges."""
from .model import KINDS, BilateralKernels, fit_kernels, fixed_kernels, guided_upsample

__all__ = ["KINDS", "BilateralKernels", "fit_kernels", "fixed_kernels", "guided_upsample"]
