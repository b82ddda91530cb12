"""The optimizer of a run: AdamW parameter groups, Muon beside it, the learning-rate schedule."""

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


def param_groups(
    model: torch.nn.Module, weight_decay: float, exclude: frozenset[str] = frozenset()
) -> tuple[list[dict], list[str]]:
    """AdamW groups: decay on weight matrices only, none on biases, LayerNorms or embeddings
    (parameters named in exclude are left out). Also returns the parameter names in optimizer
    order (checkpoints key state by name)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # a tied parameter is listed once
        if p.requires_grad and name not in exclude:
            (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append((name, p))
    groups = [
        {"params": [p for _, p in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]
    return groups, [n for n, _ in decay + no_decay]


def muon_names(model: torch.nn.Module) -> set[str]:
    """The parameters Muon trains: the 2-D weight matrices inside the blocks (attention and MLP
    projections). Embeddings, the tied head, biases and LayerNorms stay with AdamW, as in Keller
    Jordan's Muon and the modded-nanogpt records."""
    return {
        name
        for name, p in model.named_parameters()
        if p.requires_grad and p.dim() == 2 and name.startswith("transformer.h.")
    }


class MuonAdamW:
    """torch.optim.Muon on the blocks' matrices and AdamW on the rest, stepped, zeroed and saved
    as one optimizer: its state dict numbers parameters as one list (Muon's first)."""

    def __init__(self, *parts: torch.optim.Optimizer) -> None:
        self.parts = parts

    @property
    def param_groups(self) -> list[dict]:
        return [g for part in self.parts for g in part.param_groups]

    @property
    def state(self) -> dict:
        return {k: v for part in self.parts for k, v in part.state.items()}

    def step(self, closure=None) -> None:
        for part in self.parts:
            part.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for part in self.parts:
            part.zero_grad(set_to_none=set_to_none)

    def _sizes(self) -> list[int]:
        return [sum(len(g["params"]) for g in part.param_groups) for part in self.parts]

    def state_dict(self) -> dict:
        """{"state", "param_groups"} of all parts, parameters numbered across them."""
        state, groups, base = {}, [], 0
        for part, size in zip(self.parts, self._sizes(), strict=True):
            sd = part.state_dict()
            state |= {i + base: v for i, v in sd["state"].items()}
            groups += [{**g, "params": [i + base for i in g["params"]]} for g in sd["param_groups"]]
            base += size
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        """Split a state_dict() back over the parts."""
        base, first = 0, 0
        for part, size in zip(self.parts, self._sizes(), strict=True):
            n = len(part.param_groups)
            groups = [
                {**g, "params": [i - base for i in g["params"]]}
                for g in sd["param_groups"][first : first + n]
            ]
            state = {i - base: v for i, v in sd["state"].items() if base <= i < base + size}
            part.load_state_dict({"state": state, "param_groups": groups})
            base, first = base + size, first + n


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device):
    """AdamW (or Adam), fused where the device supports it (FSDP's sharded tensors too);
    with optimizer = "muon", Muon for the blocks' matrices beside it. Muon's group carries
    lr_scale, its peak rate over learning_rate, so one schedule drives both."""
    fused = device.type in ("cuda", "cpu")
    kind = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    if cfg.optimizer != "muon":
        groups, names = param_groups(model, cfg.weight_decay if kind is torch.optim.AdamW else 0)
        opt = kind(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)
        return opt, names
    to_muon = muon_names(model)
    matrices = [(n, p) for n, p in model.named_parameters() if n in to_muon]
    muon = torch.optim.Muon(
        [{"params": [p for _, p in matrices], "lr_scale": cfg.muon_lr / cfg.learning_rate}],
        lr=cfg.muon_lr,
        weight_decay=cfg.muon_weight_decay,
        momentum=cfg.muon_momentum,
        nesterov=True,
        adjust_lr_fn=cfg.muon_adjust_lr,
    )
    groups, names = param_groups(model, cfg.weight_decay, exclude=frozenset(to_muon))
    adamw = torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused
    )
    return MuonAdamW(muon, adamw), [n for n, _ in matrices] + names
