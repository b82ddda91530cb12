"""Corpus preparation: any text source to cached token shards, and reading them back.

    python -m minigpt2.data prepare SOURCE --tokenizer gpt2 [--out-dir DIR]

SOURCE is a text file, a directory, a glob, `stdlib` (this Python's standard-library sources)
or `hf:NAME[:CONFIG]` (a Hugging Face dataset, streamed). Documents are joined by the
end-of-text token. The output directory holds flat token shards (numpy.memmap-able) and
meta.json. Validation is the last `val_fraction` of all tokens, chosen when the corpus is read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..errors import MiniGPT2Error
from .sources import DECODE_ERRORS, check_hub, iter_documents, resolve_source
from .tokenizer import Tokenizer

FORMAT_VERSION = 1
META = "meta.json"
BATCH_CHARS = 16 << 20  # characters handed to one batch-encode call (bounds memory)
SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 per shard


def default_cache_dir() -> Path:
    """Where prepared corpora live unless told otherwise ($MINIGPT2_DATA_CACHE)."""
    env = os.environ.get("MINIGPT2_DATA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "minigpt2" / "data"


class _ShardWriter:
    """Appends token arrays to numbered flat files of at most shard_tokens tokens each."""

    def __init__(self, directory: Path, dtype, shard_tokens: int) -> None:
        self.directory, self.dtype, self.shard_tokens = directory, dtype, shard_tokens
        self.shards: list[dict] = []
        self.file = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self.file is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._next_shard()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            self.file.write(tokens[:room].tobytes())
            self.shards[-1]["tokens"] += len(tokens[:room])
            tokens = tokens[room:]

    def _next_shard(self) -> None:
        self.close()
        name = f"shard-{len(self.shards):05d}.bin"
        self.file = open(self.directory / name, "wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _encode_pieces(tokenizer: Tokenizer, pieces: list[tuple[str, bool]]) -> np.ndarray:
    """One token array for a batch of pieces, end-of-text after each finished document."""
    eot = np.array([tokenizer.eot_id], dtype=np.uint32)
    out = []
    for ids, (_, ends) in zip(tokenizer.encode_arrays([t for t, _ in pieces]), pieces, strict=True):
        out.append(ids)
        if ends:
            out.append(eot)
    return np.concatenate(out) if out else eot[:0]


# a full, read-only, over-quota or forbidden cache: the user must point it elsewhere
_CACHE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR)
STALE_SECONDS = 600  # a partial preparation untouched this long has lost its writer


def _remove_stale_partials(out: Path) -> None:
    """Delete half-written preparations of out whose writer is gone. Writers may run on other
    machines sharing the cache, so a PID says nothing: each writer touches its folder after
    every batch, and one left untouched for STALE_SECONDS is abandoned."""
    for partial in out.parent.glob(out.name + ".partial-*"):
        try:
            idle = time.time() - partial.stat().st_mtime
        except OSError:
            continue  # renamed or removed meanwhile
        if idle > STALE_SECONDS:
            shutil.rmtree(partial, ignore_errors=True)


def damaged_shard(directory: Path, meta: dict) -> Path | None:
    """The first shard of a preparation that is missing or not at its size in meta.json."""
    size = np.dtype(meta["dtype"]).itemsize
    for shard in meta["shards"]:
        path = directory / shard["file"]
        if not path.is_file() or path.stat().st_size != shard["tokens"] * size:
            return path
    return None


def finished(out: Path) -> bool:
    """Whether out holds a complete preparation: meta.json, and every shard at its size."""
    try:
        return damaged_shard(out, json.loads((out / META).read_text())) is None
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _remove_superseded(out: Path, source: str, tokenizer: Tokenizer) -> None:
    """Delete earlier preparations of the same source and tokenizer (its content changed
    since): they would never be read again. A run still reading one keeps its mapped pages."""
    for other in out.parent.glob(out.name.rsplit("-", 1)[0] + "-*"):
        if other == out or ".partial-" in other.name or not other.is_dir():
            continue
        try:
            meta = json.loads((other / META).read_text())
        except (OSError, ValueError):
            continue
        if meta.get("source") == source and meta.get("tokenizer_hash") == tokenizer.fingerprint:
            shutil.rmtree(other, ignore_errors=True)


def _cache_error(where: Path, e: OSError) -> MiniGPT2Error:
    """The one-line error for a cache directory that cannot be written."""
    return MiniGPT2Error(
        f"cannot write the data cache at {where} ({e.strerror or e}); choose another with "
        "--data_cache=DIR (or --out-dir for prepare) or $MINIGPT2_DATA_CACHE"
    )


def prepare(
    spec: str,
    tokenizer: Tokenizer,
    *,
    cache_dir: str | os.PathLike | None = None,
    val_fraction: float = 0.1,
    decode_errors: str = "strict",
    hf_split: str = "train",
    text_column: str = "text",
    shard_tokens: int = SHARD_TOKENS,
    progress: bool = True,
) -> Path:
    """Tokenise a corpus into shards (or reuse a finished preparation) and return its directory."""
    if not 0.0 < val_fraction < 1.0:
        raise MiniGPT2Error(f"val_fraction={val_fraction} must be between 0 and 1")
    if decode_errors not in DECODE_ERRORS:
        raise MiniGPT2Error(f"decode_errors={decode_errors!r}; use {' or '.join(DECODE_ERRORS)}")
    source = resolve_source(spec, hf_split, text_column)
    identity = dict(
        format=FORMAT_VERSION,
        source=source.spec,
        content=source.fingerprint(),
        tokenizer=tokenizer.fingerprint,
        errors=decode_errors,
    )  # not val_fraction: the split is made when the corpus is read, so one cache serves all
    key = hashlib.sha256(json.dumps(identity, default=str).encode()).hexdigest()
    slug = "".join(c if c.isalnum() else "_" for c in Path(spec.split(":")[-1]).name)[:40]
    out = Path(cache_dir or default_cache_dir()) / f"{slug}-{tokenizer.name}-{key[:16]}"
    if finished(out):
        return out  # finished earlier: meta.json is written last, then the directory renamed
    if out.exists():  # damaged since (a shard cut short, meta.json lost): prepare it again
        shutil.rmtree(out, ignore_errors=True)
    if source.hf:
        check_hub(source.spec, source.hf[0], "a local text file or directory")
    # A writer is a host and a random token, never a PID alone: PIDs repeat across machines
    # and containers that share the cache.
    tmp = out.with_name(f"{out.name}.partial-{socket.gethostname()}-{secrets.token_hex(6)}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(out)
        tmp.mkdir()
    except OSError as e:
        raise _cache_error(out.parent, e) from None
    try:
        writer = _ShardWriter(tmp, tokenizer.token_dtype(), shard_tokens)
        total_chars = sum(f.stat().st_size for f in source.files) or None
        bar = tqdm(
            total=total_chars,
            unit="char",
            unit_scale=True,
            desc="tokenizing",
            disable=None if progress else True,  # None: off when stderr is no terminal (a log)
            file=sys.stderr,
        )
        with bar:  # closed before any error is printed, so the error gets a line of its own
            batch, chars, documents = [], 0, 0
            for piece in iter_documents(source, decode_errors):
                batch.append(piece)
                chars += len(piece[0])
                documents += piece[1]
                if chars >= BATCH_CHARS:
                    writer.write(_encode_pieces(tokenizer, batch))
                    os.utime(tmp)  # alive: see _remove_stale_partials
                    bar.update(chars)
                    batch, chars = [], 0
            writer.write(_encode_pieces(tokenizer, batch))
            bar.update(chars)
        writer.close()
        total = sum(s["tokens"] for s in writer.shards)
        if total <= documents:
            raise MiniGPT2Error(f"corpus {source.spec!r} is empty: it holds no text")
        n_val = int(total * val_fraction)
        meta = dict(
            format_version=FORMAT_VERSION,
            tokenizer=tokenizer.name,
            tokenizer_hash=tokenizer.fingerprint,
            vocab_size=tokenizer.vocab_size,
            eot_id=tokenizer.eot_id,
            dtype=np.dtype(tokenizer.token_dtype()).name,
            source=source.spec,
            documents=documents,
            total_tokens=total,
            train_tokens=total - n_val,
            val_tokens=n_val,
            val_fraction=val_fraction,
            shards=writer.shards,
        )
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished the same preparation first
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_superseded(out, source.spec, tokenizer)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in _CACHE_ERRNOS:
            raise _cache_error(out.parent, e) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
