"""The Trainer's evaluation: each split's loss over its evaluation batches, the objective's
validation statistics and HellaSwag, as a run reports them."""

from __future__ import annotations

import math
import time

import torch

from ..device import autocast
from ..errors import MiniGPT2Error
from ..evaluate.scoring import hellaswag_correct, hellaswag_groups, read_hellaswag
from .distributed import mean_across_ranks


class Evaluation:
    """evaluate() and what a run logs of it (a mixin over the Trainer's attributes)."""

    def _read_hellaswag(self) -> tuple[list, list[int]]:
        """HellaSwag's examples, tokenized once, and their labels."""
        if self.cfg.fsdp:
            raise MiniGPT2Error(
                "hellaswag during training does not run with fsdp=true; score a checkpoint "
                "with python -m minigpt2 eval --task hellaswag"
            )
        examples = read_hellaswag(self.cfg.hellaswag, self.cfg.hellaswag_examples or None)
        return hellaswag_groups(self.tokenizer, examples), [ex["label"] for ex in examples]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss of each split over its evaluation batches (weighted by counted targets,
        pairs or records): eval_iters fixed batches, or every validation record once; and the
        objective's validation statistics (val_NAME). Rank r takes batches r, r + world, ...;
        the result does not depend on the number of processes."""
        self.net.eval()
        out = {}
        bs, iters, world = self.cfg.batch_size, self.cfg.eval_iters, self.dist.world_size
        for split, batches in self.eval_samplers.items():
            total = torch.zeros(2 + len(self.objective.eval_stats), device=self.device)
            n = batches.eval_batches(bs, iters)
            rounds = -(-n // world)  # equal on every rank, as FSDP needs
            for k in range(self.dist.rank, rounds * world, world):
                real = k < n
                b = batches.eval_batch(k if real else 0, bs, iters, self.device)
                with autocast(self.device, self.dtype):
                    total += self.objective.eval_sums(self.net, b).float() * real
            total = mean_across_ranks(total, self.dist)  # the ratios are what matter
            out[split] = (total[0] / total[1]).item()
            if split == "val":
                for name, value in zip(self.objective.eval_stats, total[2:], strict=True):
                    out[f"val_{name}"] = (value / total[1]).item()
        if self.hellaswag is not None:
            out |= self._hellaswag()
        self.net.train()
        return out

    def _hellaswag(self) -> dict[str, float]:
        """HellaSwag acc and acc_norm; rank r scores examples r, r + world, ..."""
        groups, labels = self.hellaswag
        mine = slice(self.dist.rank, None, self.dist.world_size)
        with autocast(self.device, self.dtype):
            right = hellaswag_correct(self.model, groups[mine], labels[mine], self.cfg.batch_size)
        counts = torch.tensor(right, dtype=torch.float64, device=self.device)
        counts = mean_across_ranks(counts, self.dist) * self.dist.world_size
        return {
            "hellaswag_acc": counts[0].item() / len(labels),
            "hellaswag_acc_norm": counts[1].item() / len(labels),
        }

    def _evaluation(self) -> dict:
        """evaluate() as a run reports it, with the seconds it took."""
        t0 = time.perf_counter()
        result = self.evaluate()
        out = {"train_loss": result["train"], "val_loss": result["val"]}
        if self.objective.perplexity:
            out["val_ppl"] = math.exp(min(result["val"], 50.0))
        out |= {k: v for k, v in result.items() if k.startswith(("hellaswag", "val_"))}
        return out | {"eval_seconds": time.perf_counter() - t0}
