"""Preference records for DPO: a prompt, a chosen and a rejected response.

Three ways to give the prompt, told apart by the fields (one per file):
- TRL's explicit-prompt format: `prompt`, `chosen`, `rejected`;
- `instruction`, optional `input`, `chosen`, `rejected`: the prompt is Stanford Alpaca's
  template, as record fine-tuning writes it (records.py);
- `messages` (the conversation so far) with `chosen` and `rejected` assistant replies: the
  prompt is the chat records' template up to the assistant's header.

`chosen` and `rejected` are strings, or (TRL's conversational form) a list holding one assistant
message. Each response is followed by end-of-text. A pair becomes two rows of a RecordSet,
prompt + chosen and prompt + rejected, in which only the response tokens count.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import MiniGPT2Error
from .batches import Batch, RecordBatches, RecordOrder, _to_device
from .records import ALPACA_NO_INPUT, ALPACA_WITH_INPUT, RecordSet, chat_prompt, training_share
from .tokenizer import Tokenizer

PROMPT_FIELDS = {"prompt": "prompt_completion", "instruction": "instruction", "messages": "chat"}


@dataclass
class PreferenceData:
    """Pairs split into training and validation (the last val_fraction): row 2i of a set is
    pair i's chosen response, row 2i+1 its rejected one."""

    format: str  # the prompt template: prompt_completion, instruction or chat
    train: RecordSet
    val: RecordSet
    identical: int  # pairs whose two responses are the same text


def _response(record: dict, key: str, where: str) -> str:
    """The text of a chosen or rejected response: a string, or one assistant message."""
    value = record.get(key)
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        if value[0].get("role") == "assistant" and isinstance(value[0].get("content"), str):
            return value[0]["content"]
    if not isinstance(value, str):
        problem = "no" if value is None else f"a {type(value).__name__} in its"
        raise MiniGPT2Error(
            f"{where} has {problem} {key!r} field; it needs the response as a string (or a "
            "list holding one assistant message)"
        )
    return value


def _prompt_ids(record: dict, fmt: str, tokenizer: Tokenizer, where: str) -> list[int]:
    """The prompt of one pair, as token ids, under the file's template."""
    if fmt == "chat":
        return chat_prompt(record.get("messages"), "chat", tokenizer, where)
    key = "prompt" if fmt == "prompt_completion" else "instruction"
    text = record.get(key)
    extra = record.get("input", "") if fmt == "instruction" else ""
    if not isinstance(text, str) or not isinstance(extra, str):
        raise MiniGPT2Error(f"{where}: {key!r} (and 'input', if given) must be strings")
    if fmt == "instruction":
        text = (ALPACA_WITH_INPUT if extra else ALPACA_NO_INPUT).format(
            instruction=text, input=extra
        )
    return tokenizer.encode(text)


def prompt_format(record, source: str) -> str:
    """The template a file's pairs use, from the fields of its first record."""
    found = [f for f in PROMPT_FIELDS if isinstance(record, dict) and f in record]
    if len(found) != 1:
        raise MiniGPT2Error(
            f"{source}: record 1 "
            + ("has no prompt" if not found else f"has {found}")
            + ": a preference record gives exactly one of 'prompt', 'instruction' or 'messages', "
            "with 'chosen' and 'rejected'"
        )
    return PROMPT_FIELDS[found[0]]


def tokenize_pairs(records: list, tokenizer: Tokenizer, source: str) -> tuple[str, RecordSet, int]:
    """(template, interleaved rows, identical pairs) of preference records."""
    fmt = prompt_format(records[0], source)
    out = RecordSet(source, [], [], [], [])
    identical = 0
    for n, record in enumerate(records, 1):
        at = f"{source}: record {n}"
        if not isinstance(record, dict):
            raise MiniGPT2Error(f"{at} is a {type(record).__name__}, not an object")
        key = next((f for f, v in PROMPT_FIELDS.items() if v == fmt), "")
        if key not in record:
            raise MiniGPT2Error(f"{at} has no {key!r} field, which the file's first record has")
        prompt = _prompt_ids(record, fmt, tokenizer, at)
        chosen, rejected = (_response(record, k, at) for k in ("chosen", "rejected"))
        identical += chosen == rejected
        for text in (chosen, rejected):
            response = tokenizer.encode(text) + [tokenizer.eot_id]
            out.ids.append(np.asarray(prompt + response, dtype=np.int64))
            out.counted.append(np.arange(len(prompt) + len(response)) >= len(prompt))
            out.prompt_lengths.append(len(prompt))
            out.numbers.append(n)
    return fmt, out, identical


def load_preferences(
    records: list, tokenizer: Tokenizer, val_fraction: float, source: str
) -> PreferenceData:
    """Tokenized pairs, the last val_fraction of them held out for validation."""
    fmt, rows, identical = tokenize_pairs(records, tokenizer, source)
    cut = training_share(len(records), val_fraction, source)
    pairs = len(records)
    return PreferenceData(
        fmt, rows.subset(range(2 * cut)), rows.subset(range(2 * cut, 2 * pairs)), identical
    )


class PairBatches(RecordOrder):
    """Batches of pairs, one packed row a pair: the prompt once, then the chosen response,
    then the rejected one, each response attending to the prompt and to itself only, at the
    positions it would hold after the prompt. Unpacked, the rows would be prompt + chosen and
    prompt + rejected: packing computes the prompt once (half of an unpacked row's tokens in
    bench_finetune.py's pairs) and pads once. The targets scored are the responses' tokens,
    the chosen responses' first, then the rejected ones', each tagged with its response
    (owner: pair i's chosen is i, its rejected B + i), with the reference's log-probability of
    each response once reference_logps has been filled in (NaN before)."""

    def __init__(
        self, rows: RecordSet, block_size: int, seed: int, stream: int = 0, exhaustive=False
    ) -> None:
        super().__init__(seed, stream, exhaustive)
        cut = RecordBatches(rows, block_size, seed, stream)  # each row as record tuning cuts it
        self.cut = cut.cut
        self.ids, self.prompt_lengths = cut.ids[0::2], cut.prompt_lengths[0::2]
        self.rejected, self.scored = cut.ids[1::2], (cut.mask[0::2], cut.mask[1::2])
        # input tokens of a packed pair: the chosen row's, then the rejected row's past the prompt
        self.lengths = cut.lengths[0::2] + cut.lengths[1::2] - np.asarray(self.prompt_lengths)
        self.widths = self.lengths
        self.counts = np.ones(len(self.lengths), dtype=np.int64)  # the loss is a mean over pairs
        self.reference = np.full((len(self.lengths), 2), np.nan)  # (chosen, rejected) per pair

    def _pack(self, i: int) -> tuple[np.ndarray, ...]:
        """Pair i's inputs, positions and segments (0 prompt, 1 chosen, 2 rejected), and the
        (input index, target) of each scored token of its chosen and its rejected response."""
        chosen, rejected, p = self.ids[i], self.rejected[i], int(self.prompt_lengths[i])
        c, r = len(chosen) - 1, len(rejected) - 1  # inputs of each unpacked row
        x = np.concatenate([chosen[:-1], rejected[p:-1]])
        pos = np.concatenate([np.arange(c), np.arange(p, r)])
        seg = np.concatenate([np.zeros(p), np.ones(c - p), np.full(r - p, 2)]).astype(np.int8)
        # the unpacked row's input j sits at j in the prompt, past it at c + j - p (rejected)
        where = np.arange(r)
        where[p:] += c - p
        picks = []
        for row, at, scored in (
            (chosen, np.arange(c), self.scored[0][i]),
            (rejected, where, self.scored[1][i]),
        ):
            picks.append((at[scored], row[1:][scored]))
        return x, pos, seg, picks

    def batch(self, indices: list[int], device: torch.device | str = "cpu") -> Batch:
        """The pairs at indices: len(indices) packed rows (right-padded), their attention
        mask (B, T, T), positions, and the scored targets of the 2 len(indices) responses."""
        packs = [self._pack(i) for i in indices]
        B, T = len(indices), max(len(p[0]) for p in packs)
        x, pos = np.zeros((B, T), dtype=np.int64), np.zeros((B, T), dtype=np.int64)
        seg = np.full((B, T), -1, dtype=np.int8)  # -1: padding
        at, y, owner = [[], []], [[], []], [[], []]
        for b, (xs, ps, ss, picks) in enumerate(packs):
            n = len(xs)
            x[b, :n], pos[b, :n], seg[b, :n] = xs, ps, ss
            for side, (where, targets) in enumerate(picks):
                at[side].append(b * T + where)
                y[side].append(targets)
                owner[side].append(np.full(len(where), side * B + b))
        keys, queries = seg[:, None, :], seg[:, :, None]
        mask = (
            np.tril(np.ones((T, T), dtype=bool)) & (keys >= 0) & ((keys == 0) | (keys == queries))
        )
        mask |= np.eye(T, dtype=bool)  # a padding query sees itself: a finite softmax
        flat = [np.concatenate(v[0] + v[1]) for v in (at, y, owner)]
        ref = np.concatenate([self.reference[indices, 0], self.reference[indices, 1]])
        tensors = [torch.from_numpy(a) for a in (x, *flat, mask, pos)]
        x, at, y, owner, mask, pos = (_to_device(t, device) for t in tensors)
        reference = _to_device(torch.from_numpy(ref).float(), device)
        tokens = int(self.lengths[indices].sum())
        return Batch(x, y, mask, len(indices), tokens, reference, pos, at, owner)
