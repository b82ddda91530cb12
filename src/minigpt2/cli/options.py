"""Options that several commands share, each written once: how a command runs on the CPU."""

from __future__ import annotations

import argparse
import os

from ..decode.kernels import layout_for_inference
from ..decode.quantize import check_scheme, quantize_for_decoding
from ..device import resolve_device, resolve_dtype, set_threads
from ..formats.loading import load_any, tokenizer_for


def add_cpu_options(p: argparse.ArgumentParser) -> None:
    """--threads and --no-native, for the commands that run a model (sample, eval)."""
    p.add_argument(
        "--no-native",
        action="store_true",
        help="decode in PyTorch only, never in the native decoder (as MINIGPT2_NATIVE=0 does)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch (0: one per core idle at the start)",
    )


def apply_cpu_options(args: argparse.Namespace) -> None:
    """Set what add_cpu_options' options ask, before any model is loaded."""
    set_threads(args.threads)
    if args.no_native:  # the switch the native decoder reads, for this whole process
        os.environ["MINIGPT2_NATIVE"] = "0"


def add_model_options(p: argparse.ArgumentParser, default_model: str | None) -> None:
    """The options that pick a model and how it runs (None: --model is required)."""
    p.add_argument(
        "--model",
        default=default_model,
        required=default_model is None,
        help="a training out_dir, a checkpoint file, a released-layout directory, "
        "or gpt2 / gpt2-medium / gpt2-large / gpt2-xl",
    )
    p.add_argument(
        "--checkpoint",
        choices=("best", "latest"),
        default="best",
        help="which checkpoint of an out_dir (best falls back to latest)",
    )
    p.add_argument("--tokenizer", default=None, help="byte, gpt2 or path/to/gpt2.tiktoken")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")
    p.add_argument(
        "--quantize",
        default=None,
        help="int8: weight-only int8 (per output channel) with bfloat16 activations, in memory",
    )
    add_cpu_options(p)


def load_for_generation(args: argparse.Namespace, sequences: int, pack: bool = True):
    """(model, checkpoint header or None, tokenizer) as add_model_options' options ask, in
    eval mode, laid out for decoding `sequences` at once (0: for scoring; see
    decode.kernels.layout_for_inference)."""
    apply_cpu_options(args)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.quantize:
        check_scheme(args.quantize)
    model, header = load_any(args.model, args.checkpoint)
    tok = tokenizer_for(header, args.tokenizer, args.model, model.config.vocab_size)
    model.to(device=device, dtype=dtype).eval()
    if args.quantize:
        model = quantize_for_decoding(model, args.quantize)
    else:
        model = layout_for_inference(model, pack=pack, sequences=sequences)
    return model, header, tok


def add_sampling_options(p: argparse.ArgumentParser, temperature: float) -> None:
    """How each next token is picked (decode.generate.SamplingConfig's knobs)."""
    p.add_argument("--temperature", type=float, default=temperature, help="0: argmax")
    p.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus: smallest set with mass p")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL's penalty (1: off)")
    p.add_argument("--seed", type=int, default=None, help="None: a fresh draw each time")
