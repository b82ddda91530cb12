"""What `--model` names, turned into a model: a training out_dir (its best or latest
checkpoint), a checkpoint file (ours or nanoGPT's), a released-layout directory or a preset
name; and the tokenizer that belongs to it."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import BEST, LATEST, load_checkpoint, load_model_tensors
from .errors import MiniGPT2Error


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
    from .model import GPT, GPTConfig
    from .nanogpt import is_nanogpt_file, load_nanogpt

    if is_nanogpt_file(path):
        return load_nanogpt(path, **overrides)
    tensors, header = load_checkpoint(path)
    if "lora" in header:  # adapters only: the base they name, adapters folded in
        from .lora import build_lora_model, merge_lora

        return merge_lora(build_lora_model(tensors, header, str(path), **overrides)), header
    model = GPT(GPTConfig.from_dict({**header["model_config"], **overrides}))
    load_model_tensors(model, tensors)
    return model, header


def load_any(spec: str, which: str = "best", **overrides):
    """(model, checkpoint header or None) from what --model takes: a training out_dir, a
    checkpoint file, a released-layout directory or a preset name. overrides: as load_model's
    (a released model takes dropout only)."""
    from .pretrained import load_pretrained

    path = find_checkpoint(spec, which)
    if path is not None:
        return load_model(path, **overrides)
    return load_pretrained(spec, dropout=overrides.get("dropout", 0.0)), None


def tokenizer_for(header: dict | None, override: str | None = None):
    """The tokenizer a checkpoint was trained with (or override; gpt2 for released weights)."""
    from .tokenizer import get_tokenizer

    if override or header is None:
        return get_tokenizer(override or "gpt2")
    saved = header.get("tokenizer_spec", header["tokenizer"])
    usable = saved in ("byte", "gpt2") or Path(saved).is_file()
    tokenizer = get_tokenizer(saved if usable else header["tokenizer"])
    if tokenizer.fingerprint != header["tokenizer_hash"]:
        raise MiniGPT2Error(
            f"the checkpoint was trained with tokenizer {header['tokenizer']!r}"
            "; pass it with --tokenizer"
        )
    return tokenizer
