"""What a run's checkpoint holds (its tensors and header) and how it comes back: the Trainer's
saving and restoring, apart from its loop."""

from __future__ import annotations

import time

import torch

from ..formats import checkpoint as ckpt
from .distributed import all_gathered
from .sharding import full_model_state, full_optimizer_state, sharded_state_reader


class RunState:
    """The Trainer's checkpoints: written from its model, optimizer, scaler, generators and
    counters, and read back into them (a mixin over the Trainer's attributes)."""

    def reference_tensors(self) -> dict[str, torch.Tensor]:
        """DPO's reference log-probabilities, for the checkpoint (none for other objectives)."""
        if getattr(self.train_batches, "reference", None) is None:
            return {}
        return {
            "dpo.reference.train": torch.from_numpy(self.train_batches.reference),
            "dpo.reference.val": torch.from_numpy(self.eval_samplers["val"].reference),
        }

    def _restore(self, resume: ckpt.CheckpointFile) -> None:
        """Optimizer, scaler, random generators and counters as the checkpoint saved them."""
        header = resume.header
        read = sharded_state_reader(resume, self.model) if self.fsdp else None  # its rows
        state = ckpt.optimizer_state(resume, self.param_names, read)
        groups = ckpt.merged_param_groups(
            header["optimizer_groups"], self.optimizer.state_dict()["param_groups"]
        )
        index = {name: i for i, name in enumerate(self.param_names)}
        self.optimizer.load_state_dict(
            {"state": {index[n]: v for n, v in state.items()}, "param_groups": groups}
        )
        if header.get("scaler"):
            self.scaler.load_state_dict(header["scaler"])
        rng = {n: resume.tensor(n) for n in resume.names() if n.startswith("rng.")}
        if not ckpt.restore_rng(rng, self.dist.rank):  # more ranks now than then
            torch.manual_seed(self.cfg.seed + self.dist.rank + 7919 * header["iter"])
        self.iter, self.best_val = header["iter"], header["best_val_loss"]
        self.elapsed_before = header.get("elapsed", 0.0)

    def header(self) -> dict:
        """Everything but tensors that a checkpoint needs to resume or to sample."""
        groups = [
            {k: v for k, v in g.items() if k != "params"}
            for g in self.optimizer.state_dict()["param_groups"]
        ]
        return {
            "iter": self.iter,
            "best_val_loss": self.best_val,
            "elapsed": self.elapsed(),
            "model_config": self.model.config.to_dict(),
            "train_config": vars(self.cfg),
            "tokenizer": self.tokenizer.name,
            "tokenizer_hash": self.tokenizer.fingerprint,
            "tokenizer_spec": self.cfg.tokenizer,
            "data_format": self.data_format,
            "objective": self.objective.name,
            "optimizer_groups": groups,
            **({"lora": self.lora} if self.lora else {}),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
        }

    def elapsed(self) -> float:
        """Training seconds so far, across resumes."""
        return self.elapsed_before + time.perf_counter() - self.t_start

    def save(self, path_name: str = ckpt.LATEST, weights_only: bool = False) -> None:
        """Write a checkpoint from the main process. Under FSDP every rank takes part in
        gathering the full weights and optimizer state first."""
        if self.fsdp:
            weights = {
                f"model.{k}": v
                for k, v in full_model_state(self.model).items()
                if k != "lm_head.weight"
            }
            state = full_optimizer_state(self.model, self.optimizer) if not weights_only else {}
        else:
            weights = ckpt.model_tensors(self.model, adapters_only=bool(self.lora))
            by_index = self.optimizer.state_dict()["state"] if not weights_only else {}
            state = {self.param_names[i]: v for i, v in by_index.items()}
        rng = all_gathered(ckpt.rng_tensors(), self.dist) if not weights_only else []
        if not self.dist.is_main:
            return
        tensors = dict(weights)
        if not weights_only:
            tensors |= ckpt.optimizer_tensors(state) | ckpt.ranked_rng_tensors(rng)
            tensors |= self.reference_tensors()
        ckpt.save_checkpoint(self.out_dir / path_name, tensors, self.header())
