"""`minigpt2 classify --model M --text "..."`: a classifier's label and class probabilities."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..data.records import read_field, read_lines
from ..errors import MiniGPT2Error
from ..evaluate.classify import check_classifier, class_logits
from .options import add_model_options, load_for_generation


def parser() -> argparse.ArgumentParser:
    """The command's options."""
    p = argparse.ArgumentParser(
        prog="minigpt2 classify",
        description="Classify texts with a model trained with --task=classification.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_options(p, None)
    p.add_argument("--text", action="append", default=[], help="a text (repeat for more)")
    p.add_argument("--file", default=None, help="texts: .txt, one a line, or .jsonl with 'text'")
    p.add_argument("--json", action="store_true", help="one JSON object a text")
    p.add_argument("--batch-size", type=int, default=16, help="texts scored together")
    return p


def read_texts(path: str) -> list[str]:
    """The texts of --file: a .txt file's non-empty lines, or a .jsonl file's 'text' fields."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise MiniGPT2Error(f"--file {path} not found")
    if file.suffix.lower() in (".jsonl", ".json"):
        return read_field(file, "text", "texts")
    return read_lines(file, "texts")


def classify_main(argv: list[str]) -> int:
    """Print each text's label and class probabilities (a line, or JSON with --json)."""
    args = parser().parse_args(argv)
    texts = list(args.text) + (read_texts(args.file) if args.file else [])
    if not texts:
        raise MiniGPT2Error('nothing to classify: pass --text "..." or --file FILE')
    if args.batch_size < 1:
        raise MiniGPT2Error(f"--batch-size={args.batch_size} must be at least 1")
    model, _, tok = load_for_generation(args, sequences=0)
    labels = check_classifier(model, args.model)
    ids = tok.encode_batch(texts)
    empty = [n for n, t in enumerate(ids, 1) if not t]
    if empty:
        raise MiniGPT2Error(f"text {empty[0]} is empty: there is nothing to classify")
    probs = class_logits(model, ids, args.batch_size).softmax(-1)
    for text, p in zip(texts, probs.tolist(), strict=True):
        best = labels[max(range(len(p)), key=p.__getitem__)]
        if args.json:
            row = {"text": text, "label": best, "probabilities": dict(zip(labels, p, strict=True))}
            print(json.dumps(row))
        else:
            shown = ", ".join(f"{name} {v:.3f}" for name, v in zip(labels, p, strict=True))
            print(f"{best}\t({shown})\t{text}")
    return 0
