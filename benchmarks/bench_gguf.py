"""Our GGUF under llama.cpp: greedy text from llama.cpp's `llama-simple` against this project's.

    python benchmarks/bench_gguf.py MODEL --llama-cpp BIN_DIR [--tokenizer PATH/gpt2.tiktoken]

MODEL is anything `minigpt2 sample --model` takes; BIN_DIR holds llama.cpp's `llama-simple`
(../shared/tools/llama-cpp-anchor.sh builds it into ~/.cache/llama-cpp-anchor/.../build/bin).
Writes MODEL as GGUF (f32, and each --outtypes), runs llama.cpp greedy on the prompt, and prints
both continuations and whether they are identical.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from minigpt2.decode.generate import Generator, SamplingConfig
from minigpt2.formats.gguf import write_gguf
from minigpt2.formats.loading import load_any, tokenizer_for


def llama_greedy(binary: Path, gguf: Path, prompt: str, n: int) -> str:
    """llama-simple's greedy continuation (it prints the prompt, then the new text)."""
    out = subprocess.run(
        [str(binary), "-m", str(gguf), "-n", str(n), prompt],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.removeprefix(prompt).rstrip("\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--llama-cpp", required=True, help="directory holding llama-simple")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--prompt", default="ROMEO:\nWhat light")
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--outtypes", default="f32,q8_0")
    args = p.parse_args()
    model, header = load_any(args.model)
    tok = tokenizer_for(header, args.tokenizer)
    ids = tok.encode(args.prompt)
    cfg = SamplingConfig(max_new_tokens=args.new_tokens, greedy=True)
    ours = tok.decode(Generator(model.eval(), vocab_limit=tok.vocab_size).generate([ids], cfg)[0])
    print(f"minigpt2 greedy ({args.new_tokens} tokens):\n{args.prompt}{ours}\n")
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in args.outtypes.split(","):
            path = Path(tmp) / f"model-{outtype}.gguf"
            write_gguf(model, path, tok, outtype)
            theirs = llama_greedy(
                Path(args.llama_cpp) / "llama-simple", path, args.prompt, args.new_tokens
            )
            if theirs == ours:
                print(f"llama.cpp greedy on our {outtype} GGUF: identical to minigpt2's")
                continue
            k = next(
                (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), len(ours)
            )
            print(
                f"llama.cpp greedy on our {outtype} GGUF: the same for the first {k} of "
                f"{len(ours)} characters, then:\n{args.prompt}{theirs}\n"
            )


if __name__ == "__main__":
    main()
