"""Corpus preparation: any text source to cached token shards, and reading them back.

    python -m minigpt2.data prepare SOURCE --tokenizer gpt2 [--out-dir DIR]

SOURCE is a text file, a directory, a glob, `stdlib` (this Python's standard-library sources)
or `hf:NAME[:CONFIG]` (a Hugging Face dataset, streamed). Documents are joined by the
end-of-text token. The output directory holds flat token shards (numpy.memmap-able) and
meta.json. Validation is the last `val_fraction` of all tokens, chosen when the corpus is read.
"""

from __future__ import annotations

import codecs
import errno
import glob
import hashlib
import json
import os
import secrets
import shutil
import socket
import sys
import sysconfig
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import regex
from tqdm import tqdm

from ..errors import MiniGPT2Error
from .tokenizer import Tokenizer

FORMAT_VERSION = 1
META = "meta.json"
DECODE_ERRORS = ("strict", "replace")  # invalid UTF-8: an error, or U+FFFD
CHUNK_CHARS = 1 << 18  # texts are tokenised in pieces of about this many characters
BATCH_CHARS = 16 << 20  # characters handed to one batch-encode call (bounds memory)
SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 per shard


def default_cache_dir() -> Path:
    """Where prepared corpora live unless told otherwise ($MINIGPT2_DATA_CACHE)."""
    env = os.environ.get("MINIGPT2_DATA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "minigpt2" / "data"


@dataclass
class Source:
    """A corpus: a description, its files (if local) and how to read its documents."""

    spec: str
    files: list[Path]
    hf: tuple[str, str | None] | None = None
    hf_split: str = "train"
    text_column: str = "text"

    def fingerprint(self) -> list:
        """What identifies this corpus' content for the cache: each file's path and a digest of
        its bytes (an edit that keeps the size and the mtime still counts; hashing reads the
        corpus once, at about 1 GB/s). A Hugging Face dataset: its name, split and column,
        and the files when the name is a local folder."""
        if self.hf:
            local = Path(self.hf[0]).expanduser()
            files = sorted(f for f in local.rglob("*") if f.is_file()) if local.is_dir() else []
            return [self.spec, self.hf_split, self.text_column, *map(_file_digest, files)]
        return [_file_digest(f) for f in self.files]


def _file_digest(path: Path) -> tuple[str, str]:
    """(path, blake2b of the file's bytes)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return str(path), h.hexdigest()


def resolve_source(spec: str, hf_split: str = "train", text_column: str = "text") -> Source:
    """Turn a SOURCE string into a Source, checking that local files exist."""
    if spec.startswith("hf:"):
        name, _, config = spec[3:].partition(":")
        if not name:
            raise MiniGPT2Error("hf: source needs a dataset name, as in hf:NAME or hf:NAME:CONFIG")
        return Source(spec, [], (name, config or None), hf_split, text_column)
    if spec == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        skip = {"site-packages", "dist-packages", "test", "tests", "__pycache__"}
        files = []
        for folder, subdirs, names in os.walk(root):
            subdirs[:] = [d for d in subdirs if d not in skip]  # never descend into them
            files += [Path(folder) / n for n in names if n.endswith(".py")]
        return Source(f"stdlib ({root})", sorted(files))
    if any(c in spec for c in "*?["):
        files = [Path(p) for p in sorted(glob.glob(spec, recursive=True)) if Path(p).is_file()]
        if not files:
            raise MiniGPT2Error(f"no files match {spec!r}")
        return Source(spec, files)
    path = Path(spec).expanduser()
    if path.is_file():
        return Source(str(path.resolve()), [path.resolve()])
    if path.is_dir():
        files = sorted(
            f
            for f in path.resolve().rglob("*")
            if f.is_file() and not any(p.startswith(".") for p in f.relative_to(path).parts)
        )
        if not files:
            raise MiniGPT2Error(f"directory {path} holds no files")
        return Source(str(path.resolve()), files)
    raise MiniGPT2Error(
        f"data source {spec!r} not found; pass a text file, a directory, a glob, "
        "stdlib or hf:NAME[:CONFIG]"
    )


# Where GPT-2's pre-tokenizer (tiktoken's r50k pattern) always starts a new piece, so a text cut
# there encodes to the same tokens as whole: before a lone space or newline between two
# non-space characters, and between a letter and a following digit or punctuation mark (no
# pattern joins them; the reverse is unsafe: "'" + "s" is one contraction).
_SAFE_CUT = r"(?<=\S)[ \n](?=\S)|(?<=\p{L})(?=[^\s\p{L}])"


def _split_point(text: str, limit: int) -> int | None:
    """A safe cut (see _SAFE_CUT) at most limit, the last one there; else the first one past
    limit; None when text has none (it is then encoded whole)."""
    pattern = regex.compile(_SAFE_CUT)
    for start in (max(0, limit - (1 << 16)), 0):  # the last 64k characters first: cheap
        cuts = [m.start() for m in pattern.finditer(text, start, limit) if m.start() > 0]
        if cuts:
            return cuts[-1]
    later = pattern.search(text, limit)
    return later.start() if later else None


def _cut(text: str, final: bool) -> tuple[list[str], str]:
    """(pieces of about CHUNK_CHARS cut at safe points, the rest). Without final, at least
    CHUNK_CHARS stay in the rest: more text may follow it."""
    pieces = []
    while len(text) > (CHUNK_CHARS if final else 2 * CHUNK_CHARS):
        cut = _split_point(text, CHUNK_CHARS)
        if cut is None:
            break
        pieces.append(text[:cut])
        text = text[cut:]
    return pieces, text


def _file_documents(path: Path, errors: str) -> Iterator[tuple[str, bool]]:
    """(text piece, ends document) pairs for one file, read incrementally."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    buf, offset = "", 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(CHUNK_CHARS)
            try:
                buf += decoder.decode(raw, final=not raw)
            except UnicodeDecodeError as e:
                raise MiniGPT2Error(
                    f"{path}: not valid UTF-8 (byte {offset + e.start}); pass "
                    "--decode-errors=replace to decode with replacement characters"
                ) from None
            offset += len(raw)
            pieces, buf = _cut(buf, final=not raw)
            yield from ((piece, False) for piece in pieces)
            if not raw:
                yield buf, True
                return


def iter_documents(source: Source, errors: str = "strict") -> Iterator[tuple[str, bool]]:
    """Every document of source as (text piece, ends document) pairs."""
    if source.hf is None:
        for path in source.files:
            yield from _file_documents(path, errors)
        return
    # here for start-up time: importing datasets takes about 2 s
    try:
        import datasets

        name, config = source.hf
        ds = datasets.load_dataset(name, config, split=source.hf_split, streaming=True)
        for row in ds:
            text = row[source.text_column]
            pieces, rest = _cut(text, final=True)
            yield from ((piece, False) for piece in pieces)
            yield rest, True
    except MiniGPT2Error:
        raise
    except KeyError:
        raise MiniGPT2Error(
            f"{source.spec}: no text column {source.text_column!r}; pass --text-column"
        ) from None
    except Exception as e:  # offline, unknown name, bad split: one line, no traceback
        raise dataset_error(source.spec, e, "a local text file or directory") from None


HUB_PROBE_SECONDS = 3.0  # a connection to the Hub takes well under a second where it works


def check_hub(spec: str, name: str, instead: str) -> None:
    """Fail at once, in one line, when dataset name must come from the Hub and the Hub cannot
    be reached: datasets would otherwise retry for half a minute first. Skipped for a local
    folder, when the offline variables are set (datasets then reads its cache) and behind a
    proxy (which this probe would not use)."""
    offline = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    if Path(name).expanduser().exists() or any(os.environ.get(v, "0") != "0" for v in offline):
        return
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_PROBE_SECONDS).close()
    except OSError as e:
        raise MiniGPT2Error(
            f"cannot reach the Hugging Face Hub ({url.hostname}:{port}: {e.strerror or e}) for "
            f"{spec!r}; offline, pass {instead}, or set HF_HUB_OFFLINE=1 to use a cached copy"
        ) from None


def dataset_error(spec: str, error: Exception, instead: str) -> MiniGPT2Error:
    """The one-line error for a Hugging Face dataset that could not be read."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return MiniGPT2Error(f"cannot read dataset {spec!r} ({first}); offline, pass {instead} instead")


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
