"""nanoGPT's training checkpoints (`ckpt.pt`): read safely into this project's model.

nanoGPT saves `torch.save({"model": state_dict, "model_args": {...}, "iter_num": ...,
"best_val_loss": ..., "config": {...}, "optimizer": ...})`. Its parameter names are GPT-2's, as
here, in nn.Linear orientation; a model trained under torch.compile prefixes them with
`_orig_mod.`, and on old PyTorch each block also saves its causal mask as `attn.bias`. Its MLP uses
the exact (erf) GELU, so a model from it keeps `gelu="exact"`.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from ..data.tokenizer import GPT2_TIKTOKEN_SHA256, TiktokenGPT2
from ..errors import MiniGPT2Error
from ..model.config import GPTConfig
from ..model.gpt import GPT

GPT2_VOCABS = (50257, 50304)  # GPT-2's, and nanoGPT's default rounded up to a multiple of 64
_SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
_COMPILE_PREFIX = "_orig_mod."


def is_nanogpt_file(path: Path) -> bool:
    """Whether path is a torch.save file (nanoGPT's format) rather than a safetensors one."""
    return path.suffix in (".pt", ".pth") or zipfile.is_zipfile(path)


def _read(path: Path) -> dict:
    """The saved dict, unpickled with torch's weights-only loader: plain data, never code."""
    if not zipfile.is_zipfile(path):  # torch.save's format since PyTorch 1.6
        raise MiniGPT2Error(f"{path}: not a readable PyTorch checkpoint (not a torch.save file)")
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln for ln in str(e).splitlines() if "Unsupported" in ln] or ["an unknown object"]
        why = lines[0].split("error:")[-1].split(" was not")[0].strip()[:120]
        raise MiniGPT2Error(f"{path}: holds objects a weights-only load refuses ({why})") from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
        raise MiniGPT2Error(f"{path}: not a readable PyTorch checkpoint ({first})") from None
    if not isinstance(saved, dict) or "model" not in saved or "model_args" not in saved:
        raise MiniGPT2Error(
            f"{path}: not a nanoGPT checkpoint (no 'model' and 'model_args'); pass a training "
            "out_dir, a minigpt2 checkpoint, a released-layout directory or nanoGPT's ckpt.pt"
        )
    return saved


def _char_vocabulary(path: Path, saved: dict) -> Path | None:
    """nanoGPT's meta.pkl for a character-level run: beside the checkpoint, or where nanoGPT's
    sample.py looks (data/<dataset>/meta.pkl)."""
    dataset = str((saved.get("config") or {}).get("dataset", ""))
    places = [path.parent / "meta.pkl"] + ([Path("data") / dataset / "meta.pkl"] if dataset else [])
    return next((p for p in places if p.is_file()), None)


def config_from_nanogpt(args: dict, path: Path, **overrides) -> GPTConfig:
    """The model shape of nanoGPT's model_args (overrides: dropout, attn_impl)."""
    missing = [k for k in _SHAPE_KEYS if k not in args]
    if missing:
        raise MiniGPT2Error(f"{path}: model_args lacks {', '.join(missing)}")
    try:
        shape = {k: int(args[k]) for k in _SHAPE_KEYS}
    except (TypeError, ValueError):
        raise MiniGPT2Error(f"{path}: model_args has a non-integer shape: {args}") from None
    return GPTConfig(**shape, bias=bool(args.get("bias", True)), gelu="exact", **overrides)


def load_nanogpt(path: Path, **overrides) -> tuple[GPT, dict]:
    """(model, header) from nanoGPT's ckpt.pt; the header names GPT-2's tokenizer."""
    saved = _read(path)
    config = config_from_nanogpt(saved["model_args"], path, **overrides)
    if config.vocab_size not in GPT2_VOCABS:
        meta = _char_vocabulary(path, saved)
        what = f"a character vocabulary ({meta})" if meta else "a vocabulary that is not GPT-2's"
        vocabs = " or ".join(map(str, GPT2_VOCABS))
        raise MiniGPT2Error(
            f"{path}: vocab_size {config.vocab_size} is {what}; minigpt2 reads nanoGPT "
            f"checkpoints trained with GPT-2's tokenizer (vocab_size {vocabs})"
        )
    state = {}
    for key, value in saved["model"].items():
        key = key.removeprefix(_COMPILE_PREFIX)
        if key.endswith((".attn.bias", ".attn.masked_bias")) and value.dim() == 4:
            continue  # a causal-mask buffer, not a weight
        state[key] = value
    state.setdefault("lm_head.weight", state.get("transformer.wte.weight"))
    model = GPT(config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise MiniGPT2Error(f"{path}: weights do not match model_args ({first})") from None
    header = {
        "source": "nanogpt",
        "iter": int(saved.get("iter_num", 0)),
        "model_config": config.to_dict(),
        "tokenizer": TiktokenGPT2.name,
        "tokenizer_hash": GPT2_TIKTOKEN_SHA256,
    }
    return model, header
