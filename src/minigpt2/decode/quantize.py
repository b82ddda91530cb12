"""Weight-only int8 for decoding: each linear layer (and the head) keeps int8 weights with one
float scale per output channel. In memory only: checkpoints are never quantized.

Symmetric per-channel rounding: scale_j = max_k |W_jk| / 127 and q_jk = round(W_jk / scale_j),
so each weight is off by at most half a step, scale_j / 2. A product reads a quarter of
float32's bytes per weight: up to 8 rows (decoding) in the native decoder where it runs
(decode/native; float32 activations), more rows (prompts, scoring) through
`torch.ops.aten._weight_int8pack_mm` (bfloat16 activations and scales).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import MiniGPT2Error
from .native import NativeLinear, native_available, native_linear

SCHEMES = ("int8",)


class Int8Linear(nn.Module):
    """A frozen linear layer with int8 weights (out, in), bfloat16 scales (out,) and bias."""

    NATIVE_ROWS = NativeLinear.ROWS  # up to this many rows run in the native decoder

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        w = weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
        # buffers: .to(device) moves them, .to(dtype) leaves the int8 weight alone
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", q, persistent=False)
        self.register_buffer("scales", scale.to(torch.bfloat16), persistent=False)
        b = None if bias is None else bias.detach().to(torch.bfloat16)
        self.register_buffer("bias", b, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[:-1].numel() <= self.NATIVE_ROWS and x.is_cpu and native_available():
            return native_linear(self, x)
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if self.weight.shape[1] % 8:  # the int8 kernel crashes past 8 rows on such widths
            out = nn.functional.linear(rows, self.dequantized().to(rows.dtype))
        else:
            out = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def dequantized(self) -> torch.Tensor:
        """The weight this layer multiplies by, in float32 (for checks)."""
        return self.weight.float() * self.scales.float()[:, None]


def int8_kernel_available(device: torch.device) -> bool:
    """Whether this PyTorch has the int8-weight product on device (CPU, and MPS, have it)."""
    try:
        x = torch.zeros(1, 32, dtype=torch.bfloat16, device=device)
        w = torch.zeros(8, 32, dtype=torch.int8, device=device)
        s = torch.ones(8, dtype=torch.bfloat16, device=device)
        torch.ops.aten._weight_int8pack_mm(x, w, s)
        return True
    except (RuntimeError, NotImplementedError):
        return False


def check_scheme(scheme: str) -> None:
    """Refuse a quantization scheme this module does not have."""
    if scheme not in SCHEMES:
        raise MiniGPT2Error(f"unknown quantization {scheme!r}; schemes: {', '.join(SCHEMES)}")


def quantize_for_decoding(model: nn.Module, scheme: str = "int8") -> nn.Module:
    """Quantize model's linear layers and head for decoding (in place); the rest (embeddings,
    LayerNorms, the KV cache) becomes bfloat16. The head gets its own int8 copy of the tied
    embedding, which stays bfloat16 for the token lookup."""
    check_scheme(scheme)
    device = next(model.parameters()).device
    if not int8_kernel_available(device):
        raise MiniGPT2Error(
            f"this PyTorch has no int8 weight kernel on {device.type} "
            "(torch.ops.aten._weight_int8pack_mm); use --dtype bfloat16 there instead"
        )
    model.eval()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child.weight, child.bias))
    return model.to(torch.bfloat16)
