"""Reading prepared token shards back, and sampling training batches from them."""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data import FORMAT_VERSION, META, prepare
from .errors import MiniGPT2Error
from .tokenizer import Tokenizer


class TokenRange:
    """Tokens [start, end) of the concatenation of memory-mapped shards."""

    def __init__(self, shards: list[np.ndarray], start: int, end: int) -> None:
        self.shards = shards
        self.bounds = np.cumsum([0] + [len(s) for s in shards]).tolist()
        self.start, self.end = start, end

    def __len__(self) -> int:
        return self.end - self.start

    def window(self, offset: int, length: int) -> np.ndarray:
        """length tokens from offset (relative to start), crossing shard boundaries if needed."""
        pos, parts = self.start + offset, []
        while length > 0:
            i = bisect.bisect_right(self.bounds, pos) - 1
            local = pos - self.bounds[i]
            take = min(length, len(self.shards[i]) - local)
            parts.append(self.shards[i][local : local + take])
            pos, length = pos + take, length - take
        return parts[0] if len(parts) == 1 else np.concatenate(parts)


@dataclass
class PreparedData:
    """A prepared corpus: its metadata and the train and validation token ranges."""

    directory: Path
    meta: dict
    train: TokenRange
    val: TokenRange


def load_prepared(directory: str | Path, tokenizer: Tokenizer | None = None) -> PreparedData:
    """Open a prepared directory, checking its format, shard sizes and tokenizer."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MiniGPT2Error(f"{directory}: no readable {META} ({e}); prepare it again") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise MiniGPT2Error(
            f"{directory}: data format {meta.get('format_version')} is not "
            f"{FORMAT_VERSION}; prepare the corpus again"
        )
    if tokenizer is not None and meta["tokenizer_hash"] != tokenizer.fingerprint:
        raise MiniGPT2Error(
            f"{directory} was tokenised with {meta['tokenizer']!r} but the run asks for "
            f"{tokenizer.name!r}; prepare the corpus with that tokenizer or change tokenizer"
        )
    shards = []
    for shard in meta["shards"]:
        path = directory / shard["file"]
        expected = shard["tokens"] * np.dtype(meta["dtype"]).itemsize
        if not path.is_file() or path.stat().st_size != expected:
            raise MiniGPT2Error(f"{path} is missing or truncated; prepare the corpus again")
        shards.append(np.memmap(path, dtype=meta["dtype"], mode="r"))
    total, n_train = meta["total_tokens"], meta["train_tokens"]
    return PreparedData(
        directory, meta, TokenRange(shards, 0, n_train), TokenRange(shards, n_train, total)
    )


def open_corpus(spec: str, tokenizer: Tokenizer, **prepare_kwargs) -> PreparedData:
    """A prepared directory as it is, or any other source prepared (or found in the cache)."""
    if (Path(spec).expanduser() / META).is_file():
        return load_prepared(Path(spec).expanduser(), tokenizer)
    return load_prepared(prepare(spec, tokenizer, **prepare_kwargs), tokenizer)


class Batches:
    """Random windows of block_size+1 tokens: inputs and next-token targets.

    The windows of a step depend only on (seed, stream, step), never on earlier calls, so a
    resumed run sees the same data, and ranks of a distributed run slice one global batch.
    """

    def __init__(
        self, tokens: TokenRange, block_size: int, seed: int, stream: int = 0, name: str = "train"
    ) -> None:
        if len(tokens) < block_size + 1:
            raise MiniGPT2Error(
                f"the {name} split holds {len(tokens)} tokens, fewer than block_size+1 = "
                f"{block_size + 1}; use a larger corpus or a smaller block_size"
            )
        self.tokens, self.block_size, self.seed, self.stream = tokens, block_size, seed, stream

    def offsets(self, step: int, count: int) -> np.ndarray:
        """Start offsets of the step's global batch of count windows."""
        rng = np.random.default_rng([self.seed, self.stream, step])
        return rng.integers(0, len(self.tokens) - self.block_size, size=count)

    def get(
        self,
        step: int,
        global_count: int,
        start: int = 0,
        count: int | None = None,
        device: torch.device | str = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows [start, start+count) of the step's global batch as (x, y), each (count, T)."""
        count = global_count - start if count is None else count
        offsets = self.offsets(step, global_count)[start : start + count]
        n = self.block_size + 1
        rows = np.stack([self.tokens.window(int(o), n) for o in offsets]).astype(np.int64)
        data = torch.from_numpy(rows)
        x, y = data[:, :-1], data[:, 1:]
        if torch.device(device).type == "cuda":
            return (
                x.pin_memory().to(device, non_blocking=True),
                y.pin_memory().to(device, non_blocking=True),
            )
        return x.contiguous().to(device), y.contiguous().to(device)
