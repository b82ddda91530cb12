"""Cold batch draws from a corpus larger than memory: default readahead against MADV_RANDOM.

    python benchmarks/bench_draw.py [--gib 20] [--batches 50] [--dir /tmp]

Writes a sparse shard of --gib GiB (no disk used: holes), then times drawing batches of 12
random 1,025-token windows, each batch from pages never touched before, with the shard mapped
as numpy's memmap does (the kernel's default readahead) and as the project maps it
(batches._mapped: MADV_RANDOM). Medians over --batches draws.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from minigpt2.data.batches import _mapped


def draws(tokens: np.ndarray, batches: int, seed: int) -> float:
    """Median seconds to gather one batch of 12 random windows of 1,025 tokens."""
    rng = np.random.default_rng(seed)
    times = []
    for _ in range(batches):
        starts = rng.integers(0, len(tokens) - 1025, 12)
        t = time.perf_counter()
        for s in starts:
            np.array(tokens[s : s + 1025])  # copy out, as a batch does
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=20)
    p.add_argument("--batches", type=int, default=50)
    p.add_argument("--dir", default=tempfile.gettempdir())
    args = p.parse_args()
    path = Path(args.dir) / "minigpt2-sparse-shard.bin"
    with open(path, "wb") as f:
        f.truncate(int(args.gib * 2**30))
    try:
        default = np.memmap(path, dtype=np.uint16, mode="r")
        t_default = draws(default, args.batches, seed=1)
        with open(path, "rb") as f:
            plain = np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), np.uint16)
        t_plain = draws(plain, args.batches, seed=2)
        t_random = draws(_mapped(path, "uint16"), args.batches, seed=3)
        print(
            f"{args.gib:g} GiB sparse shard, batches of 12 x 1,025 tokens, cold pages, "
            f"median of {args.batches}: numpy memmap {t_default * 1e3:.2f} ms, plain mmap "
            f"{t_plain * 1e3:.2f} ms, MADV_RANDOM (minigpt2) {t_random * 1e3:.2f} ms"
        )
    finally:
        os.remove(path)


if __name__ == "__main__":
    main()
