"""Training checkpoints: one safetensors file each, written atomically, read without pickle.

A checkpoint holds tensors under three prefixes (`model.`, `optim.`, `rng.`) and a JSON
header in the safetensors metadata: iteration, best validation loss, model and training
config, tokenizer, optimizer hyper-parameters, and digests of every tensor's bytes, piece by
piece, so a file damaged on disk is refused rather than trained on. A sharded resume (FSDP)
reads and checks only the rows of each tensor its rank holds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import MiniGPT2Error
from ..model.lora import adapter_state

FORMAT_VERSION = 2  # 1: one digest over the whole file (still read); 2: digests by pieces
LATEST = "ckpt.safetensors"
BEST = "best.safetensors"


# A digest per piece of at least 256 KiB of whole rows (at most 64 per tensor): a rank reading a
# 1/world share of a tensor reads and checks at most one piece more at each end.
PIECE_BYTES, MAX_PIECES = 1 << 18, 64
# The dtypes of safetensors' header (its format description) that checkpoints hold.
_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _piece_layout(shape, itemsize: int, pieces=(PIECE_BYTES, MAX_PIECES)) -> tuple[int, int]:
    """(rows per digested piece, bytes per row); a scalar is one row. pieces: (smallest piece
    in bytes, most pieces per tensor), as the checkpoint's header records them."""
    shape, (piece_bytes, max_pieces) = list(shape), pieces
    rows, row_bytes = (shape[0] if shape else 1), itemsize * math.prod(shape[1:])
    return max(1, -(-rows // max_pieces), -(-piece_bytes // max(row_bytes, 1))), row_bytes


def _piece_hash(piece) -> str:
    """The digest of one piece of a tensor's bytes, as written and as checked."""
    return hashlib.blake2b(piece, digest_size=16).hexdigest()


def _piece_digests(t: torch.Tensor) -> list[str]:
    """The digest of each piece of t's bytes."""
    data = t.contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else b""
    per, row_bytes = _piece_layout(t.shape, t.element_size())
    step = max(per * row_bytes, 1)
    return [_piece_hash(data[i : i + step]) for i in range(0, max(len(data), 1), step)]


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """Format 1's digest: blake2b over names, dtypes, shapes and bytes of every tensor."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def usual_mode(bits: int) -> int:
    """bits as the process's umask leaves them: the mode open() or mkdir() would give."""
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return bits & ~umask


def write_atomic(path: Path, write) -> None:
    """Call write(tmp_path), fsync, then rename over path: readers see the old or the new file,
    never half of one. On failure (a full disk, say) the old file stays and the error is raised."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, usual_mode(0o666))  # mkstemp makes 0600
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk its own way
        reason = getattr(e, "strerror", None) or str(e)
        raise MiniGPT2Error(
            f"could not write {path} ({reason}); the previous file there is intact: make room "
            "there, or write elsewhere"
        ) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], header: dict) -> None:
    """Write tensors and header to path atomically."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    digests = {k: _piece_digests(v) for k, v in tensors.items()}
    header = {
        **header,
        "format_version": FORMAT_VERSION,
        "digests": digests,
        "digest_pieces": [PIECE_BYTES, MAX_PIECES],
    }
    metadata = {"format": "pt", "minigpt2": json.dumps(header)}
    write_atomic(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


class CheckpointFile:
    """A checkpoint opened for reading: its header, and whole tensors or rows of them, each
    piece read checked against its digest. Reads with pread, so a sharded resume touches only
    its rows (and /proc/self/io counts what it read)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise MiniGPT2Error(f"no checkpoint at {self.path}")
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            self._read_layout()
        except BaseException:
            os.close(self.fd)
            raise
        self.whole: dict[str, torch.Tensor] | None = None  # format 1: read and checked at once

    def _read_layout(self) -> None:
        try:
            (n,) = struct.unpack("<Q", self._pread(0, 8))
            layout = json.loads(self._pread(8, n))
            self.header = json.loads(layout.pop("__metadata__")["minigpt2"])
            self.entries = layout
            self.start = 8 + n
            end = max((e["data_offsets"][1] for e in layout.values()), default=0)
            if os.fstat(self.fd).st_size < self.start + end:
                raise ValueError("the file ends before its last tensor")
        except (OSError, KeyError, ValueError, TypeError, struct.error) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise MiniGPT2Error(
                f"checkpoint {self.path} is truncated or corrupt ({first})"
            ) from None
        if self.header.get("format_version") not in (1, FORMAT_VERSION):
            raise MiniGPT2Error(
                f"checkpoint {self.path} has format {self.header.get('format_version')}, "
                f"this version reads 1 and {FORMAT_VERSION}"
            )

    def __enter__(self) -> CheckpointFile:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)

    def _pread(self, offset: int, size: int) -> bytearray:
        buf = bytearray(size)
        view, done = memoryview(buf), 0
        while done < size:
            got = os.preadv(self.fd, [view[done:]], offset + done)
            if got == 0:
                raise ValueError("the file ends early")
            done += got
        return buf

    def names(self) -> list[str]:
        """Every tensor's name."""
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, without reading it."""
        return tuple(self.entries[name]["shape"])

    def _corrupt(self) -> MiniGPT2Error:
        return MiniGPT2Error(
            f"checkpoint {self.path} is corrupt: its contents do not match the "
            "digest written with it; use another checkpoint"
        )

    def tensor(self, name: str) -> torch.Tensor:
        """One whole tensor."""
        shape = self.shape(name)
        return self.rows(name, 0, shape[0] if shape else 1)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows start:stop of a tensor (its first dimension; a scalar has one row)."""
        if self.header["format_version"] == 1:
            return self._format1(name, start, stop)
        entry = self.entries[name]
        dtype, shape = _DTYPES[entry["dtype"]], list(entry["shape"])
        per, row_bytes = _piece_layout(shape, dtype.itemsize, self.header["digest_pieces"])
        first, last = start // per, max(-(-stop // per), start // per + 1)  # pieces to read
        begin, end = entry["data_offsets"]
        lo, hi = begin + first * per * row_bytes, min(end, begin + last * per * row_bytes)
        try:
            data = self._pread(self.start + lo, hi - lo)
        except (OSError, ValueError) as e:
            raise MiniGPT2Error(f"checkpoint {self.path} is truncated or corrupt ({e})") from None
        step, digests, view = (
            per * row_bytes,
            self.header["digests"].get(name, []),
            memoryview(data),
        )
        for k, i in enumerate(range(first, last)):
            if i >= len(digests) or _piece_hash(view[k * step : (k + 1) * step]) != digests[i]:
                raise self._corrupt()
        out = torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)
        if not shape:
            return out.reshape([])
        out = out.reshape([-1, *shape[1:]])
        return out[start - first * per : stop - first * per]

    def _format1(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Format 1 has one digest for the whole file: read and check everything once."""
        if self.whole is None:
            try:
                whole = load_file(self.path)
            except Exception as e:  # safetensors raises its own error types
                raise MiniGPT2Error(
                    f"checkpoint {self.path} is truncated or corrupt ({e})"
                ) from None
            if _digest(whole) != self.header.get("digest"):
                raise self._corrupt()
            self.whole = whole
        t = self.whole[name]
        return t[start:stop] if t.ndim else t


def read_header(path: Path) -> dict:
    """A checkpoint's header alone (cheap: no tensor is read)."""
    with CheckpointFile(path) as f:
        return f.header


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and header of a checkpoint, refusing files that are missing or damaged."""
    with CheckpointFile(path) as f:
        return {name: f.tensor(name) for name in f.names()}, f.header


def model_tensors(model: torch.nn.Module, adapters_only: bool = False) -> dict[str, torch.Tensor]:
    """The model's weights under `model.`, the tied head once, no torch.compile prefix; with
    adapters_only, a LoRA run's adapters alone (its base is named in the header)."""
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


def optimizer_state(f: CheckpointFile, params: list[str], read=None) -> dict[str, dict]:
    """The inverse of optimizer_tensors for the parameters in params, read from f: each
    tensor whole, or as read(parameter, tensor name) returns it (a rank's rows under FSDP)."""
    read = read or (lambda param, name: f.tensor(name))
    state: dict[str, dict] = {}
    for param in params:
        prefix = f"optim.{param}."
        entry = {n[len(prefix) :]: read(param, n) for n in f.names() if n.startswith(prefix)}
        if entry:
            state[param] = entry
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
