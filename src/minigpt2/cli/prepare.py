"""`minigpt2 prepare SOURCE ...`: tokenise a corpus into the shard cache training reads."""

from __future__ import annotations

import argparse
import json

from ..data.corpus import META, prepare
from ..data.sources import DECODE_ERRORS
from ..data.tokenizer import get_tokenizer


def parser() -> argparse.ArgumentParser:
    """The command's options."""
    p = argparse.ArgumentParser(
        prog="minigpt2 prepare",
        description="Tokenise a corpus into cached token shards (what train --data reads).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("source", help="text file, directory, glob, stdlib or hf:NAME[:CONFIG]")
    p.add_argument("--tokenizer", default="gpt2", help="byte, gpt2 or path/to/gpt2.tiktoken")
    p.add_argument(
        "--out-dir", default=None, help="cache directory (None: $MINIGPT2_DATA_CACHE or ~/.cache)"
    )
    p.add_argument("--val-fraction", type=float, default=0.1, help="share held out")
    p.add_argument(
        "--decode-errors",
        choices=DECODE_ERRORS,
        default="strict",
        help="invalid UTF-8 in a file: stop, or read it as U+FFFD",
    )
    p.add_argument("--hf-split", default="train", help="split of an hf: dataset")
    p.add_argument("--text-column", default="text", help="text column of an hf: dataset")
    return p


def prepare_main(argv: list[str]) -> int:
    """Prepare a corpus and print where it went and how many tokens it holds."""

    args = parser().parse_args(argv)
    out = prepare(
        args.source,
        get_tokenizer(args.tokenizer),
        cache_dir=args.out_dir,
        val_fraction=args.val_fraction,
        decode_errors=args.decode_errors,
        hf_split=args.hf_split,
        text_column=args.text_column,
    )
    meta = json.loads((out / META).read_text())
    print(
        f"{out}\n{meta['train_tokens']:,} train and {meta['val_tokens']:,} validation tokens "
        f"({meta['tokenizer']}, {meta['documents']:,} documents)"
    )
    return 0
