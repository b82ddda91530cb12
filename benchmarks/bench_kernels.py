"""The matrix-vector products of one gpt2 decode step, per kernel: GB/s of weights read.

    python benchmarks/bench_kernels.py [--rows 1] [--repeats 20] [--per-shape]

One decode step of the gpt2 shape multiplies one row by 49 weight matrices (12 blocks x 4, and
the 50257 x 768 head). Each kernel runs all 49 back to back; the median over repeats gives the
step's matrix time, its weight bytes over that time the effective bandwidth, and 1 / time the
tokens per second the products alone would allow. --per-shape also splits each kernel's step
by matrix shape (each call timed where it runs in the step, its weights cold).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12 + [(50257, 768)]  # (out, in)


def timed(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def kernels(rows: int):
    """(name, weight bytes per element, make(weight) -> fn(x), input dtype)."""
    from minigpt2.decode.kernels import PackedLinear
    from minigpt2.decode.native import NativeLinear, native_available
    from minigpt2.decode.quantize import Int8Linear

    def dense(w):
        return lambda x: F.linear(x, w)

    def no_onednn(w):
        def run(x):
            with torch.backends.mkldnn.flags(enabled=False):
                return F.linear(x, w)

        return run

    def packed(w):
        return PackedLinear(w, None)

    def int8pack(w):
        layer = Int8Linear(w, None)
        return lambda x: torch.ops.aten._weight_int8pack_mm(x, layer.weight, layer.scales)

    def native(w):
        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        layer.weight = torch.nn.Parameter(w, requires_grad=False)
        layer.__class__ = NativeLinear
        return layer

    out = [
        ("float32 F.linear", torch.float32, dense),
        ("float32 oneDNN packed", torch.float32, packed),
        ("bfloat16 F.linear (oneDNN)", torch.bfloat16, dense),
        ("bfloat16 F.linear, oneDNN off (ATen)", torch.bfloat16, no_onednn),
        ("int8 weights, _weight_int8pack_mm", torch.int8, int8pack),
    ]
    if native_available() and rows <= NativeLinear.ROWS:
        out += [
            ("float32 native", torch.float32, native),
            ("bfloat16 native", torch.bfloat16, native),
            ("int8 weights, native", torch.int8, lambda w: Int8Linear(w, None)),
        ]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--per-shape", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    weights = [torch.randn(o, i) * 0.02 for o, i in SHAPES]
    print(f"{len(SHAPES)} products of {args.rows} row(s), {torch.get_num_threads()} threads")
    with torch.inference_mode():
        for name, dtype, make in kernels(args.rows):
            wdtype = torch.bfloat16 if dtype is torch.int8 else dtype
            fns = [make(w.to(wdtype)) for w in weights]
            xdtype = torch.bfloat16 if dtype is torch.int8 else dtype
            xs = [torch.randn(args.rows, i, dtype=xdtype) for _, i in SHAPES]

            calls: list[list[float]] = [[] for _ in SHAPES]

            def step(fns=fns, xs=xs, calls=calls):
                for f, x, times in zip(fns, xs, calls, strict=True):
                    t = time.perf_counter()
                    f(x)
                    times.append(time.perf_counter() - t)

            seconds = timed(step, args.repeats)
            size = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 1
            gb = sum(o * i for o, i in SHAPES) * size / 1e9
            print(
                f"{name:<40} {seconds * 1e3:6.2f} ms  {gb / seconds:5.1f} GB/s  "
                f"{1 / seconds:6.1f} tok/s of products"
            )
            for shape in dict.fromkeys(SHAPES) if args.per_shape else ():
                mine = [
                    statistics.median(c) for c, s in zip(calls, SHAPES, strict=True) if s == shape
                ]
                each = statistics.median(mine)
                print(f"    {shape[0]:>5} x {shape[1]:<5} {each * 1e6:8.1f} us  "
                      f"{shape[0] * shape[1] * size / each / 1e9:5.1f} GB/s")  # fmt: skip


if __name__ == "__main__":
    main()
