"""Tokenizers behind one interface: GPT-2's byte-level BPE (tiktoken) and raw UTF-8 bytes."""

from __future__ import annotations

import base64
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from tiktoken_ext.openai_public import r50k_pat_str

from ..errors import MiniGPT2Error

# sha256 of GPT-2's ranks in tiktoken's format (r50k_base.tiktoken), as pinned by tiktoken's
# own tiktoken_ext/openai_public.py; the gpt2 and r50k_base encodings share these ranks.
GPT2_TIKTOKEN_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_EOT = 50256
_TIKTOKEN_FILE_NAMES = ("gpt2.tiktoken", "r50k_base.tiktoken")
HOW_TO_PROVIDE = (
    "pass --tokenizer path/to/gpt2.tiktoken (tiktoken's r50k_base.tiktoken file) "
    "or put that file in $TIKTOKEN_CACHE_DIR"
)


class Tokenizer:
    """Text <-> token ids. `name` and `fingerprint` are stored with data and checkpoints."""

    name: str
    vocab_size: int  # ids are 0 .. vocab_size-1, end-of-text included
    eot_id: int
    fingerprint: str  # hash of the vocabulary: two tokenizers with one fingerprint agree

    def encode(self, text: str) -> list[int]:
        """Ids of text; a literal '<|endoftext|>' in the text is encoded as plain text."""
        raise NotImplementedError

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """encode() over many texts, using every core where the tokenizer can."""
        return [self.encode(t) for t in texts]

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """encode_batch() as numpy arrays (what corpus preparation writes)."""
        return [np.asarray(ids, dtype=np.uint32) for ids in self.encode_batch(texts)]

    def decode_bytes(self, ids: list[int]) -> bytes:
        """The raw bytes of ids (may end inside a multi-byte character)."""
        raise NotImplementedError

    def decode(self, ids: list[int]) -> str:
        """Text of ids; invalid UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_dtype(self) -> type:
        """The smallest unsigned numpy type that holds every id."""
        return np.uint16 if self.vocab_size <= 2**16 else np.uint32


class ByteTokenizer(Tokenizer):
    """Raw UTF-8 bytes, ids 0-255, plus end-of-text as 256. Needs no file."""

    name = "byte"
    vocab_size = 257
    eot_id = 256
    fingerprint = "utf-8-bytes-v1"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint16) for t in texts]

    def decode_bytes(self, ids: list[int]) -> bytes:
        return bytes(i for i in ids if i < 256)


class TiktokenGPT2(Tokenizer):
    """GPT-2's byte-level BPE (50,257 ids, <|endoftext|> = 50256) through tiktoken."""

    name = "gpt2"
    vocab_size = 50257
    eot_id = GPT2_EOT
    fingerprint = GPT2_TIKTOKEN_SHA256

    def __init__(self, encoding) -> None:
        self.encoding = encoding
        self._pool = None  # encoding threads, kept: each warms up its own regex state

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.encoding.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        # tiktoken's Rust core releases the GIL, so threads use every core; encode_to_numpy
        # skips building a Python list per token. disallowed_special=() with no allowed
        # special tokens encodes a literal <|endoftext|> as text, like encode_ordinary.

        def one(text: str) -> np.ndarray:
            return self.encoding.encode_to_numpy(text, disallowed_special=())

        if self._pool is None:
            self._pool = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="tiktoken")
        return list(self._pool.map(one, texts))

    def decode_bytes(self, ids: list[int]) -> bytes:
        return self.encoding.decode_bytes([i for i in ids if i < self.vocab_size])


def _gpt2_from_file(path: Path) -> TiktokenGPT2:
    """GPT-2's encoding from a local .tiktoken file, after checking its hash."""
    if not path.is_file():
        raise MiniGPT2Error(f"tokenizer file {path} does not exist; {HOW_TO_PROVIDE}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != GPT2_TIKTOKEN_SHA256:
        raise MiniGPT2Error(
            f"{path} is not GPT-2's BPE file (sha256 {digest[:12]}..., expected "
            f"{GPT2_TIKTOKEN_SHA256[:12]}...); {HOW_TO_PROVIDE}"
        )
    return _gpt2_encoding(load_tiktoken_bpe(str(path)))


def _gpt2_encoding(ranks: dict[bytes, int]) -> TiktokenGPT2:
    """GPT-2's tokenizer over its ranks (bytes -> id, end-of-text excluded), checked already."""

    encoding = tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": GPT2_EOT},
        explicit_n_vocab=TiktokenGPT2.vocab_size,
    )
    return TiktokenGPT2(encoding)


def gpt2_from_ranks(ranks: dict[bytes, int], source: str) -> TiktokenGPT2:
    """GPT-2's tokenizer from ranks read elsewhere (a model directory's vocab.json), refused
    unless they are GPT-2's: written out in tiktoken's format they must hash as its file."""
    ordered = sorted(ranks.items(), key=lambda item: item[1])
    text = "".join(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ordered)
    if hashlib.sha256(text.encode()).hexdigest() != GPT2_TIKTOKEN_SHA256:
        raise MiniGPT2Error(
            f"{source} holds a vocabulary that is not GPT-2's; pass its tokenizer with "
            "--tokenizer (byte, gpt2 or path/to/gpt2.tiktoken)"
        )
    return _gpt2_encoding(ranks)


def _gpt2_default() -> TiktokenGPT2:
    """GPT-2's encoding the normal way, after a local copy in $TIKTOKEN_CACHE_DIR."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR")
    for name in _TIKTOKEN_FILE_NAMES if cache else ():
        if (Path(cache) / name).is_file():
            return _gpt2_from_file(Path(cache) / name)
    try:
        return TiktokenGPT2(tiktoken.get_encoding("gpt2"))
    except Exception as e:  # no network, proxy, blocked host: all need a local file
        raise MiniGPT2Error(
            f"cannot load the gpt2 tokenizer ({type(e).__name__}: offline?); {HOW_TO_PROVIDE}"
        ) from None


def get_tokenizer(spec: str) -> Tokenizer:
    """A tokenizer from 'byte', 'gpt2' or a path to GPT-2's .tiktoken file."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "gpt2":
        return _gpt2_default()
    if spec.endswith(".tiktoken") or os.sep in spec:
        return _gpt2_from_file(Path(spec).expanduser())
    raise MiniGPT2Error(f"unknown tokenizer {spec!r}; use byte, gpt2 or a path to gpt2.tiktoken")
