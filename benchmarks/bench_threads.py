"""CPU threads: 1 against 2 (or --threads), on a quiet machine and beside one competing busy
process, for training steps (the quickstart's model) and decoding (tokens/s of `sample`).
Rows alternate within each repeat, so drift hits every setting alike; medians are reported.

    python benchmarks/bench_threads.py [--iters 30] [--repeats 3] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# pure Python spinning on one core: the "other job" of a shared machine
BUSY = "while True: pass"


@contextmanager
def competing(load: bool):
    """One busy process for the duration, when load is on."""
    proc = subprocess.Popen([sys.executable, "-c", BUSY]) if load else None
    try:
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def train_seconds(threads: int, iters: int, out: Path) -> float:
    """Seconds the quickstart's first `iters` steps take (the run's own clock: no start-up)."""
    args = [sys.executable, str(ROOT / "train.py"), f"--out_dir={out}", "--overwrite=true"]
    args += [f"--max_iters={iters}", f"--threads={threads}", "--sample_tokens=0"]
    args += [f"--eval_interval={iters}", "--eval_iters=1", "--progress=false"]
    result = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["elapsed"]


def decode_rate(threads: int, model: Path, tokens: int) -> float:
    """Tokens per second of one streamed sample."""
    args = [sys.executable, "-m", "minigpt2", "sample", "--model", str(model), "--greedy"]
    args += ["--max-new-tokens", str(tokens), "--threads", str(threads), "--prompt", "def "]
    result = subprocess.run(args, capture_output=True, text=True, check=True)
    return float(re.search(r"([\d.]+) tokens/s", result.stderr).group(1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--tokens", type=int, default=120)  # the mini model's context is 128
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", default="1,2")
    args = p.parse_args()
    counts = [int(t) for t in args.threads.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        train_seconds(1, 2, out)  # prepares the corpus once, and leaves a model to decode
        results: dict[tuple, list[float]] = {}
        for _ in range(args.repeats):
            for load in (False, True):
                with competing(load):
                    for t in counts:
                        results.setdefault(("train", load, t), []).append(
                            train_seconds(t, args.iters, out)
                        )
                        results.setdefault(("decode", load, t), []).append(
                            decode_rate(t, out, args.tokens)
                        )
    for (what, load, t), values in sorted(results.items()):
        unit = f"s for {args.iters} steps" if what == "train" else "tokens/s"
        spread = f"{min(values):.2f}-{max(values):.2f}"
        print(
            f"{what:<6} {'loaded' if load else 'quiet':<6} threads={t}: "
            f"{statistics.median(values):.2f} {unit} (median of {len(values)}; {spread})"
        )


if __name__ == "__main__":
    main()
