"""The training loop: steps, when to evaluate and checkpoint, faults. The model and data it starts
from come from startup.py, the optimizer and schedule from optim.py, its checkpoints' contents
from run_state.py and its evaluation from evaluation.py."""

from __future__ import annotations

import contextlib
import json
import math
import signal
import sys
import time
from pathlib import Path

import torch

from ..data.batches import Batch
from ..data.tokenizer import get_tokenizer
from ..device import autocast, resolve_device, resolve_dtype, set_threads, use_tf32
from ..errors import MiniGPT2Error
from ..formats import checkpoint as ckpt
from .config import TrainConfig
from .distributed import (
    in_turns,
    init_distributed,
    lost_contact,
    max_across_ranks,
    mean_across_ranks,
    shutdown,
    wrap_model,
)
from .evaluation import Evaluation
from .objectives import objective_for, reference_logps
from .optim import build_optimizer, lr_at
from .report import Reporter
from .run_state import RunState
from .rundir import RunLock, claim_out_dir, clear_run
from .startup import open_data, reference_model, start_model


class Interrupted:
    """Turns SIGINT and SIGTERM into a flag checked between steps (then: checkpoint, exit)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.previous: dict = {}

    def __enter__(self) -> Interrupted:
        with contextlib.suppress(ValueError):  # not the main thread: leave handlers alone
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Trainer(RunState, Evaluation):
    """Owns one run: data, model, optimiser, and the state a checkpoint captures."""

    def __init__(self, cfg: TrainConfig) -> None:
        """Set up the run cfg describes; with init_from = "resume", from out_dir's checkpoint."""
        self.cfg = cfg
        set_threads(cfg.threads)
        device = resolve_device(cfg.device)
        self.dist, self.device = init_distributed(device, cfg.dist_timeout)
        self.lock: RunLock | None = None
        try:
            self._prepare()
        except BaseException:  # leave the process group, or gloo aborts the process at exit
            shutdown(self.dist, wait_for_all=False)
            raise

    def _prepare(self) -> None:
        """Everything the run needs before its first step, on every rank."""
        cfg = self.cfg
        if not cfg.eval_only:  # refused before the data and model take their time; run()
            claim_out_dir(cfg, self.dist).release()  # takes it for good: until then, nothing
            # is written
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        use_tf32(self.device, cfg.tf32)
        self.tokenizer = get_tokenizer(cfg.tokenizer)
        world = self.dist.world_size
        if cfg.gradient_accumulation_steps % world:
            raise MiniGPT2Error(
                f"gradient_accumulation_steps={cfg.gradient_accumulation_steps} does not split "
                f"over {world} processes; make it a multiple of {world} (the global batch is "
                "batch_size x gradient_accumulation_steps whatever the number of processes)"
            )
        self.micro_steps = cfg.gradient_accumulation_steps // world
        self.global_batch = cfg.batch_size * cfg.gradient_accumulation_steps
        opened = in_turns(self.dist, lambda: open_data(cfg, self.tokenizer, self.dist.is_main))
        self.data_format, data = opened
        torch.manual_seed(cfg.seed)
        self.fsdp = cfg.fsdp
        resume = None
        if cfg.init_from == "resume":
            resume = ckpt.CheckpointFile(Path(cfg.out_dir) / ckpt.LATEST)
        with resume or contextlib.nullcontext():
            self._set_up(data, resume)

    def close(self) -> None:
        """Give out_dir up (run() does at its end)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _set_up(self, data, resume: ckpt.CheckpointFile | None) -> None:
        """Model, samplers and optimizer; with resume, their state as it was saved."""
        cfg = self.cfg
        labels = getattr(data, "labels", ())  # a classifier's class names
        self.model, self.lora = start_model(
            cfg, self.tokenizer, self.device, self.dtype, resume, labels
        )
        self.model.activation_checkpointing = cfg.activation_checkpointing
        if self.dist.rank:  # the same initial weights everywhere; each rank its own dropout
            torch.manual_seed(cfg.seed + self.dist.rank)
        mc = self.model.config
        if self.tokenizer.vocab_size > mc.vocab_size:
            raise MiniGPT2Error(
                f"tokenizer {self.tokenizer.name!r} has {self.tokenizer.vocab_size}"
                f" ids but the model only {mc.vocab_size}; use its tokenizer"
            )
        self.block_size = mc.block_size
        self.objective = objective_for(cfg)
        # data_note: a line about the data for the start of the run
        self.train_batches, self.eval_samplers, self.data_note = self.objective.samplers(
            data, self.data_format, mc.block_size, cfg.seed, cfg.data
        )
        if getattr(data, "identical", 0):
            self.data_note += (
                f"\nwarning: {data.identical} pair(s) have the same chosen and rejected "
                "response; they are kept (each adds log 2 to the loss and no gradient)"
            )
        if self.objective.name == "dpo":
            self._reference(resume)
        self.tokens_seen = 0  # real input tokens trained on in this process's run
        self.hellaswag = self._read_hellaswag() if cfg.hellaswag else None
        self.net = self.model if self.fsdp else wrap_model(self.model, self.dist, self.device)
        self.optimizer, self.param_names = build_optimizer(self.model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype is torch.float16)
        self.iter, self.best_val, self.elapsed_before = 0, float("inf"), 0.0
        if resume is not None:
            self._restore(resume)
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.out_dir = Path(cfg.out_dir)

    def _reference(self, resume: ckpt.CheckpointFile | None) -> None:
        """DPO's reference log-probabilities of every pair: saved with the run, or computed
        now, once, by the reference model (the starting one; with LoRA, its base with the
        adapters off; or dpo_reference)."""
        samplers = {"train": self.train_batches, "val": self.eval_samplers["val"]}
        names = {split: f"dpo.reference.{split}" for split in samplers}
        if resume is not None and all(n in resume.names() for n in names.values()):
            for split, sampler in samplers.items():
                sampler.reference = resume.tensor(names[split]).double().numpy()
        else:
            model = reference_model(self.cfg, self.tokenizer, self.model, self.device)
            with model as ref:
                ref.eval()
                for sampler in samplers.values():
                    reference_logps(
                        ref,
                        sampler,
                        self.cfg.batch_size,
                        self.dist.rank,
                        self.dist.world_size,
                        self._summed,
                    )
                self.model.train()
        # the training split's evaluation scores the same pairs: it shares their reference
        self.eval_samplers["train"].reference = self.train_batches.reference

    def _summed(self, fn) -> torch.Tensor:
        """fn() under the run's autocast, summed over the ranks."""
        with autocast(self.device, self.dtype):
            out = fn()
        return mean_across_ranks(out, self.dist) * self.dist.world_size

    def _batch(self, step: int, micro: int) -> Batch:
        """This rank's micro-batch `micro` of the step's global training batch."""
        j = micro * self.dist.world_size + self.dist.rank
        bs = self.cfg.batch_size
        return self.train_batches.get(step, self.global_batch, j * bs, bs, self.device)

    def train_step(self) -> torch.Tensor:
        """One optimizer step over the global batch; returns its mean loss (a tensor).

        Each micro-batch's mean loss is weighted by its share of the counted targets of the
        global batch, so the gradient is that of the token-weighted mean over the whole
        batch, however records fall into micro-batches and ranks (DDP averages over ranks,
        hence the factor world)."""
        lr = lr_at(self.iter, self.cfg)
        for group in self.optimizer.param_groups:  # Muon's group: scaled to its own peak
            group["lr"] = lr * group.get("lr_scale", 1.0)
        tokens, counted = self.train_batches.sizes(self.iter, self.global_batch)
        world = self.dist.world_size
        total = torch.zeros((), device=self.device)
        stats = torch.zeros(len(self.objective.stats), device=self.device)
        for micro in range(self.micro_steps):
            b = self._batch(self.iter, micro)
            last = micro == self.micro_steps - 1
            if self.fsdp:  # FSDP: reduce-scatter gradients only on the last micro-step
                self.model.set_requires_gradient_sync(last)
            quiet = last or not self.dist.enabled or self.fsdp
            sync = contextlib.nullcontext() if quiet else self.net.no_sync()
            with sync:
                with autocast(self.device, self.dtype):
                    loss, sums = self.objective.loss(self.net, b)
                    loss = loss * (b.counted * world) / counted
                self.scaler.scale(loss).backward()
            total += loss.detach()
            if sums is not None:
                stats += sums.float()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.iter += 1
        self.tokens_seen += tokens
        self.step_stats = (stats, counted)  # summed over this rank's micro-batches
        return total

    def stats(self) -> dict[str, float]:
        """The objective's statistics of the last step, means over its global batch."""
        sums, counted = self.step_stats
        if not len(sums):
            return {}
        sums = mean_across_ranks(sums, self.dist) * self.dist.world_size / counted
        return dict(zip(self.objective.stats, sums.tolist(), strict=True))

    def run(self) -> dict:
        """Train to max_iters (or evaluate only); returns a summary."""
        self.t_start = time.perf_counter()
        clean = False
        try:
            if self.cfg.eval_only:
                clean = True
                return {"eval_only": True, **self._evaluation()}
            # From the lock on, a signal is a flag the loop reads after its step: a SIGINT that
            # came while the lock was being taken raised KeyboardInterrupt there and left the
            # lock file behind (tests/test_rundir.py saw it once in five runs)
            with Interrupted() as interrupted:
                self.lock = claim_out_dir(self.cfg, self.dist)
                if self.dist.is_main and self.cfg.overwrite and self.cfg.init_from != "resume":
                    clear_run(self.lock.out_dir)  # the model was read already: it may be there
                reporter = Reporter(self)
                try:
                    summary = self._loop(reporter, interrupted)
                except RuntimeError as e:
                    if not self.dist.enabled or not lost_contact(e):
                        raise
                    raise MiniGPT2Error(
                        f"rank {self.dist.rank} lost contact with the other processes (one died "
                        f"or hung past dist_timeout={self.cfg.dist_timeout:g}s); the last "
                        f"checkpoint in {self.out_dir} is kept: resume with --init_from=resume"
                    ) from None
            reporter.finish(summary)
            clean = True
            return summary
        finally:
            self.close()
            shutdown(self.dist, wait_for_all=clean)

    def _loop(self, reporter, interrupted: Interrupted) -> dict:
        cfg = self.cfg
        last_eval: dict = {}
        while self.iter < cfg.max_iters:
            loss = self.train_step()
            # A signal may reach one rank only (a kill of one process, a node's preemption):
            # every rank learns of it at the same step, so they checkpoint and stop together.
            stop = max_across_ranks(interrupted.signal or 0, self.dist)
            at_end = self.iter == cfg.max_iters
            evaluate = self.iter % cfg.eval_interval == 0 or at_end
            save = self.iter % cfg.checkpoint_interval == 0 or at_end
            log = self.iter % cfg.log_interval == 0 or evaluate
            # Reading the loss syncs a GPU, so there it is read only where it matters: before
            # logging and before every checkpoint, so that a non-finite model is never saved.
            if log or save or stop or self.device.type == "cpu":
                value = mean_across_ranks(loss, self.dist).item()
                if not math.isfinite(value):
                    raise MiniGPT2Error(
                        f"loss became {value} at step {self.iter}; stopped, the last good "
                        f"checkpoint in {self.out_dir} is kept (lower learning_rate, or set "
                        "grad_clip)"
                    )
            if log:
                last_eval = self._evaluation() if evaluate else {}
                stats = self.stats()
                reporter.log(self.iter, value, lr_at(self.iter - 1, cfg), last_eval, stats)
                if last_eval and last_eval["val_loss"] < self.best_val:
                    self.best_val = last_eval["val_loss"]
                    self.save(ckpt.BEST, weights_only=True)
            reporter.step()
            if save:
                self.save()
            if stop:
                self.save()
                name = signal.Signals(stop).name
                return {"interrupted": name, "iter": self.iter, **last_eval}
        return {
            "iter": self.iter,
            "best_val_loss": self.best_val,
            "elapsed": self.elapsed(),
            **last_eval,
        }


def print_summary(summary: dict) -> None:
    """One JSON line with the run's result, for scripts."""
    print(json.dumps(summary), file=sys.stdout)
