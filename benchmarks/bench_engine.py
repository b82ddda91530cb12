"""The serving engine without HTTP: N prompts decoded together, with float32 products of more
than 2 rows in oneDNN's packed copies (what `minigpt2 serve` does) or in native.c's tiles,
alternated round by round, on the gpt2 shape with random weights:

    python benchmarks/bench_engine.py [--rows 4,8,16] [--rounds 2] [--dtype D] [--skip-engine]

Per N and way: generated tokens per second over the wall time (all N prompts of 16-128 random
tokens submitted at once, 128 greedy tokens each), and the seconds spent in prompts (join) and
in steps. Also the 48 block products of one step alone, each matrix cold, at 4, 8 and 16 rows;
with --profile, torch.profiler's table of 10 steps of the largest N (ops by their own time;
native.c's products, called through ctypes, are not in it). Then, at --dtype, one decode
step of N slots three ways: in torch with its SDPA attention, in torch with native.c's slot
attention, and whole in native.c (`--skip-engine`: those alone).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from minigpt2.decode.generate import SamplingConfig
from minigpt2.decode.kernels import PackedLinear, layout_for_inference, pack_beside_native
from minigpt2.decode.native import (
    NativeDecoder,
    NativeLinear,
    native_linear,
    slots_attention,
)
from minigpt2.decode.quantize import quantize_for_decoding
from minigpt2.formats.released import load_pretrained
from minigpt2.serve.engine import Engine, Job


def write_gpt2(root: Path) -> Path:
    """The gpt2 shape (256 positions), random weights as transformers draws them."""
    import transformers

    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=256)).save_pretrained(root)
    return root


def gpt2(root: Path, dtype: str = "float32"):
    """The model laid out as `minigpt2 serve` lays it out, in dtype (or int8)."""
    model = load_pretrained(root).eval()
    if dtype == "int8":
        return quantize_for_decoding(model, "int8")
    return layout_for_inference(model.to(getattr(torch, dtype)), sequences=1)


def engine_run(model, rows: int, packed: bool) -> dict:
    """One engine over rows prompts at once; packed=False drops the engine's packed copies."""
    engine = Engine(model, 50257, rows, 64, own_thread=False)
    for module in model.modules():
        if not packed:
            module.__dict__.pop("packed", None)
        if isinstance(module, NativeLinear) and not packed:
            module.rows = rows  # native.c up to the batch, as the engine did before the copies
    spent = {"join": 0.0, "step": 0.0}
    for name in spent:
        inner = getattr(engine, f"_{name}")

        def timed(*args, inner=inner, name=name):
            t = time.perf_counter()
            inner(*args)
            spent[name] += time.perf_counter() - t

        setattr(engine, f"_{name}", timed)
    rng, done = random.Random(0), []
    cfg = SamplingConfig(max_new_tokens=128, greedy=True).check()
    prompts = [[rng.randrange(50000) for _ in range(rng.randint(16, 128))] for _ in range(rows)]
    jobs = [Job(p, cfg, lambda e: e.finish and done.append(e.finish)) for p in prompts]

    def stop_when_done() -> None:
        while len(done) < rows:
            time.sleep(0.005)
        engine.shutdown(wait=False)

    t0 = time.perf_counter()
    engine.submit(jobs)
    threading.Thread(target=stop_when_done).start()
    engine.run()
    wall = time.perf_counter() - t0
    return {"tok_s": rows * 128 / wall, **{k: round(v, 2) for k, v in spent.items()}}


def products(model, rows: int) -> dict[str, float]:
    """Milliseconds of the 48 block products at rows rows: native.c against packed copies."""
    layers = [m for m in model.transformer.h.modules() if isinstance(m, NativeLinear)]
    inputs = [torch.randn(rows, m.in_features) for m in layers]
    packed = [PackedLinear(m.weight, m.bias) for m in layers]
    times: dict[str, list[float]] = {"native": [], "packed": []}
    with torch.inference_mode():
        for _ in range(7):
            for name in times:
                t = time.perf_counter()
                for m, p, x in zip(layers, packed, inputs, strict=True):
                    native_linear(m, x) if name == "native" else p(x)
                times[name].append(time.perf_counter() - t)
    return {k: round(1e3 * statistics.median(v[1:]), 1) for k, v in times.items()}


def filled_slots(model, rows: int, dtype: torch.dtype):
    """A slot cache of rows slots, each holding a prompt of 16-128 random tokens."""
    from minigpt2.model.attention import KVCache

    rng = random.Random(0)
    cache = KVCache.slots(model.config, rows, model.config.block_size, "cpu", dtype)
    with torch.inference_mode():
        for i in range(rows):
            alone = cache.row(i)
            prompt = torch.tensor([[rng.randrange(50000) for _ in range(rng.randint(16, 128))]])
            model.hidden_states(prompt, alone)
            cache.lengths[i], cache.live[i] = alone.pos, True
    return cache


def attention_steps(model, rows: int, rounds: int = 12) -> dict[str, float]:
    """Milliseconds of a decode step of rows slots (prompts of 16-128 tokens, packed copies as
    the engine had them): in torch with its SDPA attention, in torch with native.c's slot
    attention, and the whole step in native.c (NativeDecoder.step_slots), alternated step by
    step, each from the same cache lengths."""
    pack_beside_native(model)
    cache = filled_slots(model, rows, model.transformer.wte.weight.dtype)
    decoder, slots = NativeDecoder(model), list(range(rows))
    ways = {"torch": None, "native attention": slots_attention(cache), "native step": None}
    times: dict[str, list[float]] = {way: [] for way in ways}
    with torch.inference_mode():
        lengths, idx = cache.lengths.clone(), torch.randint(0, 50000, (rows, 1))
        for r in range(rounds + 1):  # the first round warms up
            for way, attend in ways.items():
                cache.attend = attend
                cache.lengths.copy_(lengths)
                t = time.perf_counter()
                if way == "native step":
                    decoder.step_slots(idx[:, 0].tolist(), slots, cache)
                else:
                    model.lm_head(model.hidden_states(idx, cache)[:, -1])
                if r:
                    times[way].append(time.perf_counter() - t)
    return {way: round(1e3 * statistics.median(v), 1) for way, v in times.items()}


def profile_steps(model, rows: int) -> str:
    """torch.profiler's table over 10 decode steps of rows slots holding prompts of 16-128."""
    cache = filled_slots(model, rows, torch.float32)
    with torch.inference_mode():
        idx = torch.randint(0, 50000, (rows, 1))
        model.hidden_states(idx, cache)  # warm up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(10):
                model.hidden_states(idx, cache)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="4,8,16")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="also torch.profiler's step table")
    p.add_argument("--dtype", default="float32", help="of the attention steps: or bfloat16, int8")
    p.add_argument("--skip-engine", action="store_true", help="the attention steps only")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    counts = [int(n) for n in args.rows.split(",")]
    out: dict = {"engine": {}, "products_ms": {}, "attention_step_ms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = write_gpt2(Path(tmp) / "m")
        for _ in range(0 if args.skip_engine else args.rounds):
            for rows in counts:
                for packed in (False, True):
                    model = gpt2(root)
                    result = engine_run(model, rows, packed)
                    way = "packed" if packed else "native"
                    out["engine"].setdefault(f"{rows} {way}", []).append(result)
                    print(rows, way, result, file=sys.stderr)
        model = gpt2(root)
        for rows in counts if not args.skip_engine else []:
            out["products_ms"][rows] = products(model, rows)
        for rows in counts:
            out["attention_step_ms"][rows] = attention_steps(gpt2(root, args.dtype), rows)
        if args.profile:
            print(profile_steps(model, max(counts)), file=sys.stderr)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
