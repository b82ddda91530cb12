"""Quality of `--quantize int8` on the decoding path: a trained model's per-token loss on held-out
text, stepped one token at a time as sampling runs it (the native step where it runs), and
greedy agreement with bfloat16, float32 and bfloat16 beside it.

    python benchmarks/bench_int8.py --model out/bpe --data ../shared/data/tinyshakespeare.txt \
        --tokenizer ../shared/tokenizers/gpt2.tiktoken [--tokens 4096] [--new-tokens 200]

The loss: the validation split's first --tokens tokens in windows of the model's context, each
window stepped from its first token through a KV cache (the window's start has less context
than eval's sliding windows, so the figure runs a little above `minigpt2 eval`'s).
"""

from __future__ import annotations

import argparse
import copy
import math

import torch

PRECISIONS = ("float32", "bfloat16", "int8")


def step_nll(gen, tokens: list[int]) -> float:
    """Mean next-token NLL (nats) of tokens, stepped one token at a time in context windows
    (natively where the native decoder runs, as sampling does)."""
    from minigpt2.decode.native import NativeDecoder
    from minigpt2.model.attention import KVCache

    native = NativeDecoder.for_model(gen.model) if gen.use_native else None

    block, total, count = gen.model.config.block_size, 0.0, 0
    for start in range(0, len(tokens) - 1, block):
        window = tokens[start : start + block + 1]
        cache = KVCache(gen.model.config, 1, block, "cpu", gen.dtype)
        for t, target in zip(window[:-1], window[1:], strict=True):
            ids = torch.tensor([[t]])
            if native is not None and native.fits(cache, ids):
                logits = native.step(t, cache)
            else:
                logits = gen.logits(ids, cache)
            total -= torch.log_softmax(logits[0].float(), -1)[target].item()
            count += 1
    return total / count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--prompt", default="ROMEO:\nWhat light")
    args = p.parse_args()
    from minigpt2.data.batches import open_corpus
    from minigpt2.decode.generate import Generator, SamplingConfig
    from minigpt2.decode.kernels import layout_for_inference
    from minigpt2.decode.quantize import quantize_for_decoding
    from minigpt2.formats.loading import load_any, tokenizer_for

    model, header = load_any(args.model, None)
    tok = tokenizer_for(header, args.tokenizer)
    val = open_corpus(args.data, tok).val
    tokens = [int(t) for t in val.window(0, min(len(val), args.tokens + 1))]
    gens = {}
    for name in PRECISIONS:
        m = copy.deepcopy(model).eval()
        if name == "int8":
            m = quantize_for_decoding(m, "int8")
        else:
            m = layout_for_inference(m.to(getattr(torch, name)), sequences=1)
        gens[name] = Generator(m, vocab_limit=tok.vocab_size)
    from minigpt2.decode.native import native_available

    path = "native step" if native_available() else "PyTorch step"
    print(f"{args.model}: {len(tokens) - 1} validation tokens stepped one at a time ({path})")
    with torch.inference_mode():
        nll = {name: step_nll(gen, tokens) for name, gen in gens.items()}
    for name in PRECISIONS:
        change = (math.exp(nll[name]) / math.exp(nll["bfloat16"]) - 1) * 100
        print(f"{name:<9} nll {nll[name]:.4f}  perplexity {math.exp(nll[name]):8.3f}  "
              f"({change:+.2f}% against bfloat16)")  # fmt: skip
    prompt = tok.encode(args.prompt)
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, greedy=True)
    out = {name: gens[name].generate([prompt], cfg)[0] for name in ("bfloat16", "int8")}
    a, b = out["bfloat16"], out["int8"]
    first = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    same = sum(x == y for x, y in zip(a, b, strict=True))
    print(f"greedy from {args.prompt!r}, {len(a)} tokens: int8 equals bfloat16 for the first "
          f"{first}, at {same} of {len(a)} positions")  # fmt: skip
    with torch.inference_mode():  # teacher-forced along bfloat16's own text
        ids = torch.tensor([prompt + a])[:, -gens["int8"].model.config.block_size :]
        picks = {n: gens[n].model(ids)[0, :-1].float().argmax(-1) for n in ("bfloat16", "int8")}
    agree = (picks["bfloat16"] == picks["int8"]).float().mean().item()
    print(f"teacher-forced along bfloat16's text: the same argmax at {agree:.1%} of positions")


if __name__ == "__main__":
    main()
