"""Corpus preparation speed: minigpt2's prepare() (batch encoding on every core, streamed to
shards) against plain single-process tiktoken encode_ordinary over the same text.

    python benchmarks/bench_data.py --tokenizer ../shared/tokenizers/gpt2.tiktoken \
        --source ../shared/data/tinyshakespeare.txt --source stdlib

Each measurement runs in a fresh process, which reports its own time and peak memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time


def worker(mode: str, source: str, tokenizer: str) -> dict:
    from minigpt2.data.corpus import prepare
    from minigpt2.data.sources import iter_documents, resolve_source
    from minigpt2.data.tokenizer import get_tokenizer

    tok = get_tokenizer(tokenizer)

    def once() -> tuple[int, float]:
        t0 = time.perf_counter()
        if mode == "minigpt2":
            with tempfile.TemporaryDirectory() as cache:
                out = prepare(source, tok, cache_dir=cache, progress=False)
                tokens = json.loads((out / "meta.json").read_text())["total_tokens"]
        else:  # one encode_ordinary call per document, one process, one thread
            tokens = 0
            for path in resolve_source(source).files:
                tokens += len(tok.encoding.encode_ordinary(path.read_text(encoding="utf-8"))) + 1
        return tokens, time.perf_counter() - t0

    tokens, cold = once()  # a fresh process: each encoding thread warms up its regex state
    _, warm = once()  # the same again, as for every batch after the first of a big corpus
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    chars = sum(len(t) for t, _ in iter_documents(resolve_source(source)))
    return {"tokens": tokens, "cold": cold, "warm": warm, "chars": chars, "peak_mib": peak_mib}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--source", action="append", required=True)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.tokenizer)))
        return
    for source in args.source:
        results: dict[str, list[dict]] = {"minigpt2": [], "tiktoken": []}
        for _ in range(args.repeats):
            for mode in results:
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--tokenizer",
                        args.tokenizer,
                        "--source",
                        source,
                        "--worker",
                        mode,
                        source,
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                results[mode].append(json.loads(out.stdout))
        for mode, rows in results.items():
            cold = sorted(r["cold"] for r in rows)[len(rows) // 2]
            warm = sorted(r["warm"] for r in rows)[len(rows) // 2]
            r = rows[0]
            print(
                f"{source} [{mode}]: {r['tokens']:,} tokens from {r['chars']:,} chars; "
                f"fresh process {cold:.2f} s = {r['tokens'] / cold:,.0f} tokens/s, warm "
                f"{warm:.2f} s = {r['tokens'] / warm:,.0f} tokens/s (medians of {len(rows)}); "
                f"peak RSS {max(x['peak_mib'] for x in rows):.0f} MiB"
            )


if __name__ == "__main__":
    main()
