"""Tiny Shakespeare, character level: nanoGPT's CPU recipe in this loop, the AdamW config and
the Muon config, interleaved in sittings; wall time, best validation loss, and one plot.

    python benchmarks/bench_recipe.py --data ../shared/data/tinyshakespeare.txt [--sittings 2]

Each run is `python train.py ...` as a user types it, in a fresh out_dir and data cache; wall
time covers the whole command. Prints one line per run and writes the validation loss of every
run against wall-clock seconds to --plot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NANOGPT = (  # nanoGPT's documented CPU run (its README), through this loop
    "--tokenizer=byte --model= --n_layer=4 --n_head=4 --n_embd=128 --block_size=64 "
    "--batch_size=12 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0 --eval_iters=20 "
    "--eval_interval=250 --learning_rate=1e-3 --min_lr=1e-4 --warmup_iters=100 --beta2=0.99 "
    "--dtype=float32 --sample_tokens=0"
).split()
RUNS = {
    "nanoGPT recipe": NANOGPT,
    "AdamW config": [str(ROOT / "configs" / "shakespeare_char_adamw.toml")],
    "Muon config": [str(ROOT / "configs" / "shakespeare_char.toml")],
}


def run(name: str, args: list[str], data: str, extra: list[str]) -> dict:
    """One training command; its wall time, best validation loss and validation curve."""
    with tempfile.TemporaryDirectory() as tmp:
        where = [f"--data={data}", f"--out_dir={tmp}/out", f"--data_cache={tmp}/cache"]
        cmd = [sys.executable, str(ROOT / "train.py"), *args, *where, "--progress=false", *extra]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode:
            raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
        rows = [json.loads(x) for x in Path(f"{tmp}/out/metrics.jsonl").read_text().splitlines()]
    curve = [(r["elapsed"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    best = min(v for _, v in curve)
    return {"run": name, "wall_s": round(wall, 1), "best_val": round(best, 4), "curve": curve}


def plot(results: list[dict], path: Path) -> None:
    """Validation loss against training seconds, one line per run (last sitting's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = {r["run"]: r for r in results}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in last.items():
        xs, ys = zip(*r["curve"], strict=True)
        ax.plot(xs, ys, marker="o", label=f"{name}: {r['best_val']:.3f} in {r['wall_s']:.0f} s")
    ax.axhline(1.65, color="grey", linestyle=":", label="goal 1.65")
    ax.set_xlabel("seconds since the run started (metrics.jsonl elapsed)")
    ax.set_ylabel("validation loss (nats / character)")
    ax.set_title("Tiny Shakespeare, character level, 2-core CPU")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--sittings", type=int, default=2)
    p.add_argument("--only", nargs="*", default=list(RUNS), help="run names to include")
    p.add_argument("--plot", default=str(ROOT / "benchmarks" / "shakespeare_char_recipes.png"))
    p.add_argument("extra", nargs="*", help="--key=value added to every non-nanoGPT run")
    args = p.parse_args()
    results = []
    for sitting in range(1, args.sittings + 1):
        for name in args.only:
            extra = [] if name == "nanoGPT recipe" else args.extra
            r = run(name, RUNS[name], args.data, extra)
            results.append(r)
            print(f"sitting {sitting}: {name}: {r['wall_s']} s, best validation {r['best_val']}")
            sys.stdout.flush()
    if args.plot:
        plot(results, Path(args.plot))
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
