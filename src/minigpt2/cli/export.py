"""`minigpt2 export SOURCE DEST`: the released layout with its tokenizer, or one GGUF file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import MiniGPT2Error
from ..formats.checkpoint import load_checkpoint
from ..formats.destination import check_destination, replace_dir
from ..formats.gguf import check_gguf_export, check_outtype, write_gguf
from ..formats.loading import find_checkpoint, load_any, tokenizer_for
from ..formats.nanogpt import is_nanogpt_file
from ..formats.peft import save_peft_adapter
from ..formats.released import save_pretrained


def parser() -> argparse.ArgumentParser:
    """The command's options."""
    p = argparse.ArgumentParser(
        prog="minigpt2 export",
        description="Write a model as transformers' GPT-2 layout (config.json, model.safetensors "
        "and the tokenizer's files) or, when DEST ends in .gguf, as one GGUF file for llama.cpp.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "source",
        help="a training out_dir, a checkpoint file (ours or nanoGPT's ckpt.pt) or a model "
        "directory",
    )
    p.add_argument("dest", help="a directory to write (created if needed), or FILE.gguf")
    p.add_argument(
        "--checkpoint", choices=("best", "latest"), default="best", help="of a training out_dir"
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="byte, gpt2 or path/to/gpt2.tiktoken (None: the one the model was trained with; "
        "gpt2 for released weights)",
    )
    p.add_argument(
        "--no-tokenizer", action="store_true", help="write the weights without tokenizer files"
    )
    p.add_argument("--outtype", default=None, help="GGUF only: f32, f16, bf16 or q8_0 (None: f32)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing DEST whole (without it, an existing DEST is refused)",
    )
    p.add_argument(
        "--adapter-only",
        action="store_true",
        help="a LoRA run: write its adapters in PEFT's format instead of the merged model",
    )
    return p


def _tokenizer(model, header, args):
    """The model's tokenizer, or None when it is not to be written."""
    if args.no_tokenizer:
        return None
    return tokenizer_for(header, args.tokenizer, args.source, model.config.vocab_size)


def export_main(argv: list[str]) -> int:
    """Export SOURCE to DEST; everything is checked before anything is written."""

    args = parser().parse_args(argv)
    gguf = args.dest.endswith(".gguf")
    check_destination(Path(args.dest), args.overwrite, directory=not gguf)
    if args.adapter_only:
        return _export_adapters(args, gguf)
    if args.outtype is not None and not gguf:
        raise MiniGPT2Error("--outtype applies to a .gguf DEST; the released layout is float32")
    if gguf:
        check_outtype(args.outtype or "f32")
    model, header = load_any(args.source, args.checkpoint)
    tokenizer = _tokenizer(model, header, args)
    if gguf:
        outtype = args.outtype or "f32"
        check_gguf_export(model, tokenizer, outtype)
        if model.config.gelu != "tanh":
            print(
                "warning: llama.cpp computes GPT-2's tanh GELU and this model uses the exact "
                "one: its logits will differ slightly (about 1e-3)",
                file=sys.stderr,
            )
        write_gguf(model, args.dest, tokenizer, outtype)
        print(f"wrote {args.dest} ({outtype}, {model.num_params():,} parameters)")
        return 0

    written = replace_dir(Path(args.dest), lambda new: save_pretrained(model, new, tokenizer))
    print(f"wrote {args.dest}: {', '.join(written)} ({model.num_params():,} parameters)")
    if tokenizer is None:
        print("the export carries no tokenizer (--no-tokenizer)", file=sys.stderr)
    return 0


def _export_adapters(args, gguf: bool) -> int:
    """A LoRA run's adapters as PEFT's adapter_model.safetensors + adapter_config.json."""

    if gguf:
        raise MiniGPT2Error("--adapter-only writes PEFT's directory layout, not a .gguf file")
    path = find_checkpoint(args.source, args.checkpoint)
    header = None
    if path is not None and not is_nanogpt_file(path):
        tensors, header = load_checkpoint(path)
    if header is None or "lora" not in header:
        raise MiniGPT2Error(
            f"--adapter-only exports a LoRA run's adapters and {args.source} has none; "
            "drop --adapter-only to export the whole model"
        )
    labels = list(header["model_config"].get("labels") or ())
    written = replace_dir(
        Path(args.dest),
        lambda new: save_peft_adapter(tensors, header["lora"], new, classifier=bool(labels)),
    )
    print(f"wrote {args.dest}: {', '.join(written)} (base: {header['lora']['base']})")
    if labels:  # the adapter carries the head, not the class names: the base's config must
        print(f"a classifier: load its base with num_labels={len(labels)}, id2label "
              f"{dict(enumerate(labels))} and, for padded batches, pad_token_id = end-of-text's "
              "id (as a whole export sets it)")  # fmt: skip
    return 0
