"""What `--model` names, turned into a model: a training out_dir (its best or latest
checkpoint), a checkpoint file (ours or nanoGPT's), a released-layout directory or a preset
name; and the tokenizer that belongs to it."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..data.tokenizer import get_tokenizer
from ..errors import MiniGPT2Error
from ..model.config import GPTConfig
from ..model.gpt import GPT
from ..model.lora import LoRAConfig, apply_lora, load_adapters, merge_lora
from .checkpoint import BEST, LATEST, load_checkpoint, load_model_tensors
from .hf_tokenizer import read_tokenizer_files
from .nanogpt import is_nanogpt_file, load_nanogpt
from .released import load_pretrained


def find_checkpoint(spec: str, which: str = "best") -> Path | None:
    """The checkpoint file spec names (a file, or a training out_dir's best or latest), or
    None when spec is something else: a released-layout directory or a preset name."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    names = [BEST, LATEST] if which == "best" else [LATEST]
    found = [path / n for n in names if (path / n).is_file()]
    if not found:
        raise MiniGPT2Error(
            f"{path} holds no checkpoint ({' or '.join(names)}) and no "
            "config.json; pass a training out_dir or a model directory"
        )
    return found[0]


def load_model(path: Path, **overrides):
    """A GPT and the header from a checkpoint file (ours, or nanoGPT's ckpt.pt); overrides
    replace model config fields that do not change the weights (dropout, attn_impl)."""
    if is_nanogpt_file(path):
        return load_nanogpt(path, **overrides)
    tensors, header = load_checkpoint(path)
    if "lora" in header:  # adapters only: the base they name, adapters folded in
        return merge_lora(build_lora_model(tensors, header, str(path), **overrides)), header
    model = GPT(GPTConfig.from_dict({**header["model_config"], **overrides}))
    load_model_tensors(model, tensors)
    return model, header


def load_any(spec: str, which: str = "best", **overrides):
    """(model, checkpoint header or None) from what --model takes: a training out_dir, a
    checkpoint file, a released-layout directory or a preset name. overrides: as load_model's
    (a released model takes dropout only)."""
    path = find_checkpoint(spec, which)
    if path is not None:
        return load_model(path, **overrides)
    return load_pretrained(spec, dropout=overrides.get("dropout", 0.0)), None


def tokenizer_for(
    header: dict | None,
    override: str | None = None,
    source: str | None = None,
    vocab_size: int | None = None,
):
    """The tokenizer of a model: override, else the one its checkpoint was trained with, else
    the files its directory ships (read offline), else gpt2 (released weights). source: what
    --model named; vocab_size: the model's, which the tokenizer must cover."""
    if override:
        tokenizer = get_tokenizer(override)
        _check_fits(tokenizer, header, vocab_size)
        return tokenizer
    if header is None:
        shipped = None
        if source is not None and Path(source).expanduser().is_dir():
            shipped = read_tokenizer_files(Path(source).expanduser())
        if shipped is None and vocab_size is not None and vocab_size < 50257:
            raise MiniGPT2Error(
                f"{source} has a {vocab_size}-token vocabulary, not GPT-2's, and no tokenizer "
                "files; name its tokenizer with --tokenizer (byte?)"
            )
        return shipped or get_tokenizer("gpt2")
    saved = header.get("tokenizer_spec", header["tokenizer"])
    usable = saved in ("byte", "gpt2") or Path(saved).is_file()
    tokenizer = get_tokenizer(saved if usable else header["tokenizer"])
    if tokenizer.fingerprint != header["tokenizer_hash"]:
        raise MiniGPT2Error(
            f"the checkpoint was trained with tokenizer {header['tokenizer']!r}"
            "; pass it with --tokenizer"
        )
    return tokenizer


def _check_fits(tokenizer, header: dict | None, vocab_size: int | None) -> None:
    """Refuse a tokenizer given by hand that is not the model's: another one than its
    checkpoint names, or one far smaller than its vocabulary (whose ids would print garbage)."""
    if header is not None and tokenizer.fingerprint != header["tokenizer_hash"]:
        raise MiniGPT2Error(
            f"--tokenizer {tokenizer.name} is not the tokenizer the model was trained with "
            f"({header['tokenizer']!r}); drop --tokenizer, or pass that one"
        )
    # a vocabulary may be padded up to a multiple of 64 (vocab_multiple, nanoGPT's 50304)
    if vocab_size is not None and vocab_size > -(-tokenizer.vocab_size // 64) * 64:
        raise MiniGPT2Error(
            f"--tokenizer {tokenizer.name} has {tokenizer.vocab_size:,} ids and the model "
            f"{vocab_size:,}: it is not the model's tokenizer; pass the one it was trained with"
        )


def build_lora_model(
    tensors: dict, header: dict, source: str, base_dtype: torch.dtype | None = None, **overrides
) -> nn.Module:
    """The base a LoRA checkpoint names, with its adapters loaded (not merged)."""
    saved = header["lora"]
    try:
        model, _ = load_any(saved["base"], **overrides)
    except MiniGPT2Error as e:
        raise MiniGPT2Error(
            f"{source} holds adapters for base model {saved['base']!r}, which cannot be "
            f"loaded ({e}); put that model back where it was"
        ) from None
    check_base(model, header["model_config"], source)
    labels = tuple(header["model_config"].get("labels", ()))
    if labels:  # a classifier: the base's head is replaced by the one saved with the adapters
        model.set_labels(labels)
    cfg = LoRAConfig(saved["r"], saved["alpha"], saved["dropout"], tuple(saved["targets"]))
    apply_lora(model, cfg, base_dtype)
    adapters = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    load_adapters(model, adapters, source)
    return model


def check_base(model: nn.Module, saved_config: dict, source: str) -> None:
    """Refuse a base of another shape than the one the adapters were trained on; crop its
    context to the trained one."""
    config = model.config
    shape = ("vocab_size", "n_layer", "n_head", "n_embd", "bias")
    differ = [k for k in shape if getattr(config, k) != saved_config[k]]
    if differ or config.block_size < saved_config["block_size"]:
        raise MiniGPT2Error(
            f"{source}: the adapters were trained on a base with another shape "
            f"({', '.join(differ) or 'block_size'} differ); pass the base they were trained on"
        )
    if config.block_size > saved_config["block_size"]:
        model.crop_block_size(saved_config["block_size"])
