"""Classification records: `text` and `label`, in .jsonl, .json or .csv files.

A label is an integer (a class id) or a string (a class name). String labels are sorted, and
their order gives the ids; the names travel with the model (GPTConfig.labels). A text longer
than the context keeps its first block_size tokens: the classifier reads the last of them.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import MiniGPT2Error
from .batches import Batch, RecordOrder, _to_device
from .records import read_records, training_share
from .tokenizer import Tokenizer

LABEL_SUFFIXES = (".json", ".jsonl", ".csv")


@dataclass
class LabelSet:
    """Tokenized texts and their class ids."""

    source: str
    ids: list[np.ndarray]
    labels: np.ndarray  # int64 class id of each record
    numbers: list[int]  # 1-based record numbers in the file

    def subset(self, indices: range) -> LabelSet:
        """The records at indices, in that order."""
        pick = list(indices)
        return LabelSet(
            self.source,
            [self.ids[i] for i in pick],
            self.labels[pick],
            [self.numbers[i] for i in pick],
        )


@dataclass
class LabelData:
    """A classification file split into training and validation (the last val_fraction)."""

    labels: tuple[str, ...]  # class names by id
    train: LabelSet
    val: LabelSet
    format: str = "classification"


def read_labelled(path: str, hf_split: str = "train") -> tuple[list, str]:
    """(records, source) of a .jsonl/.json/.csv file or an hf: dataset."""
    file = Path(path).expanduser()
    if path.startswith("hf:") or file.suffix.lower() != ".csv":
        if not path.startswith("hf:") and file.suffix.lower() not in LABEL_SUFFIXES:
            raise MiniGPT2Error(f"{path}: classification data is a .jsonl, .json or .csv file")
        return read_records(path, hf_split)
    if not file.is_file():
        raise MiniGPT2Error(f"record file {path} not found")
    try:
        with open(file, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise MiniGPT2Error(f"cannot read {file}: {e}") from None
    if not rows:
        raise MiniGPT2Error(f"{file} holds no records; it needs a header line and records")
    for row in rows:  # a CSV has no numbers: a label column of digits names class ids
        value = row.get("label")
        if isinstance(value, str) and value.strip().isdigit():
            row["label"] = int(value)
    return rows, str(file)


def _raw_labels(records: list, source: str) -> list[int | str]:
    """Every record's label, checked: all integers or all strings."""
    out = []
    for n, record in enumerate(records, 1):
        at = f"{source}: record {n}"
        if not isinstance(record, dict):
            raise MiniGPT2Error(f"{at} is a {type(record).__name__}, not an object")
        if not isinstance(record.get("text"), str):
            raise MiniGPT2Error(f"{at} has no string 'text' field")
        label = record.get("label")
        if label is None or isinstance(label, bool) or not isinstance(label, (int, str)):
            raise MiniGPT2Error(f"{at} has no 'label' field (an integer class id or a name)")
        if isinstance(label, int) and label < 0:
            raise MiniGPT2Error(f"{at}: label {label} is negative; class ids start at 0")
        out.append(label)
    if len({type(label) for label in out}) > 1:
        raise MiniGPT2Error(f"{source}: labels mix integers and names; use one or the other")
    return out


def class_names(raw: list[int | str], num_labels: int, source: str) -> tuple[str, ...]:
    """The class names of a file's labels: ids 0..N-1 named by their digits, or the sorted
    names; num_labels (0: inferred) fixes N."""
    if isinstance(raw[0], str):
        names = tuple(sorted(set(raw)))
        if num_labels and num_labels != len(names):
            raise MiniGPT2Error(
                f"{source}: {len(names)} label names {list(names)[:5]} but num_labels="
                f"{num_labels}; drop num_labels or fix the labels"
            )
        return names
    count = num_labels or max(raw) + 1
    return tuple(str(i) for i in range(count))


def label_ids(raw: list[int | str], names: tuple[str, ...], source: str) -> np.ndarray:
    """Class ids of raw labels under a model's names (an id must be below their number)."""
    index = {name: i for i, name in enumerate(names)}
    out = []
    for n, label in enumerate(raw, 1):
        found = label if isinstance(label, int) and label < len(names) else index.get(label)
        if found is None:
            raise MiniGPT2Error(
                f"{source}: record {n}: label {label!r} is not one of the model's "
                f"{len(names)} classes ({', '.join(names[:8])}); num_labels={len(names)}"
            )
        out.append(found)
    return np.asarray(out, dtype=np.int64)


def tokenize_labelled(
    records: list,
    tokenizer: Tokenizer,
    names: tuple[str, ...] | None,
    num_labels: int,
    source: str,
) -> tuple[tuple[str, ...], LabelSet]:
    """(class names, tokenized records); names given (a model's) or found in the labels."""
    raw = _raw_labels(records, source)
    names = names or class_names(raw, num_labels, source)
    texts = [r["text"] for r in records]
    ids = [np.asarray(t, dtype=np.int64) for t in tokenizer.encode_batch(texts)]
    for n, t in enumerate(ids, 1):
        if not len(t):
            raise MiniGPT2Error(f"{source}: record {n} has an empty 'text': nothing to classify")
    numbers = list(range(1, len(records) + 1))
    return names, LabelSet(source, ids, label_ids(raw, names, source), numbers)


def load_labelled(
    path: str,
    tokenizer: Tokenizer,
    val_fraction: float,
    num_labels: int = 0,
    names: tuple[str, ...] | None = None,
    hf_split: str = "train",
) -> LabelData:
    """Read and tokenize a classification file; validation is its last val_fraction."""
    records, source = read_labelled(path, hf_split)
    names, data = tokenize_labelled(records, tokenizer, names, num_labels, source)
    cut = training_share(len(records), val_fraction, source)
    return LabelData(names, data.subset(range(cut)), data.subset(range(cut, len(records))))


class LabelBatches(RecordOrder):
    """Batches of texts padded on the right, with their class ids as targets (y, (B,))."""

    def __init__(
        self, data: LabelSet, block_size: int, seed: int, stream: int = 0, exhaustive=False
    ) -> None:
        super().__init__(seed, stream, exhaustive)
        self.cut = sum(len(t) > block_size for t in data.ids)
        self.ids = [t[:block_size] for t in data.ids]
        self.labels = data.labels
        self.lengths = np.array([len(t) for t in self.ids], dtype=np.int64)
        self.counts = np.ones(len(self.ids), dtype=np.int64)  # the loss is a mean over texts
        self.widths = self.lengths

    def batch(self, indices: list[int], device: torch.device | str = "cpu") -> Batch:
        """The texts at indices, padded on the right, and their labels."""
        width = int(self.lengths[indices].max())
        x = np.zeros((len(indices), width), dtype=np.int64)
        real = np.zeros((len(indices), width), dtype=np.int64)
        for row, i in enumerate(indices):
            x[row, : len(self.ids[i])], real[row, : len(self.ids[i])] = self.ids[i], 1
        y = self.labels[indices]
        tensors = [_to_device(torch.from_numpy(np.asarray(a)), device) for a in (x, y, real)]
        return Batch(*tensors, len(indices), int(self.lengths[indices].sum()))
