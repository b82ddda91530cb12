"""Training checkpoints: one safetensors file each, written atomically, read without pickle.

A checkpoint holds tensors under three prefixes (`model.`, `optim.`, `rng.`) and a JSON
header in the safetensors metadata: iteration, best validation loss, model and training
config, tokenizer, optimizer hyper-parameters, and a digest of every tensor's bytes so a file
damaged on disk is refused rather than trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from .errors import MiniGPT2Error

FORMAT_VERSION = 1
LATEST = "ckpt.safetensors"
BEST = "best.safetensors"


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """blake2b over names, dtypes, shapes and bytes of every tensor, in name order."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def write_atomic(path: Path, write) -> None:
    """Call write(tmp_path), fsync, then rename over path: readers see the old or the new file,
    never half of one. On failure (a full disk, say) the old file stays and the error is raised."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise MiniGPT2Error(
            f"could not write {path} ({e.strerror or e}); the previous file there is intact"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], header: dict) -> None:
    """Write tensors and header to path atomically."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = {**header, "format_version": FORMAT_VERSION, "digest": _digest(tensors)}
    metadata = {"format": "pt", "minigpt2": json.dumps(header)}
    write_atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and header of a checkpoint, refusing files that are missing or damaged."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise MiniGPT2Error(f"no checkpoint at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            header = json.loads((f.metadata() or {})["minigpt2"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise MiniGPT2Error(f"checkpoint {path} is truncated or corrupt ({first})") from None
    if header.get("format_version") != FORMAT_VERSION:
        raise MiniGPT2Error(
            f"checkpoint {path} has format {header.get('format_version')}, "
            f"this version reads {FORMAT_VERSION}"
        )
    if _digest(tensors) != header.get("digest"):
        raise MiniGPT2Error(
            f"checkpoint {path} is corrupt: its contents do not match the "
            "digest written with it; use another checkpoint"
        )
    return tensors, header


def model_tensors(model: torch.nn.Module, adapters_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's weights under `model.`, the tied head once, no torch.compile prefix; with
    adapters_only, a LoRA run's adapters alone (its base is named in the header)."""
    from .lora import adapter_state

    model = getattr(model, "_orig_mod", model)
    if adapters_only:
        return {f"model.{k}": v.detach() for k, v in adapter_state(model).items()}
    return {f"model.{k}": v for k, v in model.state_dict().items() if k != "lm_head.weight"}


def load_model_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `model.` tensors into model (compiled or not); the head follows wte."""
    model = getattr(model, "_orig_mod", model)
    state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    state["lm_head.weight"] = state.get("transformer.wte.weight")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0][:200]
        raise MiniGPT2Error(f"checkpoint does not fit this model ({first})") from None


def optimizer_tensors(state: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Optimizer state keyed by parameter name, {name: {key: value}}, as `optim.` tensors.
    Names, not positions, so the state survives a change of sharding or world size."""
    return {
        f"optim.{name}.{key}": torch.as_tensor(value)
        for name, entry in state.items()
        for key, value in entry.items()
    }


def optimizer_state(tensors: dict[str, torch.Tensor], names: list[str]) -> dict[str, dict]:
    """The inverse of optimizer_tensors for the parameters in names."""
    state: dict[str, dict] = {}
    for name in names:
        prefix = f"optim.{name}."
        entry = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if entry:
            state[name] = entry
    return state


def merged_param_groups(saved: list[dict], current: list[dict]) -> list[dict]:
    """Current param groups with the saved hyper-parameters (fused/foreach stay per device)."""
    if len(saved) != len(current):
        raise MiniGPT2Error("checkpoint's optimizer has a different parameter grouping")
    keep = ("lr", "initial_lr", "betas", "eps", "weight_decay")
    return [
        {**cur, **{k: s[k] for k in keep if k in s}} for s, cur in zip(saved, current, strict=True)
    ]


def rng_tensors() -> dict[str, torch.Tensor]:
    """This process's random-number generator states (dropout draws from these)."""
    out = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def ranked_rng_tensors(per_rank: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every rank's generator states (rng.rankR.*), and rank 0's under the plain names."""
    out = {k: v.clone() for k, v in per_rank[0].items()}  # safetensors stores no shared tensors
    for rank, states in enumerate(per_rank):
        out |= {f"rng.rank{rank}.{k.removeprefix('rng.')}": v for k, v in states.items()}
    return out


def restore_rng(tensors: dict[str, torch.Tensor], rank: int = 0) -> bool:
    """Put this rank's generators back as they were saved; False when the checkpoint has no
    state of this rank's own (it came from fewer processes), so rank 0's was restored."""
    prefix = f"rng.rank{rank}."
    own = any(k.startswith(prefix) for k in tensors)
    if own:
        tensors = {
            f"rng.{k.removeprefix(prefix)}": v for k, v in tensors.items() if k.startswith(prefix)
        }
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = [
        tensors[f"rng.cuda.{i}"]
        for i in range(torch.cuda.device_count())
        if f"rng.cuda.{i}" in tensors
    ]
    if cuda and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return own or rank == 0


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
