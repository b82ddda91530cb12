"""minigpt2: GPT-2 from scratch in PyTorch.

The package's rooms, top to bottom (each imports only from those below it): cli -> train ->
evaluate -> decode, formats -> data, model -> device, errors.
"""

from .decode.generate import Generator, SamplingConfig
from .errors import MiniGPT2Error
from .formats.loading import load_any
from .formats.released import load_pretrained, save_pretrained
from .model.config import PRESETS, GPTConfig
from .model.gpt import GPT

__all__ = [
    "GPT",
    "GPTConfig",
    "PRESETS",
    "Generator",
    "MiniGPT2Error",
    "SamplingConfig",
    "load_any",
    "load_pretrained",
    "save_pretrained",
]
__version__ = "0.1.0"
