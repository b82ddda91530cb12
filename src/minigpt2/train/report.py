"""What a run shows and leaves behind: progress bar, metrics.jsonl, config.toml, loss.png and a
closing sample. Only the main process reports."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..decode.generate import Generator, SamplingConfig
from ..device import peak_flops
from ..formats.checkpoint import write_atomic

METRICS = "metrics.jsonl"


def _trim_metrics(path: Path, last_iter: int) -> None:
    """On resume, drop lines logged after the checkpoint (they will be logged again)."""
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    keep = [ln for ln in lines if json.loads(ln).get("iter", 0) <= last_iter]
    if len(keep) != len(lines):
        write_atomic(path, lambda tmp: Path(tmp).write_text("".join(k + "\n" for k in keep)))


class Reporter:
    """Progress bar, metrics file and closing outputs of a Trainer."""

    def __init__(self, trainer) -> None:
        self.t = trainer
        self.active = trainer.dist.is_main
        cfg = trainer.cfg
        self.flops_per_token = trainer.model.flops_per_token(trainer.block_size)
        # tokens per second count the global batch, so the peak is that of every device
        one = peak_flops(trainer.device, trainer.dtype, cfg.tf32) if self.active else None
        self.peak = one * trainer.dist.world_size if one else None
        self.mark = (trainer.iter, trainer.tokens_seen, time.perf_counter())
        self.bar = None
        if not self.active:
            return
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):  # half-written by a killed run; never read
            stale.unlink(missing_ok=True)
        write_atomic(out / "config.toml", lambda tmp: Path(tmp).write_text(cfg.to_toml()))
        self.metrics_path = out / METRICS
        _trim_metrics(self.metrics_path, trainer.iter)
        # A bar redraws itself with carriage returns: in a log file (torchrun, a batch job)
        # that is megabytes of frames, so there a plain line every log_interval steps instead.
        self.plain = cfg.progress and not sys.stderr.isatty()
        self.bar = tqdm(
            total=cfg.max_iters,
            initial=trainer.iter,
            disable=not cfg.progress or self.plain,
            file=sys.stderr,
            dynamic_ncols=True,
            desc="train",
        )
        total = trainer.model.num_params()
        trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        share = f" ({trained:,} trained: {trained / total:.2%})" if trained < total else ""
        cpu = torch.device(trainer.device).type == "cpu"
        threads = f" ({torch.get_num_threads()} threads)" if cpu else ""
        self.say(
            f"model: {total:,} parameters{share}, {trainer.device}{threads}, "
            f"{cfg.dtype}; global batch {trainer.global_batch} x {trainer.block_size} "
            f"tokens ({trainer.dist.world_size} process(es))"
        )
        if trainer.data_note:
            self.say(trainer.data_note)

    def say(self, text: str) -> None:
        """A line that does not break the progress bar."""
        if self.active:
            (self.bar.write if self.bar is not None else print)(text, file=sys.stderr)

    def step(self) -> None:
        """One optimizer step done."""
        if self.bar is not None:
            self.bar.update(1)

    def log(self, it: int, loss: float, lr: float, evals: dict, stats: dict | None = None) -> None:
        """Record step it: throughput since the last log (evaluation time excluded), and the
        objective's statistics of the step (DPO's rewards/..., a classifier's accuracy)."""
        stats = stats or {}
        now = time.perf_counter()
        steps, seconds = it - self.mark[0], now - self.mark[2] - evals.get("eval_seconds", 0.0)
        tokens = self.t.tokens_seen - self.mark[1]
        tps = tokens / seconds if seconds > 0 and steps else 0.0
        mfu = tps * self.flops_per_token / self.peak if self.peak and tps else None
        if self.active:
            row = {
                "iter": it,
                "train_loss": loss,
                "val_loss": evals.get("val_loss"),
                "lr": lr,
                "tokens_per_sec": round(tps, 1),
                "elapsed": round(self.t.elapsed(), 3),
                "mfu": round(mfu, 4) if mfu is not None else None,
            }
            row |= stats
            if evals:
                row |= {"eval_train_loss": evals["train_loss"]}
                row |= {k: v for k, v in evals.items() if k.startswith(("hellaswag", "eval_s"))}
                row |= {k: v for k, v in evals.items() if k.startswith("val_") and k != "val_loss"}
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            shown = {k.split("/")[-1]: f"{v:.3f}" for k, v in stats.items() if k in _SHOWN}
            if self.plain:
                self.say(
                    f"step {it}/{self.t.cfg.max_iters}: loss {loss:.4f}, lr {lr:.2e}, "
                    f"{tps:,.0f} tok/s"
                    + (f", mfu {mfu:.1%}" if mfu is not None else "")
                    + "".join(f", {k} {v}" for k, v in shown.items())
                )
            elif self.bar is not None:
                self.bar.set_postfix(
                    loss=f"{loss:.4f}",
                    lr=f"{lr:.2e}",
                    tok_s=f"{tps:,.0f}",
                    mfu=f"{mfu:.1%}" if mfu is not None else "n/a",
                    **shown,
                )
            if evals:
                self.say(f"step {it}: " + eval_line(evals))
        self.mark = (it, self.t.tokens_seen, time.perf_counter())

    def finish(self, summary: dict) -> None:
        """Close the bar; then the loss plot and a sample from the trained model."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.close()
        if "interrupted" in summary:
            self.say(
                f"{summary['interrupted']}: checkpoint saved at step {summary['iter']} in "
                f"{self.t.out_dir}; continue with --init_from=resume "
                f"--out_dir={self.t.out_dir}"
            )
            return
        if not plot_losses(self.metrics_path, self.t.out_dir / "loss.png"):
            self.say("(no loss.png: drawing it needs matplotlib, pip install matplotlib)")
        classifier = bool(self.t.model.config.labels)
        if self.t.cfg.sample_tokens > 0 and not self.t.fsdp and not classifier:
            self.say("sample from the trained model:")
            print(sample_text(self.t), flush=True)
        out = self.t.out_dir
        if classifier:
            self.say(
                f"the classifier is in {out}. Next:\n"
                f'  minigpt2 classify --model {out} --text "..."\n'
                f"  minigpt2 eval --model {out} --task classification --data FILE\n"
                f"  minigpt2 export {out} DIR  (transformers' GPT2ForSequenceClassification)"
            )
            return
        self.say(
            f"the model is in {out} (best.safetensors; ckpt.safetensors to resume). Next:\n"
            f'  minigpt2 sample --model {out} --prompt "..."\n'
            f"  minigpt2 train --init_from=resume --out_dir={out} --max_iters=N  (train on)\n"
            f"  minigpt2 export {out} DIR  (transformers' layout; DIR.gguf for llama.cpp)"
        )


# the step statistics the progress line shows (all go to metrics.jsonl)
_SHOWN = ("rewards/accuracies", "rewards/margins", "accuracy")


def eval_line(evals: dict) -> str:
    """An evaluation in words: losses, perplexity, the objective's validation figures."""
    parts = [f"train {evals['train_loss']:.4f}", f"val {evals['val_loss']:.4f}"]
    if "val_ppl" in evals:
        parts[-1] += f" (ppl {evals['val_ppl']:.2f})"
    parts += [
        f"{k} {v:.4f}"
        for k, v in evals.items()
        if k.startswith(("val_", "hellaswag_acc_norm")) and k not in ("val_loss", "val_ppl")
    ]
    return ", ".join(parts)


# accuracies drawn on loss.png's right axis, where a run has them
ACCURACIES = {
    "hellaswag_acc_norm": "HellaSwag acc_norm",
    "rewards/accuracies": "reward accuracy (step)",
    "val_reward_accuracy": "validation reward accuracy",
    "accuracy": "accuracy (step)",
    "val_accuracy": "validation accuracy",
}


def plot_losses(metrics: Path, out: Path) -> bool:
    """loss.png from metrics.jsonl when matplotlib is installed (the [plot] extra)."""
    # here: the optional [plot] extra
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(ln) for ln in metrics.read_text().splitlines() if ln.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["iter"] for r in rows], [r["train_loss"] for r in rows], label="train (step)")
    val = [r for r in rows if r.get("val_loss") is not None]
    ax.plot([r["iter"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=out.parent.name)
    ax.legend(loc="upper left")
    right = None
    for key, label in ACCURACIES.items():
        points = [r for r in rows if r.get(key) is not None]
        if points:  # accuracies on their own axis, on the right
            right = right or ax.twinx()
            right.plot([r["iter"] for r in points], [r[key] for r in points], ".-", label=label)
    if right is not None:
        right.set_ylabel("accuracy")
        right.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return True


def sample_text(trainer) -> str:
    """A short sample from the trained model, seeded by the run's seed: a continuation of
    sample_prompt, or for record data the response to the first validation record's prompt."""
    cfg, tok = trainer.cfg, trainer.tokenizer
    prompt = tok.encode(cfg.sample_prompt) or [tok.eot_id]
    records = trainer.data_format != "text"
    if records:
        val = trainer.eval_samplers["val"]
        prompt = val.ids[0][: val.prompt_lengths[0]].tolist() or [tok.eot_id]
    sampling = SamplingConfig(
        max_new_tokens=cfg.sample_tokens,
        temperature=0.8,
        top_k=200,
        seed=cfg.seed,
        stop_at_eot=records,
        eot_id=tok.eot_id,
    )
    ids = Generator(trainer.model, vocab_limit=tok.vocab_size).generate([prompt], sampling)[0]
    return tok.decode(prompt + [i for i in ids if i != tok.eot_id])
