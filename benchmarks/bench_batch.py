"""Batched decoding: 8 prompts of different lengths as one left-padded batch against the same
8 prompts one by one, gpt2 shape, random weights, greedy; runs interleaved, medians.

    python benchmarks/bench_batch.py [--new-tokens 100] [--repeats 3] [--dtype float32|int8|...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

PROMPT_LENGTHS = (5, 9, 17, 26, 38, 51, 73, 100)  # tokens


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "int8"))
    args = p.parse_args()
    from minigpt2 import GPT, GPTConfig
    from minigpt2.decode.generate import Generator, SamplingConfig
    from minigpt2.decode.kernels import layout_for_inference

    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("gpt2")).eval()
    if args.dtype == "int8":  # --quantize int8
        from minigpt2.decode.quantize import quantize_for_decoding

        gen = Generator(quantize_for_decoding(model, "int8"))
    else:
        gen = Generator(
            layout_for_inference(
                model.to(getattr(torch, args.dtype)), sequences=len(PROMPT_LENGTHS)
            )
        )
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50257, (n,), generator=g).tolist() for n in PROMPT_LENGTHS]
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, greedy=True)
    total = len(prompts) * args.new_tokens
    print(
        f"gpt2 shape, {args.dtype}, {len(prompts)} prompts of {PROMPT_LENGTHS} tokens, "
        f"{args.new_tokens} new greedy tokens each; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    times: dict[str, list[float]] = {"batched": [], "one by one": []}
    outputs = {}
    for _ in range(args.repeats):  # interleaved, so both see the same machine state
        t = time.perf_counter()
        outputs["batched"] = gen.generate(prompts, cfg)
        times["batched"].append(time.perf_counter() - t)
        t = time.perf_counter()
        outputs["one by one"] = [gen.generate([q], cfg)[0] for q in prompts]
        times["one by one"].append(time.perf_counter() - t)
    rates = {k: total / statistics.median(v) for k, v in times.items()}
    for k, rate in rates.items():
        median = statistics.median(times[k])
        print(f"{k}: {rate:.1f} tokens/s (median of {args.repeats}: {median:.2f} s)")
    same = outputs["batched"] == outputs["one by one"]
    print(f"ratio {rates['batched'] / rates['one by one']:.2f}x; identical tokens: {same}")


if __name__ == "__main__":
    main()
