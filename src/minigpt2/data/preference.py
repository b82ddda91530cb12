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

from dataclasses import dataclass, replace

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
    """Batches of pairs: a batch of B pairs holds 2B rows, the chosen responses first, then
    the rejected ones in the same order, with the reference's log-probability of each row once
    reference_logps has been filled in (NaN before)."""

    def __init__(
        self, rows: RecordSet, block_size: int, seed: int, stream: int = 0, exhaustive=False
    ) -> None:
        super().__init__(seed, stream, exhaustive)
        self.rows = RecordBatches(rows, block_size, seed, stream)
        self.cut = self.rows.cut
        tokens = self.rows.lengths
        self.lengths = tokens[0::2] + tokens[1::2]
        self.counts = np.ones(len(self.lengths), dtype=np.int64)  # the loss is a mean over pairs
        self.widths = np.maximum(tokens[0::2], tokens[1::2])
        self.ids, self.prompt_lengths = self.rows.ids[0::2], self.rows.prompt_lengths[0::2]
        self.reference = np.full((len(self.lengths), 2), np.nan)  # (chosen, rejected) per pair

    def batch(self, indices: list[int], device: torch.device | str = "cpu") -> Batch:
        """The pairs at indices: 2 len(indices) rows, chosen then rejected."""
        rows = [2 * i for i in indices] + [2 * i + 1 for i in indices]
        ref = np.concatenate([self.reference[indices, 0], self.reference[indices, 1]])
        b = self.rows.batch(rows, device)
        reference = _to_device(torch.from_numpy(ref).float(), device)
        return replace(b, counted=len(indices), reference=reference)
