"""OpenAI's request and reply shapes: reading a request's fields strictly (each bad one a 400
naming it), and the objects a completion or chat completion returns, whole or in chunks, with
their logprobs."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field

from ..data.records import chat_prompt
from ..decode.generate import SamplingConfig
from ..errors import MiniGPT2Error


class ApiError(MiniGPT2Error):
    """A request the server refuses: an HTTP status and OpenAI's error object."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code
        kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error"}
        self.kind = kinds.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        """OpenAI's error object."""
        fields = {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}
        return {"error": fields}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    """A 400 naming the field at fault."""
    return ApiError(400, message, param, code)


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object."""
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"the body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad(f"the body must be a JSON object, not {type(body).__name__}")
    return body


_KINDS = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def field_of(body: dict, name: str, kind: type, default):
    """body[name] checked to be of kind (float takes integers too; bool is no integer here);
    missing or null gives default."""
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    if not ok:
        raise bad(f"'{name}' must be {_KINDS[kind]}, not {json.dumps(value)[:40]}", name)
    return float(value) if kind is float else value


@dataclass
class Knobs:
    """A request's generation settings, as read from its body."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None  # how many likeliest tokens with each; None: no logprobs
    ignore_eos: bool = False

    def sampling(self, eot_id: int, choice: int) -> SamplingConfig:
        """The SamplingConfig of one choice: choice i draws with seed + i, as sample's i-th."""
        return SamplingConfig(
            max_new_tokens=self.max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            stop_at_eot=not self.ignore_eos,
            eot_id=eot_id,
            seed=None if self.seed is None else self.seed + choice,
        )


def read_knobs(body: dict, chat: bool, default_max: int, most_choices: int) -> Knobs:
    """The knobs of a completion (chat: a chat completion) request, each checked."""
    k = Knobs(max_tokens=field_of(body, "max_tokens", int, default_max))
    if chat and body.get("max_completion_tokens") is not None:  # the newer name
        k.max_tokens = field_of(body, "max_completion_tokens", int, default_max)
    if k.max_tokens < 1:
        raise bad(f"'max_tokens' must be at least 1, not {k.max_tokens}", "max_tokens")
    k.temperature = field_of(body, "temperature", float, 1.0)
    if k.temperature < 0:
        raise bad(f"'temperature' must be >= 0 (0: greedy), not {k.temperature}", "temperature")
    k.top_p = field_of(body, "top_p", float, 1.0)
    if not 0 < k.top_p <= 1:
        raise bad(f"'top_p' must be in (0, 1], not {k.top_p}", "top_p")
    k.top_k = field_of(body, "top_k", int, 0)
    if k.top_k < 0:
        raise bad(f"'top_k' must be >= 0 (0: off), not {k.top_k}", "top_k")
    k.repetition_penalty = field_of(body, "repetition_penalty", float, 1.0)
    if k.repetition_penalty <= 0:
        raise bad("'repetition_penalty' must be > 0 (1: off)", "repetition_penalty")
    k.seed = field_of(body, "seed", int, None)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (
        isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)
    ):
        raise bad("'stop' must be a non-empty string or a list of them", "stop")
    k.stop = stop or []
    k.n = field_of(body, "n", int, 1)
    if not 1 <= k.n <= most_choices:
        raise bad(f"'n' must be from 1 to {most_choices} (--max-batch), not {k.n}", "n")
    k.stream = field_of(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    k.include_usage = field_of(options or {}, "include_usage", bool, False)
    k.ignore_eos = field_of(body, "ignore_eos", bool, False)
    if chat:
        if field_of(body, "logprobs", bool, False):
            k.logprobs = field_of(body, "top_logprobs", int, 0)
    else:
        k.echo = field_of(body, "echo", bool, False)
        k.logprobs = field_of(body, "logprobs", int, None)
    if k.logprobs is not None and not 0 <= k.logprobs <= 20:
        raise bad(f"logprobs must ask for 0 to 20 tokens, not {k.logprobs}", "logprobs")
    return k


def completion_prompts(body: dict, tokenizer) -> list[list[int]]:
    """The prompts of a completion request as token ids: a string, a list of strings, a list
    of token ids, or a list of such lists."""
    prompt = body.get("prompt")
    vocab = tokenizer.vocab_size
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(_is_ids(p, vocab) for p in [prompt]):
        prompt = [prompt]
    if not isinstance(prompt, list) or not prompt:
        raise bad("'prompt' must be a string, a list of strings, or token ids", "prompt")
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append(tokenizer.encode(p) or [tokenizer.eot_id])
        elif _is_ids(p, vocab) and p:
            out.append(list(p))
        else:
            raise bad(f"'prompt' holds {json.dumps(p)[:40]}: strings or token ids", "prompt")
    return out


def _is_ids(p, vocab: int) -> bool:
    ok = isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)
    return ok and all(0 <= t < vocab for t in p)


def chat_prompt_ids(body: dict, fmt: str, tokenizer) -> list[int]:
    """The prompt of a chat request: its messages in the model's template."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list of {role, content}", "messages")
    try:
        return chat_prompt(messages, fmt, tokenizer)
    except MiniGPT2Error as e:
        raise bad(str(e), "messages") from None


def check_context(prompt: int, max_tokens: int, block: int, param: str) -> None:
    """A 400 when the prompt and max_tokens do not fit the context, saying by how much."""
    if prompt + max_tokens > block:
        raise bad(
            f"this model's context is {block} tokens, but {prompt + max_tokens} were asked for "
            f"({prompt} in the {param}, {max_tokens} to generate): {prompt + max_tokens - block} "
            "too many; shorten the prompt or lower max_tokens",
            param,
            "context_length_exceeded",
        )


def new_id(prefix: str) -> str:
    """An id as OpenAI's look: a prefix and random hex."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def envelope(kind: str, ident: str, model: str, created: int | None = None) -> dict:
    """The fields every reply and chunk starts with."""
    return {"id": ident, "object": kind, "created": created or int(time.time()), "model": model}


def usage(prompt: int, completion: int) -> dict:
    """OpenAI's token counts."""
    total = prompt + completion
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode_bytes([token]).decode("utf-8", "replace")


def completion_logprobs(tokenizer, entries: list, at: int = 0) -> dict:
    """OpenAI's legacy logprobs object for completion tokens (token, logprob, top) from
    character offset at."""
    tokens, offsets = [], []
    for token, _, _ in entries:
        tokens.append(_token_text(tokenizer, token))
        offsets.append(at)
        at += len(tokens[-1])
    return {
        "tokens": tokens,
        "token_logprobs": [lp for _, lp, _ in entries],
        "top_logprobs": [_by_text(tokenizer, top) for _, _, top in entries],
        "text_offset": offsets,
    }


def _by_text(tokenizer, top: list[tuple[int, float]]) -> dict[str, float]:
    """The likeliest tokens as {text: logprob}; tokens of the same text keep the likeliest."""
    out: dict[str, float] = {}
    for token, value in top:
        out.setdefault(_token_text(tokenizer, token), value)
    return out


def chat_logprobs(tokenizer, entries: list) -> dict:
    """The chat API's logprobs object: content, a list of tokens with their alternatives."""

    def one(token: int, lp: float) -> dict:
        raw = tokenizer.decode_bytes([token])
        return {"token": raw.decode("utf-8", "replace"), "logprob": lp, "bytes": list(raw)}

    content = [
        {**one(t, lp), "top_logprobs": [one(a, b) for a, b in top]} for t, lp, top in entries
    ]
    return {"content": content}
