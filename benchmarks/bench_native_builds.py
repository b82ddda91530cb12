"""The native decoder built from two revisions of native.c, side by side in one process: a gpt2
one-token step (one sequence) and the 49 products of a step at a few rows, alternated round by
round, on the gpt2 shape with random weights.

    python benchmarks/bench_native_builds.py --base REV [--dtypes float32,bfloat16,int8] \
        [--rows 1,4,8] [--rounds 6] [--burst BUSY_US,PERIOD_US]

Each build is compiled here as `pip install` compiles it (Python's own CFLAGS, then the
revision's setup.py's extra_compile_args), from `git show REV:...` for the base and from the
working tree for the other, and loaded with ctypes; the decoder's calls go to one
build or the other in turn (who goes first alternating), so both see the same machine. Per
dtype and rows: the median time of each, and the median of each round's ratio (base over
this tree's: above 1 means this tree is faster), which the machine's drift moves less.
--burst keeps another process busy for BUSY_US microseconds of every PERIOD_US meanwhile.
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import multiprocessing
import statistics
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

import minigpt2.decode.native as native
from minigpt2 import GPT, GPTConfig
from minigpt2.decode.kernels import layout_for_inference
from minigpt2.decode.quantize import quantize_for_decoding
from minigpt2.model.attention import KVCache

SOURCE = "src/minigpt2/decode/native/"
PARTS = ("native.c", "native.h", "native_kernels.h", "native_simd.h")


def text_at(root: Path, revision: str | None, path: str) -> str:
    """path's text at revision (None: the working tree)."""
    if revision is None:
        return (root / path).read_text()
    return subprocess.run(["git", "show", f"{revision}:{path}"], cwd=root, check=True, text=True,
                          capture_output=True).stdout  # fmt: skip


def flags_of(setup_py: str) -> list[str]:
    """The compiler's flags as setuptools gives them: Python's CFLAGS and CCSHARED, then the
    extension's extra_compile_args from setup.py's text (later flags win, so both count)."""
    extra: list[str] = []
    for node in ast.walk(ast.parse(setup_py)):
        if isinstance(node, ast.keyword) and node.arg == "extra_compile_args":
            extra = ast.literal_eval(node.value)
    python = [sysconfig.get_config_var(k) or "" for k in ("CFLAGS", "CCSHARED")]
    return " ".join(python).split() + extra


def build(root: Path, revision: str | None, into: Path) -> Path:
    """native.c of revision (None: the working tree) compiled into a shared library."""
    into.mkdir(parents=True)
    for part in PARTS:
        (into / part).write_text(text_at(root, revision, SOURCE + part))
    flags = flags_of(text_at(root, revision, "setup.py"))
    library = into / "native.so"
    subprocess.run(["gcc", *flags, "-shared", str(into / "native.c"), "-o", str(library)],
                   check=True)  # fmt: skip
    return library


def use(library: ctypes.CDLL) -> None:
    """Send the native decoder's calls to library (opened with native.open_library) from now on."""
    native._library = lambda: library


def burst(busy_us: int, period_us: int) -> None:
    """Forever: busy on a core for busy_us, then asleep for the rest of period_us (a server's
    HTTP side and client, as they take a core from a decode step now and then)."""
    while True:
        t = time.perf_counter()
        while time.perf_counter() - t < busy_us / 1e6:
            pass
        time.sleep((period_us - busy_us) / 1e6)


def model_for(dtype: str) -> GPT:
    """gpt2 with random weights, laid out for one-sequence decoding in dtype."""
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt2")).eval()
    if dtype == "int8":
        return quantize_for_decoding(model, "int8")
    return layout_for_inference(model.to(getattr(torch, dtype)), sequences=1)


def timer(model: GPT, rows: int):
    """A function timing one step (rows = 1) or one step's 49 products at rows rows, seconds."""
    layers = [m for b in model.transformer.h for m in (b.attn.c_attn, b.attn.c_proj,
              b.mlp.c_fc, b.mlp.c_proj)] + [model.lm_head]  # fmt: skip
    inputs = [torch.randn(rows, m.weight.shape[1]) for m in layers]
    decoders: dict = {}

    def step(library: ctypes.CDLL, n: int = 20) -> float:
        use(library)
        if library not in decoders:
            decoders[library] = native.NativeDecoder(model)
        decoder = decoders[library]
        cache = KVCache(model.config, 1, 256, "cpu", torch.float32)
        t = time.perf_counter()
        for _ in range(n):
            decoder.step(5, cache)
        return (time.perf_counter() - t) / n

    def products(library: ctypes.CDLL, n: int = 10) -> float:
        use(library)
        t = time.perf_counter()
        with torch.inference_mode():
            for _ in range(n):
                for layer, x in zip(layers, inputs, strict=True):
                    native.native_linear(layer, x)
        return (time.perf_counter() - t) / n

    return step if rows == 1 else products


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="git revision to compare the working tree with")
    p.add_argument("--dtypes", default="float32,bfloat16,int8")
    p.add_argument("--rows", default="1,4,8")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--burst", default=None, metavar="BUSY_US,PERIOD_US",
                   help="another process busy BUSY_US of every PERIOD_US meanwhile")  # fmt: skip
    args = p.parse_args()
    if args.burst:
        busy_us, period_us = (int(v) for v in args.burst.split(","))
        load = multiprocessing.Process(target=burst, args=(busy_us, period_us), daemon=True)
        load.start()
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        base, mine = (
            native.open_library(str(build(root, rev, Path(tmp) / name)))
            for rev, name in ((args.base, "base"), (None, "tree"))
        )
        print(f"{args.base} against the working tree, {torch.get_num_threads()} threads, "
              f"{args.rounds} rounds")  # fmt: skip
        for dtype in args.dtypes.split(","):
            model = model_for(dtype)
            for rows in (int(r) for r in args.rows.split(",")):
                run = timer(model, rows)
                run(base, 3), run(mine, 3)  # warm-up: first calls set up
                times: dict[ctypes.CDLL, list[float]] = {base: [], mine: []}
                for r in range(args.rounds):
                    for library in (base, mine) if r % 2 == 0 else (mine, base):
                        times[library].append(run(library))
                pairs = zip(times[base], times[mine], strict=True)
                ratio = statistics.median(a / b for a, b in pairs)
                what = "step" if rows == 1 else f"products of {rows} rows"
                before, after = (statistics.median(times[k]) * 1e3 for k in (base, mine))
                print(f"{dtype:<9} {what:<22} {before:6.2f} ms -> {after:6.2f} ms: {ratio:.2f}x")


if __name__ == "__main__":
    main()
