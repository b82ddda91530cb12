"""LoRA against full fine-tuning on the CPU: peak memory (RSS) and seconds per optimizer step.

    python benchmarks/bench_lora.py                       # gpt2-medium full and LoRA, gpt2-xl LoRA
    python benchmarks/bench_lora.py --runs gpt2-medium:lora gpt2-xl:lora:bfloat16

Each run is its own process, so its peak RSS is its own: it loads a released-layout base of the
shape (random weights, written once under --cache), builds the Trainer as `minigpt2 train
--init_from=BASE` does, and times optimizer steps (the first one, warm-up, is not counted).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_RUNS = ["gpt2-medium:full", "gpt2-medium:lora", "gpt2-xl:lora:bfloat16"]


def rss_gib() -> float:
    """This process's resident memory now."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def peak_gib() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_base(shape: str, cache: Path) -> Path:
    """A released-layout directory of the shape with random weights (written once)."""
    out = cache / shape
    if not (out / "model.safetensors").is_file():
        import torch

        from minigpt2 import GPT, GPTConfig

        torch.manual_seed(0)
        GPT(GPTConfig.preset(shape)).save_pretrained(out)
    return out


def child(args) -> None:
    """One measured run; prints one JSON line."""
    import torch

    from minigpt2.train.config import from_settings
    from minigpt2.train.trainer import Trainer

    shape, mode, *dtype = args.child.split(":")
    base = Path(args.cache) / shape
    corpus = Path(args.cache) / "corpus.txt"
    corpus.write_text("the cat sat on the mat. " * 20000)
    settings = dict(
        init_from=str(base), data=str(corpus), tokenizer="byte", data_cache=str(args.cache),
        out_dir=str(Path(args.cache) / "out"), batch_size=args.batch, block_size=args.block,
        max_iters=args.steps + 1, progress=False, device="cpu", dropout=0.0,
        lora_r=8 if mode == "lora" else 0, base_dtype=dtype[0] if dtype else "float32",
    )  # fmt: skip
    t0 = time.perf_counter()
    trainer = Trainer(from_settings({}, settings))
    loaded = time.perf_counter() - t0
    after_load = rss_gib()
    trainer.train_step()  # warm-up: allocates gradients and optimizer state
    times = []
    for _ in range(args.steps):
        t = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t)
    trained = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    result = {
        "run": args.child,
        "params": trainer.model.num_params(),
        "trained": trained,
        "batch": f"{args.batch}x{args.block}",
        "load_s": round(loaded, 1),
        "rss_after_load_gib": round(after_load, 2),
        "peak_rss_gib": round(peak_gib(), 2),
        "s_per_step": round(sorted(times)[len(times) // 2], 2),
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(result))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="*", default=DEFAULT_RUNS, help="SHAPE:full|lora[:bfloat16]")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--block", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--cache", default="/tmp/minigpt2-bench-lora")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--make", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.make:
        make_base(args.make, Path(args.cache))
        return
    if args.child:
        child(args)
        return
    Path(args.cache).mkdir(parents=True, exist_ok=True)
    for run in args.runs:  # bases are written by a process of their own: not in any peak
        make = [sys.executable, __file__, "--make", run.split(":")[0], "--cache", args.cache]
        subprocess.run(make, check=True)
        sizes = ["--batch", str(args.batch), "--block", str(args.block), "--steps", str(args.steps)]
        cmd = [sys.executable, __file__, "--child", run, *sizes, "--cache", args.cache]
        done = subprocess.run(cmd, capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        print(
            lines[-1] if done.returncode == 0 and lines else f"{run}: failed\n{done.stderr[-2000:]}"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
