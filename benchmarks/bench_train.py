"""Training throughput of this project's loop (Trainer.train_step: forward, backward, clip,
fused AdamW) on the full gpt2 shape, float32 and bfloat16 autocast, side by side.

    python benchmarks/bench_train.py --data ../shared/data/tinyshakespeare.txt \
        --tokenizer ../shared/tokenizers/gpt2.tiktoken [--steps 6] [--batch-size 4]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--model", default="gpt2")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--dtypes", default="float32,bfloat16")
    args = p.parse_args()
    from minigpt2.device import peak_flops
    from minigpt2.train.config import parse_args
    from minigpt2.train.trainer import Trainer

    for dtype in args.dtypes.split(","):
        with tempfile.TemporaryDirectory() as out:
            cfg = parse_args(
                [
                    f"--data={args.data}",
                    f"--tokenizer={args.tokenizer}",
                    f"--model={args.model}",
                    f"--block_size={args.block_size}",
                    f"--batch_size={args.batch_size}",
                    f"--dtype={dtype}",
                    "--device=cpu",
                    f"--out_dir={out}",
                    "--progress=false",
                    f"--data_cache={out}/cache",
                ]
            )
            trainer = Trainer(cfg)
            trainer.train_step()  # warm-up: allocator, thread pool, kernel selection
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                trainer.train_step().item()
                times.append(time.perf_counter() - t0)
        step = statistics.median(times)
        tokens = args.batch_size * args.block_size
        flops = trainer.model.flops_per_token(args.block_size) * tokens
        peak = peak_flops(trainer.device, trainer.dtype)
        print(
            f"{args.model} {dtype}: {step:.2f} s/step (median of {args.steps}), "
            f"{tokens / step:,.0f} tokens/s, MFU {flops / step / peak:.1%} of the measured "
            f"{peak / 1e9:,.0f} GFLOP/s {dtype} matmul peak",
            flush=True,
        )


if __name__ == "__main__":
    main()
