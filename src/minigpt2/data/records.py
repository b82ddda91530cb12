"""Training records: prompt/response data in `.json` or `.jsonl` files, and their templates.

Three formats, detected from the fields of the records or named with `data_format`:
- `instruction`: Alpaca's `instruction`, optional `input`, and `output`, under Stanford
  Alpaca's prompt templates (as litgpt writes them); the response is `output`.
- `prompt_completion`: TRL's `prompt` and `completion`, used as they are.
- `chat`: `messages`, a list of `{role, content}` with roles system, user and assistant, under
  this plain-text template: each message is a header line `### System:`, `### User:` or
  `### Assistant:`, then the content; user and system messages end with a blank line, and an
  assistant message ends with <|endoftext|>. The assistant contents are the responses.

A response is always followed by the end-of-text token. Prompt and response text are tokenized
separately and concatenated; by default only response tokens (and their end-of-text) count in
the loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MiniGPT2Error
from .sources import check_hub, dataset_error, resolve_source
from .tokenizer import Tokenizer

RECORD_FORMATS = ("instruction", "prompt_completion", "chat")
DATA_FORMATS = ("auto", "text", *RECORD_FORMATS, "preference")  # preference: data/preference.py
RECORD_SUFFIXES = (".json", ".jsonl")

# Stanford Alpaca's two prompts, character for character (litgpt's alpaca template too).
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
CHAT_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
_FIELDS = {
    "instruction": "instruction, output and optionally input",
    "prompt_completion": "prompt and completion",
    "chat": "messages (a list of {role, content})",
}


def is_records_path(spec: str) -> bool:
    """Whether a data source names a record file (by its suffix)."""
    return Path(spec).suffix.lower() in RECORD_SUFFIXES


def detect_format(record: dict) -> str | None:
    """The record format whose fields a record has, or None."""
    if not isinstance(record, dict):
        return None
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "messages" in record:
        return "chat"
    if "instruction" in record and "output" in record:
        return "instruction"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    return None


def wrap_prompt(fmt: str, text: str) -> str:
    """The prompt a model trained on fmt records expects before its response to text."""
    if fmt == "instruction":
        return ALPACA_NO_INPUT.format(instruction=text)
    if fmt == "chat":
        return _chat_header("user") + text + "\n\n" + _chat_header("assistant")
    return text


def _chat_header(role: str) -> str:
    return f"### {CHAT_ROLES[role]}:\n"


def _text(record: dict, key: str, where: str, optional: bool = False) -> str:
    value = record.get(key, "" if optional else None)
    if not isinstance(value, str):
        problem = "no" if value is None else f"a non-string ({type(value).__name__})"
        raise MiniGPT2Error(f"{where} has {problem} {key!r} field; it needs a string there")
    return value


def segments(record: dict, fmt: str, where: str) -> list[tuple[str, bool]]:
    """(text, is_response) pieces of one record; each response is followed by end-of-text."""
    if fmt == "instruction":
        instruction = _text(record, "instruction", where)
        extra = _text(record, "input", where, optional=True)
        template = ALPACA_WITH_INPUT if extra else ALPACA_NO_INPUT
        prompt = template.format(instruction=instruction, input=extra)
        return [(prompt, False), (_text(record, "output", where), True)]
    if fmt == "prompt_completion":
        return [(_text(record, "prompt", where), False), (_text(record, "completion", where), True)]
    out, _ = _conversation(record.get("messages"), where)
    if not any(is_response for _, is_response in out):
        raise MiniGPT2Error(f"{where} has no assistant message: nothing to learn from it")
    return out


def _conversation(messages, where: str) -> tuple[list[tuple[str, bool]], str]:
    """(text, is_response) pieces of a chat, up to its last assistant message, and the prompt
    text after it (system and user turns not answered yet)."""
    if not isinstance(messages, list) or not messages:
        raise MiniGPT2Error(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    out: list[tuple[str, bool]] = []
    pending = ""  # prompt text gathered since the last response
    for k, message in enumerate(messages, 1):
        at = f"{where}, message {k}"
        role = message.get("role") if isinstance(message, dict) else None
        if role not in CHAT_ROLES:
            raise MiniGPT2Error(f"{at}: role {role!r}; use one of {', '.join(CHAT_ROLES)}")
        content = _text(message, "content", at)
        if role == "assistant":
            out += [(pending + _chat_header(role), False), (content, True)]
            pending = ""
        else:
            pending += _chat_header(role) + content + "\n\n"
    return out, pending


def chat_prompt(
    messages: list, fmt: str, tokenizer: Tokenizer, where: str = "messages"
) -> list[int]:
    """Token ids that ask a model trained on fmt data for the next assistant message.

    Instruction models (Alpaca's template) see the last user message alone: they were trained
    on single turns. Chat models, and models trained on text or prompt/completion records,
    see the whole conversation in the chat records' template: each message under its role's
    header (### User:), each assistant message closed by end-of-text as in training, then the
    assistant's header."""
    pieces, pending = _conversation(messages, where)
    if fmt == "instruction":
        users = [m["content"] for m in messages if m["role"] == "user"]
        if not users:
            raise MiniGPT2Error(f"{where}: an instruction model needs a user message")
        return tokenizer.encode(ALPACA_NO_INPUT.format(instruction=users[-1]))
    ids: list[int] = []
    for text, is_response in [*pieces, (pending + _chat_header("assistant"), False)]:
        ids += tokenizer.encode(text) + ([tokenizer.eot_id] if is_response else [])
    return ids


def read_json_records(path: Path, what: str = "records") -> list:
    """The records of a .jsonl file (one object a line) or a .json file (a list of objects)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise MiniGPT2Error(f"cannot read {path}: {e}") from None
    if path.suffix.lower() == ".json":
        try:
            records = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as e:
            raise MiniGPT2Error(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
        if isinstance(records, dict):
            records = [records]
        if not isinstance(records, list):
            raise MiniGPT2Error(f"{path}: expected a list of records, got {type(records).__name__}")
    else:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise MiniGPT2Error(f"{path}: invalid JSON at line {n} ({e.msg})") from None
    if not records:
        raise MiniGPT2Error(f"{path} holds no {what}; it needs at least one")
    return records


def read_lines(file: Path, what: str) -> list[str]:
    """The non-empty lines of a text file, each one of what (prompts, texts)."""
    try:
        lines = [ln for ln in file.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise MiniGPT2Error(f"cannot read {file}: {e}") from None
    if not lines:
        raise MiniGPT2Error(f"{file} holds no {what}; it needs at least one")
    return lines


def read_field(file: Path, key: str, what: str) -> list[str]:
    """The string field key of every record of a .jsonl/.json file."""
    rows = read_json_records(file, what)
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get(key), str):
            raise MiniGPT2Error(f"{file}: record {n} has no string {key!r} field")
    return [row[key] for row in rows]


def read_prompts(path: str) -> list[str]:
    """Prompts of a batch file: .jsonl with one {"prompt": ...} a line, or .txt, one a line."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise MiniGPT2Error(f"batch file {path} not found")
    if file.suffix.lower() == ".txt":
        return read_lines(file, "prompts")
    if file.suffix.lower() != ".jsonl":
        raise MiniGPT2Error(f"batch file {file}: use .jsonl (one {{'prompt': ...}} a line) or .txt")
    return read_field(file, "prompt", "prompts")


@dataclass
class RecordSet:
    """Tokenized records: ids per record, which target positions count, where each came from."""

    source: str
    ids: list[np.ndarray]  # int64 token ids of the whole record
    counted: list[np.ndarray]  # bool per token: does predicting it count in the loss
    prompt_lengths: list[int]  # tokens before the first response token
    numbers: list[int]  # 1-based record numbers in the file

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: range) -> RecordSet:
        """The records at indices, in that order."""
        pick = list(indices)
        return RecordSet(
            self.source,
            [self.ids[i] for i in pick],
            [self.counted[i] for i in pick],
            [self.prompt_lengths[i] for i in pick],
            [self.numbers[i] for i in pick],
        )


def tokenize_records(
    records: list[dict], fmt: str, tokenizer: Tokenizer, mask_prompt: bool, source: str
) -> RecordSet:
    """Token ids and loss masks of records, all of one format (fmt, or detected when auto)."""
    first = detect_format(records[0])
    if fmt == "auto":
        if first is None:
            raise MiniGPT2Error(
                f"{source}: record 1 matches no record format; fields: "
                + "; ".join(f"{k}: {v}" for k, v in _FIELDS.items())
            )
        fmt = first
    if fmt == "preference":
        raise MiniGPT2Error(
            f"{source} holds preference records (chosen, rejected): train on them with "
            "--objective=dpo"
        )
    pieces, where = [], []
    for n, record in enumerate(records, 1):
        at = f"{source}: record {n}"
        if not isinstance(record, dict):
            raise MiniGPT2Error(f"{at} is a {type(record).__name__}, not an object")
        found = detect_format(record)
        if found is not None and found != fmt:
            raise MiniGPT2Error(
                f"{at} has the fields of {found} records but the file holds {fmt} records; "
                "one format per file"
            )
        if found is None:
            raise MiniGPT2Error(f"{at} lacks the fields of {fmt} records: {_FIELDS[fmt]}")
        pieces.append(segments(record, fmt, at))
        where.append(n)
    texts = [text for record in pieces for text, _ in record]
    encoded = iter(tokenizer.encode_batch(texts))
    out = RecordSet(source, [], [], [], where)
    for record in pieces:
        ids: list[int] = []
        counted: list[bool] = []
        prompt = None  # tokens before the first response
        for _, is_response in record:
            part = next(encoded) + ([tokenizer.eot_id] if is_response else [])
            if is_response and prompt is None:
                prompt = len(ids)
            ids += part
            counted += [is_response or not mask_prompt] * len(part)
        out.ids.append(np.asarray(ids, dtype=np.int64))
        out.counted.append(np.asarray(counted, dtype=bool))
        out.prompt_lengths.append(prompt)
    return out


@dataclass
class RecordData:
    """A record file split into training and validation records (the last val_fraction)."""

    format: str
    train: RecordSet
    val: RecordSet


def read_hf_records(spec: str, split: str) -> list[dict]:
    """The rows of a Hugging Face dataset split (hf:NAME[:CONFIG]) as records."""
    name, config = resolve_source(spec).hf
    check_hub(spec, name, "a local .json or .jsonl record file")
    # here for start-up time: importing datasets takes about 2 s
    try:
        import datasets

        rows = [dict(r) for r in datasets.load_dataset(name, config, split=split)]
    except Exception as e:  # offline, unknown name, bad split: one line, no traceback
        raise dataset_error(spec, e, "a local .json or .jsonl record file") from None
    if not rows:
        raise MiniGPT2Error(f"dataset {spec!r} split {split!r} holds no records")
    return rows


def load_records(
    path: str,
    fmt: str,
    tokenizer: Tokenizer,
    val_fraction: float,
    mask_prompt: bool = True,
    hf_split: str = "train",
) -> RecordData:
    """Read, check and tokenize a record file (or an hf: dataset's split); validation is its
    last val_fraction of records."""
    records, file = read_records(path, hf_split)
    found = detect_format(records[0]) if fmt == "auto" else fmt
    data = tokenize_records(records, fmt, tokenizer, mask_prompt, file)
    cut = training_share(len(records), val_fraction, file)
    return RecordData(found, data.subset(range(cut)), data.subset(range(cut, len(records))))


def read_records(path: str, hf_split: str = "train") -> tuple[list, str]:
    """(records, where they came from) of a .json/.jsonl file or an hf: dataset's split."""
    if path.startswith("hf:"):
        return read_hf_records(path, hf_split), path
    file = Path(path).expanduser()
    if not file.is_file():
        raise MiniGPT2Error(f"record file {path} not found")
    return read_json_records(file), str(file)


def training_share(count: int, val_fraction: float, source: str) -> int:
    """How many of count records train: all but the last val_fraction (at least one held out)."""
    n_val = max(1, round(count * val_fraction))
    if n_val >= count:
        raise MiniGPT2Error(
            f"{source}: {count} record(s) leave none for training after holding out "
            f"val_fraction={val_fraction} ({n_val}) for validation; add records"
        )
    return count - n_val
