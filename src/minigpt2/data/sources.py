"""Where a corpus's text comes from and how its documents are read: SOURCE strings (a file, a
directory, a glob, `stdlib`, `hf:NAME[:CONFIG]`) resolved to files or a Hugging Face dataset,
and their documents read in pieces that tokenise as the whole would."""

from __future__ import annotations

import codecs
import glob
import hashlib
import os
import socket
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import regex

from ..errors import MiniGPT2Error

DECODE_ERRORS = ("strict", "replace")  # invalid UTF-8: an error, or U+FFFD
CHUNK_CHARS = 1 << 18  # texts are tokenised in pieces of about this many characters


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
