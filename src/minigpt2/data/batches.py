"""Reading prepared token shards back, and sampling training batches from them."""

from __future__ import annotations

import bisect
import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import MiniGPT2Error
from .corpus import FORMAT_VERSION, META, damaged_shard, prepare
from .records import RecordSet
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


def load_prepared(
    directory: str | Path, tokenizer: Tokenizer | None = None, val_fraction: float | None = None
) -> PreparedData:
    """Open a prepared directory, checking its format, shard sizes and tokenizer; the last
    val_fraction of its tokens (None: the fraction it was prepared with) is validation."""
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
    damaged = damaged_shard(directory, meta)
    if damaged is not None:
        raise MiniGPT2Error(f"{damaged} is missing or truncated; prepare the corpus again")
    shards = [_mapped(directory / shard["file"], meta["dtype"]) for shard in meta["shards"]]
    total, n_train = meta["total_tokens"], meta["train_tokens"]
    if val_fraction is not None:
        n_train = total - int(total * val_fraction)
    return PreparedData(
        directory, meta, TokenRange(shards, 0, n_train), TokenRange(shards, n_train, total)
    )


def _mapped(path: Path, dtype: str) -> np.ndarray:
    """A shard's tokens, memory-mapped for random reads: batches draw windows at random, and
    the kernel's default readahead fetches far more than a window (a cold batch of 12 windows
    from a sparse 20 GiB shard: 181 ms as numpy's memmap maps it, 0.22 ms with MADV_RANDOM;
    benchmarks/bench_draw.py)."""
    with open(path, "rb") as f:
        if not os.fstat(f.fileno()).st_size:
            return np.zeros(0, dtype=dtype)
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):  # Linux and macOS
        mm.madvise(mmap.MADV_RANDOM)
    return np.frombuffer(mm, dtype=dtype)


def open_corpus(spec: str, tokenizer: Tokenizer, **prepare_kwargs) -> PreparedData:
    """A prepared directory as it is, or any other source prepared (or found in the cache)."""
    val = prepare_kwargs.get("val_fraction")
    if (Path(spec).expanduser() / META).is_file():
        return load_prepared(Path(spec).expanduser(), tokenizer, val)
    return load_prepared(prepare(spec, tokenizer, **prepare_kwargs), tokenizer, val)


@dataclass
class Batch:
    """Inputs, next-token targets (-1 where not counted) and the padding mask of one batch."""

    x: torch.Tensor  # (B, T) token ids
    y: torch.Tensor  # (B, T) targets; packed pairs: (N,), the scored ones
    attention_mask: torch.Tensor | None  # (B, T), 1 for real tokens; None when none is padding;
    # packed pairs: (B, T, T) boolean, the keys each query sees
    counted: int  # targets that count in the loss (pairs for DPO, records for a classifier)
    tokens: int  # real input tokens (for throughput)
    reference: torch.Tensor | None = None  # DPO: the reference's log-probability of each response
    positions: torch.Tensor | None = None  # packed pairs: each token's position (B, T)
    at: torch.Tensor | None = None  # packed pairs: flat index (row * T + column) of y's inputs
    owner: torch.Tensor | None = None  # packed pairs: the response (0..2B-1) of each of y


def _to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """t on device; to a GPU through one copy into page-locked memory, so the transfer runs
    asynchronously (a strided slice such as data[:, :-1] gets a contiguous pinned copy)."""
    if torch.device(device).type == "cuda":
        staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        staged.copy_(t)
        return staged.to(device, non_blocking=True)
    return t.contiguous().to(device)


class Sampler:
    """Draws a step's global batch from (seed, stream, step) alone, never from earlier calls:
    a resumed run sees the same data, and the ranks of a distributed run slice one batch.

    A sampler also tells a step's sizes (for throughput and token-weighted accumulation) and
    serves evaluation batches: sizes(), eval_batches() and eval_batch() below its subclasses.
    """

    def picks(self, step: int, global_count: int) -> list | np.ndarray:
        """What the step's global batch is made of (window offsets, record indices)."""
        raise NotImplementedError

    def batch(self, picks, device: torch.device | str = "cpu") -> Batch:
        """The batch of those picks."""
        raise NotImplementedError

    def get(
        self,
        step: int,
        global_count: int,
        start: int = 0,
        count: int | None = None,
        device: torch.device | str = "cpu",
    ) -> Batch:
        """Items [start, start+count) of the step's global batch of global_count."""
        count = global_count - start if count is None else count
        return self.batch(self.picks(step, global_count)[start : start + count], device)


class Batches(Sampler):
    """Random windows of block_size+1 tokens: inputs and next-token targets."""

    def __init__(
        self, tokens: TokenRange, block_size: int, seed: int, stream: int = 0, name: str = "train"
    ) -> None:
        if len(tokens) < block_size + 1:
            raise MiniGPT2Error(
                f"the {name} split holds {len(tokens)} tokens, fewer than block_size+1 = "
                f"{block_size + 1}; use a larger corpus or a smaller block_size"
            )
        self.tokens, self.block_size, self.seed, self.stream = tokens, block_size, seed, stream

    def picks(self, step: int, global_count: int) -> np.ndarray:
        """Start offsets of the step's global batch of windows."""
        rng = np.random.default_rng([self.seed, self.stream, step])
        return rng.integers(0, len(self.tokens) - self.block_size, size=global_count)

    def batch(self, offsets, device: torch.device | str = "cpu") -> Batch:
        """The windows starting at offsets, each (len(offsets), T)."""
        n = self.block_size + 1
        rows = np.stack([self.tokens.window(int(o), n) for o in offsets]).astype(np.int64)
        data = torch.from_numpy(rows)
        x, y = _to_device(data[:, :-1], device), _to_device(data[:, 1:], device)
        return Batch(x, y, None, x.numel(), x.numel())

    def sizes(self, step: int, global_count: int) -> tuple[int, int]:
        """(input tokens, counted targets) of the step's global batch: every window is full."""
        return global_count * self.block_size, global_count * self.block_size

    def eval_batches(self, batch_size: int, eval_iters: int) -> int:
        """How many batches one evaluation takes: eval_iters random ones."""
        return eval_iters

    def eval_batch(
        self, k: int, batch_size: int, eval_iters: int, device: torch.device | str = "cpu"
    ) -> Batch:
        """Evaluation batch k (the same windows at every evaluation)."""
        return self.get(k, batch_size, device=device)


class RecordOrder(Sampler):
    """Whole items (records, pairs) walked epoch by epoch, each epoch in its own order drawn
    from (seed, stream, epoch), so a step's items depend only on the step. Evaluation scores
    every item once (exhaustive) or a fixed sample of eval_iters batches, longest first so that
    batches hold little padding. A subclass sets lengths (input tokens of each item), counts
    (what each weighs in the loss) and widths (its padded length), and makes batches."""

    lengths: np.ndarray
    counts: np.ndarray
    widths: np.ndarray

    def __init__(self, seed: int, stream: int, exhaustive: bool) -> None:
        self.seed, self.stream, self.exhaustive = seed, stream, exhaustive
        self._orders: dict[int, np.ndarray] = {}  # epoch -> order (the last few)
        self._eval_orders: dict[tuple[int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.lengths)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 4:
                self._orders.clear()
            rng = np.random.default_rng([self.seed, self.stream, epoch])
            self._orders[epoch] = rng.permutation(len(self))
        return self._orders[epoch]

    def picks(self, step: int, global_count: int) -> list[int]:
        """The items of the step's global batch."""
        n, first = len(self), step * global_count
        return [int(self._order(p // n)[p % n]) for p in range(first, first + global_count)]

    def sizes(self, step: int, global_count: int) -> tuple[int, int]:
        """(input tokens, counted units) of the step's global batch; the counted units weight
        the micro-batches of accumulation."""
        pick = self.picks(step, global_count)
        return int(self.lengths[pick].sum()), int(self.counts[pick].sum())

    def _eval_order(self, batch_size: int, eval_iters: int) -> np.ndarray:
        """Items of an evaluation, longest first: all of them, or a fixed sample."""
        key = (batch_size, eval_iters)
        if key not in self._eval_orders:
            n = len(self)
            pick = np.arange(n)
            if not self.exhaustive:
                pick = np.random.default_rng([self.seed, self.stream]).permutation(n)
                pick = pick[: eval_iters * batch_size]
            self._eval_orders[key] = pick[np.argsort(-self.widths[pick], kind="stable")]
        return self._eval_orders[key]

    def eval_batches(self, batch_size: int, eval_iters: int) -> int:
        """How many batches one evaluation takes."""
        return -(-len(self._eval_order(batch_size, eval_iters)) // batch_size)

    def eval_batch(
        self, k: int, batch_size: int, eval_iters: int, device: torch.device | str = "cpu"
    ) -> Batch:
        """Evaluation batch k: the k-th batch_size items of the evaluation's order."""
        order = self._eval_order(batch_size, eval_iters)
        return self.batch(order[k * batch_size : (k + 1) * batch_size].tolist(), device)


class RecordBatches(RecordOrder):
    """Batches of whole records, padded on the right to the longest in the batch."""

    def __init__(
        self,
        records: RecordSet,
        block_size: int,
        seed: int,
        stream: int = 0,
        exhaustive: bool = False,
    ) -> None:
        super().__init__(seed, stream, exhaustive)
        self.ids, self.mask, self.cut = [], [], 0
        for ids, counted, prompt, n in zip(
            records.ids, records.counted, records.prompt_lengths, records.numbers, strict=True
        ):
            where = f"{records.source}: record {n}"
            if prompt > block_size:
                raise MiniGPT2Error(
                    f"{where}: its prompt alone is {prompt} tokens, more than block_size="
                    f"{block_size}; shorten it or raise block_size"
                )
            if len(ids) < 2:
                raise MiniGPT2Error(f"{where} is a single token: there is nothing to predict")
            self.cut += len(ids) > block_size + 1
            self.ids.append(ids[: block_size + 1])  # long records lose their end
            self.mask.append(counted[1 : block_size + 1])  # counted targets: tokens 1..
        self.prompt_lengths = records.prompt_lengths
        self.counts = np.array([m.sum() for m in self.mask], dtype=np.int64)
        self.lengths = np.array([len(m) for m in self.mask], dtype=np.int64)  # input tokens
        self.widths = self.lengths

    def batch(self, indices: list[int], device: torch.device | str = "cpu") -> Batch:
        """The records at indices, padded on the right; padding and uncounted targets are -1."""
        width = max(len(self.ids[i]) for i in indices) - 1
        x = np.zeros((len(indices), width), dtype=np.int64)
        y = np.full((len(indices), width), -1, dtype=np.int64)
        real = np.zeros((len(indices), width), dtype=np.int64)
        for row, i in enumerate(indices):
            ids, n = self.ids[i], len(self.ids[i]) - 1
            x[row, :n], real[row, :n] = ids[:-1], 1
            y[row, :n] = np.where(self.mask[i], ids[1:], -1)
        tensors = [_to_device(torch.from_numpy(a), device) for a in (x, y, real)]
        return Batch(*tensors, int(self.counts[indices].sum()), int(self.lengths[indices].sum()))
