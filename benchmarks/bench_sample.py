"""Decoding speed on the full gpt2 shape: this project, transformers' generate() and llama.cpp,
side by side, interleaved, same random weights, greedy, batch 1.

    python benchmarks/bench_sample.py [--new-tokens 200] [--prompt-tokens 16] [--repeats 3] \
        [--llama-cpp BIN_DIR --tokenizer PATH/gpt2.tiktoken] [--busy N] [--rows float32,...] \
        [--no-transformers]

--busy N runs N other processes, each busy on one core, for the whole timing: the cores are
shared, as in a server beside its HTTP threads or a machine doing other work.

Each repeat runs every engine once per row, who goes first alternating; the ratio to
llama.cpp is the median of each repeat's back-to-back pair (with their range), which the
machine's drift moves less than a ratio of medians.

Rows: float32, bfloat16, and 8-bit weights (this project's `--quantize int8` against llama.cpp's
Q8_0; transformers has no CPU int8 path of its own). llama.cpp runs `llama-bench` (token
generation only, its prompt is not timed) on GGUF files this project writes (`minigpt2 export
... .gguf`), so all three read the same weights. Effective GB/s = weight bytes read per token
(the 48 block matrices and the head) x tokens per second.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROWS = ("float32", "bfloat16", "int8")
LLAMA_TYPES = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0"}
BYTES = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0, "q8_0": 34 / 32}  # per matrix weight


def llama_rate(binary: Path, gguf: Path, n: int) -> float:
    """llama-bench's token-generation rate (tok/s) for n tokens, one run."""
    out = subprocess.run(
        [str(binary), "-m", str(gguf), "-p", "0", "-n", str(n), "-t", str(torch.get_num_threads()),
         "-r", "1", "-o", "json"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    return float(json.loads(out)[0]["avg_ts"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--llama-cpp", default=None, help="directory holding llama-bench")
    p.add_argument("--tokenizer", default=None, help="gpt2.tiktoken, for the GGUF vocabulary")
    p.add_argument("--no-transformers", action="store_true", help="time only ours and llama.cpp")
    p.add_argument("--busy", type=int, default=0, help="processes kept busy on a core meanwhile")
    p.add_argument("--rows", default=",".join(ROWS), help="which of " + ", ".join(ROWS))
    args = p.parse_args()
    rows = [r for r in ROWS if r in args.rows.split(",")]
    import transformers

    from minigpt2 import GPT, GPTConfig
    from minigpt2.decode.generate import Generator, SamplingConfig
    from minigpt2.decode.kernels import layout_for_inference
    from minigpt2.decode.quantize import quantize_for_decoding

    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(tmp.name)
    state = GPT.from_pretrained(tmp.name).state_dict()
    hf = {
        d: transformers.GPT2LMHeadModel.from_pretrained(tmp.name, dtype=getattr(torch, d)).eval()
        for d in ("float32", "bfloat16")
        if d in rows and not args.no_transformers
    }
    gens = {}
    for row in rows:
        model = GPT(GPTConfig.preset("gpt2")).eval()
        model.load_state_dict(state)
        if row == "int8":
            model = quantize_for_decoding(model, "int8")
        else:
            model = layout_for_inference(model.to(getattr(torch, row)), sequences=1)
        gens[row] = Generator(model)
    gguf = {}
    if args.llama_cpp:
        from minigpt2.data.tokenizer import get_tokenizer
        from minigpt2.formats.gguf import write_gguf

        tok = get_tokenizer(args.tokenizer or "gpt2")
        source = GPT(GPTConfig.preset("gpt2"))
        source.load_state_dict(state)
        for row in rows:
            kind = LLAMA_TYPES[row]
            gguf[row] = Path(tmp.name) / f"gpt2-{kind}.gguf"
            write_gguf(source, gguf[row], tok, kind)
    prompt = torch.randint(0, 50257, (1, args.prompt_tokens))
    n = args.new_tokens
    cfg = SamplingConfig(max_new_tokens=n, greedy=True)
    matrices = sum(v.numel() for k, v in state.items() if v.dim() == 2 and "transformer.w" not in k)
    print(
        f"gpt2 shape, {matrices:,} matrix weights read per token; batch 1, {args.prompt_tokens}-"
        f"token prompt, {n} new greedy tokens; torch {torch.__version__}, transformers "
        f"{transformers.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats, "
        f"{args.busy} busy processes beside"
    )
    rates: dict[tuple[str, str], list[float]] = {}
    tokens = {}

    def ours(row: str) -> None:
        t = time.perf_counter()
        tokens[("minigpt2", row)] = gens[row].generate([prompt[0].tolist()], cfg)[0]
        rates.setdefault(("minigpt2", row), []).append(n / (time.perf_counter() - t))

    def theirs(row: str) -> None:
        if row in hf:
            t = time.perf_counter()
            out = hf[row].generate(prompt, do_sample=False, max_new_tokens=n,
                                   min_new_tokens=n, pad_token_id=50256)  # fmt: skip
            rates.setdefault(("transformers", row), []).append(n / (time.perf_counter() - t))
            tokens[("transformers", row)] = out[0, args.prompt_tokens :].tolist()
        if row in gguf:
            rate = llama_rate(Path(args.llama_cpp) / "llama-bench", gguf[row], n)
            rates.setdefault(("llama.cpp", row), []).append(rate)

    # a shell loop: one core's worth of work each, no memory traffic
    busy = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(args.busy)]
    try:
        timed(rows, args.repeats, gens, hf, prompt, ours, theirs)
    finally:
        for proc in busy:
            proc.kill()
    report(rows, rates, tokens, matrices)
    sys.stdout.flush()
    tmp.cleanup()


def timed(rows, repeats, gens, hf, prompt, ours, theirs) -> None:
    """Warm every engine up, then time them interleaved, who goes first alternating."""
    from minigpt2.decode.generate import SamplingConfig

    with torch.inference_mode():
        for row in rows:  # warm-up, as llama-bench does its own: first-call set-up is not timed
            gens[row].generate([prompt[0].tolist()], SamplingConfig(max_new_tokens=8, greedy=True))
            if row in hf:
                hf[row].generate(prompt, do_sample=False, max_new_tokens=8, pad_token_id=50256)
        for r in range(repeats):  # interleaved: every engine sees the same machine state
            for row in rows:  # who goes first alternates, so that drift favours no one
                for run in (ours, theirs) if r % 2 == 0 else (theirs, ours):
                    run(row)


def report(rows, rates, tokens, matrices) -> None:
    """One line per row: rates, effective GB/s, ratios, and whether greedy tokens agree."""
    for row in rows:
        mine = rates[("minigpt2", row)]
        ours_rate = statistics.median(mine)
        gbs = ours_rate * matrices * BYTES[row] / 1e9
        line = f"{row:<9} minigpt2 {ours_rate:6.1f} tok/s ({gbs:4.1f} GB/s)"
        if ("transformers", row) in rates:
            other = statistics.median(rates[("transformers", row)])
            same = tokens[("minigpt2", row)] == tokens[("transformers", row)]
            line += f" | transformers {other:6.1f} ({ours_rate / other:.2f}x, same tokens: {same})"
        if ("llama.cpp", row) in rates:
            llama = rates[("llama.cpp", row)]
            kind = LLAMA_TYPES[row]
            rate = statistics.median(llama)
            gbs = rate * matrices * BYTES["q8_0" if kind == "q8_0" else row] / 1e9
            # each repeat's pair ran back to back: their ratios cancel the machine's drift
            pairs = sorted(a / b for a, b in zip(mine, llama, strict=True))
            ratio = statistics.median(pairs)
            line += (
                f" | llama.cpp {kind} {rate:6.1f} ({gbs:4.1f} GB/s): {ratio:.2f}x"
                f" (pairs {pairs[0]:.2f}-{pairs[-1]:.2f})"
            )
        print(line)
    if ("minigpt2", "int8") in tokens and ("minigpt2", "bfloat16") in tokens:
        a, b = tokens[("minigpt2", "int8")], tokens[("minigpt2", "bfloat16")]
        agree = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
        print(f"int8 greedy tokens equal bfloat16's for the first {agree} of {len(a)}")


if __name__ == "__main__":
    main()
