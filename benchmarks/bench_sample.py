"""Decoding speed on the full gpt2 shape: this project's KV-cached generator against
transformers' generate(), side by side in one process, same random weights, greedy.

    python benchmarks/bench_sample.py [--new-tokens 200] [--prompt-tokens 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

import torch


def bandwidth_gbs() -> float:
    """Streaming-read bandwidth of this machine (sum over a 1 GiB array), GB/s."""
    x = torch.ones(256 * 1024 * 1024)
    x.sum()
    best = min(_timed(x.sum) for _ in range(5))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    import transformers

    from minigpt2 import GPT, GPTConfig
    from minigpt2.generate import Generator, SamplingConfig, layout_for_inference

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(tmp)
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp).eval()
        state = GPT.from_pretrained(tmp).state_dict()
    prompt = torch.randint(0, 50257, (1, args.prompt_tokens))
    n = args.new_tokens
    cfg = SamplingConfig(max_new_tokens=n, greedy=True)
    params = sum(v.numel() for k, v in state.items() if k != "lm_head.weight")
    bw = bandwidth_gbs()
    print(
        f"gpt2 shape, {params:,} parameters; batch 1, {args.prompt_tokens}-token prompt, "
        f"{n} new greedy tokens; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"streaming read bandwidth: {bw:.1f} GB/s")
    for dtype in (torch.float32, torch.bfloat16):
        hf.to(dtype)
        ours = GPT(GPTConfig.preset("gpt2")).eval()  # a fresh copy: decoding layouts are final
        ours.load_state_dict(state)
        gen = Generator(layout_for_inference(ours.to(dtype)))
        bound = bw * 1e9 / (params * torch.finfo(dtype).bits / 8)
        times: dict[str, list[float]] = {"minigpt2": [], "transformers": []}
        tokens = {}
        with torch.inference_mode():
            for _ in range(args.repeats):  # interleaved, so both see the same machine state
                t = time.perf_counter()
                tokens["minigpt2"] = gen.generate([prompt[0].tolist()], cfg)[0]
                times["minigpt2"].append(time.perf_counter() - t)
                t = time.perf_counter()
                out = hf.generate(
                    prompt, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=50256
                )
                times["transformers"].append(time.perf_counter() - t)
                tokens["transformers"] = out[0, args.prompt_tokens :].tolist()
        rates = {k: n / statistics.median(v) for k, v in times.items()}
        same = tokens["minigpt2"] == tokens["transformers"]
        name = str(dtype).removeprefix("torch.")
        ratio = rates["minigpt2"] / rates["transformers"]
        print(
            f"{name}: minigpt2 {rates['minigpt2']:.1f} tok/s, transformers "
            f"{rates['transformers']:.1f} tok/s, ratio {ratio:.2f}x; "
            f"bandwidth bound {bound:.1f} tok/s (minigpt2 at {rates['minigpt2'] / bound:.0%}); "
            f"identical tokens: {same}"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
