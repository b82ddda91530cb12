"""GPT-2's tokenizer as the files transformers and llama.cpp read, derived from tiktoken's ranks.

The published gpt2 tokenizer is byte-level BPE: every byte is first mapped to a printable
character (GPT-2's `bytes_to_unicode` table, so a space is "Ġ"), vocab.json maps those strings to
ids, and merges.txt lists the pair merges in priority order. tiktoken keeps the same vocabulary as
ranks over raw bytes; a token's rank is its id and its merge priority. The pair that makes a token
is found by running BPE on its bytes with only the lower-ranked tokens: the two parts left are it.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from ..data.tokenizer import GPT2_EOT, ByteTokenizer, TiktokenGPT2, Tokenizer, gpt2_from_ranks
from ..errors import MiniGPT2Error
from .checkpoint import write_atomic

EOT_TEXT = "<|endoftext|>"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")


@cache
def byte_chars() -> tuple[str, ...]:
    """GPT-2's printable character for each byte 0-255 (its bytes_to_unicode table)."""
    # bytes that print as themselves keep their code point; the other 68 take 256, 257, ...
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    extra = iter(range(256, 256 + 256 - len(kept)))
    return tuple(chr(b) if b in kept else chr(next(extra)) for b in range(256))


def as_chars(token: bytes) -> str:
    """A token's bytes in GPT-2's printable spelling."""
    table = byte_chars()
    return "".join(table[b] for b in token)


def _merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two parts BPE joins to make token: BPE over its bytes using lower ranks only."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, where = limit, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], limit)
            if rank < best:
                best, where = rank, i
        if where < 0:
            break
        parts[where : where + 2] = [parts[where] + parts[where + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} is not a merge of two lower-ranked tokens")
    return parts[0], parts[1]


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """vocab.json's mapping and merges.txt's pairs (in priority order) from tiktoken ranks."""
    vocab = {as_chars(token): rank for token, rank in ranks.items()}
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            a, b = _merge_of(token, ranks)
            merges.append((as_chars(a), as_chars(b)))
    return vocab, merges


def gpt2_ranks(tokenizer: TiktokenGPT2) -> dict[bytes, int]:
    """The BPE ranks (bytes -> id) of a tiktoken encoding, end-of-text excluded."""
    enc = tokenizer.encoding
    return {b: enc.encode_single_token(b) for b in enc.token_byte_values()}


def tokenizer_json(vocab: dict[str, int], merges: list[tuple[str, str]], eot_id: int) -> dict:
    """The `tokenizers` library's serialized form of a GPT-2-style byte-level BPE."""
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": eot_id,
                "content": EOT_TEXT,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": True,
                "special": True,
            }
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {"type": "ByteLevel", **byte_level, "trim_offsets": False},
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {**vocab, EOT_TEXT: eot_id},
            "merges": [list(pair) for pair in merges],
        },
    }


def tokenizer_config(eot_id: int, max_length: int, fast_only: bool) -> dict:
    """tokenizer_config.json: end-of-text as bos, eos and unk, as the published gpt2 has."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast" if fast_only else "GPT2Tokenizer",
        "bos_token": EOT_TEXT,
        "eos_token": EOT_TEXT,
        "unk_token": EOT_TEXT,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # decode exactly what tiktoken decodes
        "model_max_length": max_length,
        "added_tokens_decoder": {
            str(eot_id): {
                "content": EOT_TEXT,
                "lstrip": False,
                "normalized": True,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
        },
    }


@cache  # deriving GPT-2's 50,000 merges takes about 1.5 s; an export asks more than once
def tokenizer_tables(tokenizer: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab without end-of-text, merges) for GPT-2's BPE or the byte tokenizer."""
    if isinstance(tokenizer, TiktokenGPT2):
        return vocab_and_merges(gpt2_ranks(tokenizer))
    if isinstance(tokenizer, ByteTokenizer):  # every byte its own token, nothing merged
        return {ch: b for b, ch in enumerate(byte_chars())}, []
    raise ValueError(f"no tokenizer files for tokenizer {tokenizer.name!r}")


def write_tokenizer_files(tokenizer: Tokenizer, out: Path, max_length: int) -> list[str]:
    """Write the tokenizer files into out; returns the names written."""
    vocab, merges = tokenizer_tables(tokenizer)
    gpt2 = isinstance(tokenizer, TiktokenGPT2)
    files = {
        "tokenizer.json": json.dumps(
            tokenizer_json(vocab, merges, tokenizer.eot_id), ensure_ascii=False
        ),
        "tokenizer_config.json": json.dumps(
            tokenizer_config(tokenizer.eot_id, max_length, fast_only=not gpt2), indent=2
        ),
        "special_tokens_map.json": json.dumps(
            {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}, indent=2
        ),
    }
    if gpt2:  # the slow GPT2Tokenizer's pair, as openai-community/gpt2 ships it
        files["vocab.json"] = json.dumps({**vocab, EOT_TEXT: GPT2_EOT}, ensure_ascii=False)
        files["merges.txt"] = "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges)
    for name, text in files.items():
        write_atomic(out / name, lambda p, t=text: Path(p).write_text(t + "\n", encoding="utf-8"))
    return sorted(files)


def _read_vocab(directory: Path) -> tuple[dict[str, int], str] | None:
    """(token spelling -> id, the file it came from): vocab.json, else tokenizer.json's BPE."""
    for name in ("vocab.json", "tokenizer.json"):
        path = directory / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            vocab = data if name == "vocab.json" else data["model"]["vocab"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MiniGPT2Error(f"cannot read {path} ({e}); pass --tokenizer") from None
        if isinstance(vocab, dict):
            return vocab, str(path)
    return None


def read_tokenizer_files(directory: Path) -> Tokenizer | None:
    """The tokenizer a model directory ships (vocab.json + merges.txt, or tokenizer.json), read
    offline: GPT-2's BPE (its vocabulary checked against GPT-2's) or bytes; None without
    such files. merges.txt is not needed: GPT-2's merge order is its vocabulary's id order."""
    found = _read_vocab(Path(directory))
    if found is None:
        return None
    vocab, source = found
    code = {ch: b for b, ch in enumerate(byte_chars())}
    try:
        ranks = {
            bytes(code[ch] for ch in spelling): rank
            for spelling, rank in vocab.items()
            if spelling != EOT_TEXT
        }
    except KeyError:
        raise MiniGPT2Error(
            f"{source} is not a byte-level BPE vocabulary; pass --tokenizer"
        ) from None
    if ranks == {bytes([b]): b for b in range(256)} and vocab.get(EOT_TEXT) == 256:
        return ByteTokenizer()
    return gpt2_from_ranks(ranks, source)
