"""coz_core: Chain-of-Zoom extreme super-resolution as a plain Python library (no ComfyUI needed)."""
from .color import COLOR_METHODS, align_color
from .prompt.base import FixedPrompts, PromptRequest, PromptSource, compose_prompt
from .sr.base import SRBackbone, SRRequest
from .zoom import MODES, Box, ChainConfig, ChainResult, ZoomStep, run_chain

__version__ = "0.1.0"
__all__ = [
    "COLOR_METHODS", "align_color", "FixedPrompts", "PromptRequest", "PromptSource",
    "compose_prompt", "SRBackbone", "SRRequest", "MODES", "Box", "ChainConfig", "ChainResult",
    "ZoomStep", "run_chain",
]
