"""minigpt2: GPT-2 from scratch in PyTorch."""

from .errors import MiniGPT2Error
from .model import GPT, PRESETS, GPTConfig

__all__ = ["GPT", "GPTConfig", "PRESETS", "MiniGPT2Error"]
__version__ = "0.1.0"
