"""The commands that measure a model: `minigpt2 eval` and `minigpt2 lm-eval`."""

from __future__ import annotations

import argparse
import json
import math
import sys

import numpy as np
from tqdm import tqdm

from ..data.batches import open_corpus
from ..data.labels import read_labelled, tokenize_labelled
from ..data.sources import DECODE_ERRORS
from ..errors import MiniGPT2Error
from ..evaluate.classify import check_classifier, classification_scores
from ..evaluate.scoring import hellaswag, perplexity, perplexity_windows, read_hellaswag
from .options import add_model_options, load_for_generation

TASKS = ("perplexity", "hellaswag", "classification")
HELLASWAG_HF = "hf:Rowan/hellaswag"


def parser() -> argparse.ArgumentParser:
    """The command's options."""
    p = argparse.ArgumentParser(
        prog="minigpt2 eval",
        description="Measure a model: sliding-window perplexity of a text, or HellaSwag.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_options(p, None)
    p.add_argument("--task", required=True, help=f"{' or '.join(TASKS)}")
    p.add_argument(
        "--data",
        default=None,
        help="perplexity: a file, directory, glob, stdlib, hf:NAME or prepared directory; "
        f"hellaswag: a JSONL file in the original format (default: {HELLASWAG_HF}); "
        "classification: a .jsonl, .json or .csv file of text and label"
        "%(default).0s",  # names the default itself: argparse would add "(default: None)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--stride", type=int, default=None, help="tokens between windows (None: half the context)"
    )
    p.add_argument("--split", default="all", help="all, or val: a corpus' validation split")
    p.add_argument("--limit", type=int, default=None, help="the first N examples or records")
    p.add_argument("--batch-size", type=int, default=8, help="contexts scored together")
    p.add_argument("--data-cache", default=None, help="where prepared corpora are cached")
    p.add_argument("--hf-split", default="train", help="split of an hf: corpus")
    p.add_argument("--text-column", default="text", help="text column of an hf: corpus")
    p.add_argument(
        "--decode-errors",
        default="strict",
        choices=DECODE_ERRORS,
        help="invalid UTF-8 in the text: an error, or replacement characters",
    )
    return p


def eval_main(argv: list[str]) -> int:
    """`minigpt2 eval --model M --task T ...`: a table, or one JSON object."""

    args = parser().parse_args(argv)
    if args.task not in TASKS:
        raise MiniGPT2Error(f"unknown task {args.task!r}; tasks: {', '.join(TASKS)}")
    if args.split not in ("all", "val"):
        raise MiniGPT2Error(f"--split={args.split!r}; use all or val")
    for name in ("batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise MiniGPT2Error(f"--{name.replace('_', '-')}={value} must be at least 1")
    if args.task in ("perplexity", "classification") and not args.data:
        raise MiniGPT2Error(f"--task {args.task} needs --data (a file of text, or of records)")
    model, _, tok = load_for_generation(args, sequences=0)  # scoring: hundreds of rows
    run = {"perplexity": _perplexity, "hellaswag": _hellaswag}.get(args.task, _classification)
    result = {"task": args.task, "model": args.model, **run(model, tok, args)}
    if args.json:
        print(json.dumps(result))
    else:
        print("\n".join(f"{k:<16} {_shown(v)}" for k, v in result.items()))
    return 0


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _bar(total: int, unit: str):
    # disable=None: no bar when stderr is no terminal (a log file would fill with redraws)
    return tqdm(
        total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, desc="scoring", disable=None
    )


def _perplexity(model, tok, args) -> dict:
    """Tokens, mean NLL, perplexity and bits per byte of the text under sliding windows."""

    data = open_corpus(
        args.data,
        tok,
        cache_dir=args.data_cache,
        hf_split=args.hf_split,
        text_column=args.text_column,
        decode_errors=args.decode_errors,
        progress=True,
    )
    parts = [data.val] if args.split == "val" else [data.train, data.val]
    tokens = np.concatenate([p.window(0, len(p)) for p in parts if len(p)] or [np.zeros(0, int)])
    stride = args.stride if args.stride is not None else model.config.block_size // 2
    windows = perplexity_windows(len(tokens), model.config.block_size, stride)  # checks first
    with _bar(len(windows), "window") as bar:
        result = perplexity(model, tokens.astype(np.int64), stride, args.batch_size, bar.update)
    text_bytes = len(tok.decode_bytes([int(t) for t in tokens if t != tok.eot_id]))
    return {
        "data": args.data,
        "split": args.split,
        "stride": stride,
        "context": model.config.block_size,
        "tokens": result["tokens"],
        "nll": result["nll"],
        "perplexity": result["perplexity"],
        "bits_per_byte": result["nll_sum"] / math.log(2) / max(text_bytes, 1),
    }


def _hellaswag(model, tok, args) -> dict:
    """Examples, acc and acc_norm (fractions), llm.c's way."""
    data = args.data or HELLASWAG_HF
    examples = read_hellaswag(data, args.limit)
    with _bar(len(examples), "example") as bar:
        result = hellaswag(model, tok, examples, args.batch_size, bar.update)
    return {"data": data, **result}


def _classification(model, tok, args) -> dict:
    """Examples, accuracy and mean cross-entropy of a classifier on labelled records."""
    names = check_classifier(model, args.model)
    records, source = read_labelled(args.data, args.hf_split)
    if args.limit:
        records = records[: args.limit]
    _, data = tokenize_labelled(records, tok, names, 0, source)
    return {
        "data": args.data,
        **classification_scores(model, data.ids, data.labels, args.batch_size),
    }


def lm_eval_main(argv: list[str]) -> int:
    """`minigpt2 lm-eval --model_args pretrained=M --tasks ...`: the harness's own
    command line with the model set to minigpt2; every other option is the harness's."""
    if any(a == "--model" or a.startswith("--model=") for a in argv):
        raise MiniGPT2Error("the model is minigpt2: give yours as --model_args pretrained=PATH")

    # here for start-up time: importing lm-eval takes seconds, wanted by this command only
    from ..evaluate.harness import run_harness_cli

    run_harness_cli(["run", "--model", "minigpt2", *argv])
    return 0
