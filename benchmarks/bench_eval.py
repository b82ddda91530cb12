"""HellaSwag-format scoring speed: this project's scorer (contexts run once, batched) against
a plain transformers loop (llm.c's: per example, the four context+ending rows padded, one
forward), on the same gpt2-shape random weights, CPU; interleaved, medians.

    python benchmarks/bench_eval.py [--examples 64] [--repeats 3] [--batch-size 8]

Examples have HellaSwag's shape in GPT-2 tokens: a 20-100 token context and four 10-40 token
endings (random ids: speed does not depend on the text). With --lines-task OUT --text FILE
it instead writes a HellaSwag-format JSONL from a text file (context: a line; endings: the
line that follows and three others) for measuring evaluation inside a training run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F


def lines_task(text_path: str, out: str, count: int, seed: int = 0) -> None:
    """A HellaSwag-format file: which line follows this one?"""
    lines = [ln for ln in open(text_path, encoding="utf-8").read().splitlines() if ln.strip()]
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        i = rng.randrange(len(lines) - 1)
        endings = [lines[i + 1]] + rng.sample(lines, 3)
        order = list(range(4))
        rng.shuffle(order)
        rows.append(
            {"ctx": lines[i], "endings": [endings[k] for k in order], "label": order.index(0)}
        )
    with open(out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {count} examples to {out}")


def reference(hf, groups, labels) -> tuple[int, int]:
    """llm.c's loop on transformers: per example one (4, L) forward, losses on the endings."""
    acc = acc_norm = 0
    for (ctx, ends), label in zip(groups, labels, strict=True):
        width = max(len(ctx) + len(e) for e in ends)
        tokens = torch.zeros(len(ends), width, dtype=torch.long)
        mask = torch.zeros(len(ends), width)
        for r, e in enumerate(ends):
            tokens[r, : len(ctx) + len(e)] = torch.tensor(ctx + e)
            mask[r, len(ctx) : len(ctx) + len(e)] = 1
        logits = hf(tokens).logits[:, :-1]
        losses = F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")
        losses = losses * mask[:, 1:]
        total = losses.sum(1)
        acc += int(total.argmin()) == label
        acc_norm += int((total / mask[:, 1:].sum(1)).argmin()) == label
    return acc, acc_norm


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dense", action="store_true", help="keep dense weights (no oneDNN packing)")
    p.add_argument("--lines-task", default=None, help="write a HellaSwag-format file here")
    p.add_argument("--text", default=None, help="the text file --lines-task draws lines from")
    args = p.parse_args()
    if args.lines_task:
        lines_task(args.text, args.lines_task, args.examples)
        return
    import transformers

    from minigpt2 import GPT
    from minigpt2.decode.kernels import layout_for_inference
    from minigpt2.evaluate.scoring import hellaswag_correct

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(tmp)
        hf = transformers.GPT2LMHeadModel.from_pretrained(tmp).eval()
        ours = GPT.from_pretrained(tmp).eval()
    if not args.dense:  # as minigpt2 eval runs it
        layout_for_inference(ours)
    rng = random.Random(1)

    def ids(lo: int, hi: int) -> list[int]:
        return [rng.randrange(50257) for _ in range(rng.randint(lo, hi))]

    groups = [(ids(20, 100), [ids(10, 40) for _ in range(4)]) for _ in range(args.examples)]
    labels = [rng.randrange(4) for _ in groups]
    weights = "dense" if args.dense else "packed"
    print(
        f"gpt2 shape, float32, {args.examples} examples (contexts 20-100 tokens, endings 10-40), "
        f"batch {args.batch_size}, {weights} weights; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )
    times: dict[str, list[float]] = {"minigpt2": [], "transformers loop": []}
    results = {}
    with torch.inference_mode():
        for _ in range(args.repeats):  # interleaved, so both see the same machine state
            t = time.perf_counter()
            results["minigpt2"] = hellaswag_correct(ours, groups, labels, args.batch_size)
            times["minigpt2"].append(time.perf_counter() - t)
            t = time.perf_counter()
            results["transformers loop"] = reference(hf, groups, labels)
            times["transformers loop"].append(time.perf_counter() - t)
    rates = {k: args.examples / statistics.median(v) for k, v in times.items()}
    for k, rate in rates.items():
        print(f"{k}: {rate:.2f} examples/s (acc, acc_norm counts {results[k]})")
    print(
        f"ratio {rates['minigpt2'] / rates['transformers loop']:.2f}x; same predictions: "
        f"{results['minigpt2'] == results['transformers loop']}"
    )


if __name__ == "__main__":
    main()
