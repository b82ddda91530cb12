"""The optimizer of a run: AdamW parameter groups, and the learning-rate schedule."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig


def lr_at(it: int, cfg: TrainConfig) -> float:
    """Learning rate of step it: linear warmup from 0, then cosine or linear decay to min_lr."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if cfg.decay == "constant" or decay_iters <= cfg.warmup_iters:
        return cfg.learning_rate
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / (decay_iters - cfg.warmup_iters)
    shape = 0.5 * (1 + math.cos(math.pi * ratio)) if cfg.decay == "cosine" else 1 - ratio
    return cfg.min_lr + shape * (cfg.learning_rate - cfg.min_lr)


def param_groups(model: torch.nn.Module, weight_decay: float) -> tuple[list[dict], list[str]]:
    """AdamW groups: decay on weight matrices only, none on biases, LayerNorms or embeddings.
    Also returns the parameter names in optimizer order (checkpoints key state by name)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # a tied parameter is listed once
        if p.requires_grad:
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append((name, p))
    groups = [
        {"params": [p for _, p in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]
    return groups, [n for n, _ in decay + no_decay]


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW (or Adam), fused where the device supports it (not over FSDP's sharded tensors)."""
    groups, names = param_groups(model, cfg.weight_decay if cfg.optimizer == "adamw" else 0.0)
    fused = device.type in ("cuda", "cpu") and not cfg.fsdp
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    opt = kind(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)
    return opt, names
