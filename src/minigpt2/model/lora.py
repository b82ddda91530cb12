"""Low-rank adapters (LoRA, Hu et al. 2021): train B @ A beside frozen weights, save only them.

A targeted linear layer computes W x + b + (alpha / r) * B A dropout(x), with A (r, in) drawn as
nn.Linear draws its weights and B (out, r) zero, so training starts from the base model exactly
(PEFT's defaults for GPT-2: c_attn, r=8, alpha=16, dropout 0.05). Adapters live on the layer
as `lora_A` / `lora_B`, so the base keeps its parameter names.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import MiniGPT2Error

# the targets a user may name (PEFT's GPT-2 module names) -> the layers' own names they match
TARGETS = {
    "c_attn": ("attn.c_attn",),
    "c_proj": ("attn.c_proj", "mlp.c_proj"),
    "c_fc": ("mlp.c_fc",),
    "attn.c_proj": ("attn.c_proj",),
    "mlp.c_proj": ("mlp.c_proj",),
    "lm_head": ("lm_head",),
}


@dataclass
class LoRAConfig:
    """Rank, scale, dropout and target layers of a run's adapters."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("c_attn",)

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.r < 1:
            raise MiniGPT2Error(f"lora_r={self.r} must be positive (0 turns LoRA off)")
        if not 0.0 <= self.dropout < 1.0:
            raise MiniGPT2Error(f"lora_dropout={self.dropout} must be in [0, 1)")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise MiniGPT2Error(
                f"unknown lora_targets {unknown or '[]'}; choose from {', '.join(TARGETS)}"
            )

    def to_dict(self) -> dict:
        """Plain dict, for checkpoint headers."""
        return {"r": self.r, "alpha": self.alpha, "dropout": self.dropout, "targets": self.targets}


class LoRALinear(nn.Linear):
    """A frozen nn.Linear plus a trainable low-rank update (none when r is 0: a frozen layer
    whose weight may be held in a lower precision than its input)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same tensors (the head stays tied)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.scaling = r, alpha / max(r, 1)
        self.enabled = True  # off: the base layer alone (adapters_off)
        self.dropout = nn.Dropout(dropout)
        if r:
            device = base.weight.device
            self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
            self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype or torch.is_autocast_enabled(x.device.type):
            out = F.linear(x, self.weight, self.bias)
        else:  # a base held in bfloat16 under float32: its product in bfloat16, as autocast's
            out = F.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)
        if self.r and self.enabled:
            out = out + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling
        return out

    def delta(self) -> torch.Tensor:
        """The update B A * scaling the adapters add to the weight (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling


def _named_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The model's linear layers by name (blocks' four and the head)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def apply_lora(model: nn.Module, cfg: LoRAConfig, base_dtype: torch.dtype | None = None) -> None:
    """Freeze every parameter, then give the targeted layers adapters (in place). With
    base_dtype, the blocks' frozen weight matrices are held in it (bfloat16: half the memory)."""
    for name, p in model.named_parameters():
        p.requires_grad_(name == "score.weight")  # a classifier's new head always trains
    suffixes = tuple(s for t in cfg.targets for s in TARGETS[t])
    for name, layer in _named_linears(model).items():
        targeted = name.endswith(suffixes)
        in_blocks = name != "lm_head"
        if not targeted and not (base_dtype and in_blocks):
            continue
        adapted = LoRALinear(layer, cfg.r if targeted else 0, cfg.alpha, cfg.dropout)
        if base_dtype is not None and in_blocks:
            for p in (adapted.weight, adapted.bias):
                if p is not None:
                    p.data = p.data.to(base_dtype)
        _set_module(model, name, adapted)


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Within the block, the model computes as its base: every adapter is skipped (DPO's
    reference with LoRA, without a second copy of the model)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer in layers:
            layer.enabled = True


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors by parameter name, and a classifier's head, which trains beside
    them (what a LoRA checkpoint holds)."""
    model = getattr(model, "_orig_mod", model)
    return {
        n: p
        for n, p in model.named_parameters()
        if n.endswith((".lora_A", ".lora_B")) or n == "score.weight"
    }


def load_adapters(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy adapter tensors into a model that apply_lora prepared, checking names and shapes."""
    own = adapter_state(model)
    if set(own) != set(tensors):
        missing, extra = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
        raise MiniGPT2Error(
            f"{source}: adapters do not match the model (missing {missing[:2]}, "
            f"unexpected {extra[:2]})"
        )
    with torch.no_grad():
        for name, p in own.items():
            if p.shape != tensors[name].shape:
                raise MiniGPT2Error(
                    f"{source}: adapter {name} has shape {tuple(tensors[name].shape)}, the base "
                    f"model needs {tuple(p.shape)}: the adapter was trained on another base"
                )
            p.copy_(tensors[name])


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and put plain nn.Linear layers back (in place)."""
    for name, layer in list(_named_linears(model).items()):
        if not isinstance(layer, LoRALinear):
            continue
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            weight = layer.weight.float()
            if layer.r:
                weight = weight + layer.delta().float()
            if name == "lm_head":  # tied to wte: the head gets its own weight only if adapted
                plain.weight = layer.weight if not layer.r else nn.Parameter(weight)
            else:
                plain.weight = nn.Parameter(weight)
            if layer.bias is not None:
                plain.bias = nn.Parameter(layer.bias.detach().float())
        _set_module(model, name, plain.to(layer.weight.device))
    for p in model.parameters():
        p.requires_grad_(True)
    return model
