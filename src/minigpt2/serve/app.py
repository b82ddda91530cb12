"""The HTTP side of `minigpt2 serve`: OpenAI's completion and chat endpoints over an Engine,
whole or streamed as server-sent events, with the chat page at /.

Each request becomes one Job per choice; the engine's thread hands each token to the
request's asyncio queue. A client that goes away cancels its jobs, which frees their rows at
the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from ..decode.text import ChoiceText
from ..errors import MiniGPT2Error
from .engine import Engine, Event, Job, QueueFull, call_each
from .protocol import (
    ApiError,
    Knobs,
    bad,
    chat_logprobs,
    chat_prompt_ids,
    check_context,
    completion_logprobs,
    completion_prompts,
    envelope,
    new_id,
    parse_json,
    read_knobs,
    usage,
)


@dataclass
class Served:
    """What the app serves: the engine, the model's tokenizer and template, the settings."""

    engine: Engine
    tokenizer: object
    data_format: str  # the checkpoint's data_format: picks the chat template
    name: str  # the model's id in /v1/models and in replies
    api_key: str | None = None
    max_body: int = 1 << 20  # bytes a request body may hold
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class _Choice:
    index: int
    prompt: list[int]
    text: ChoiceText
    job: Job | None = None
    tokens: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list]] = field(default_factory=list)
    finish: str | None = None


class _Run:
    """One request's choices in the engine, and the queue their events come back on."""

    def __init__(self, served: Served, prompts: list[list[int]], knobs: Knobs) -> None:
        self.served, self.knobs = served, knobs
        self.queue: asyncio.Queue = asyncio.Queue()
        self.choices = []
        for p, prompt in enumerate(prompts):
            for j in range(knobs.n):
                choice = _Choice(p * knobs.n + j, prompt, ChoiceText(served.tokenizer, knobs.stop))
                choice.job = Job(
                    prompt,
                    knobs.sampling(served.tokenizer.eot_id, j),
                    self._emitter(choice.index),
                    knobs.logprobs,
                )
                self.choices.append(choice)
        served.engine.submit([c.job for c in self.choices])
        self.prompt_tokens = sum(map(len, prompts))

    def _emitter(self, index: int):
        def emit(event: Event) -> None:  # on the event loop's thread: see deliver_to
            self.queue.put_nowait((index, event))

        return emit

    def cancel(self) -> None:
        """Free every row of this request still running."""
        for c in self.choices:
            c.job.cancelled = True

    async def pieces(self) -> AsyncIterator[tuple[_Choice, str, bool]]:
        """(choice, new text, whether it just finished) as tokens arrive, until all finish."""
        open_ = len(self.choices)
        while open_:
            index, event = await self.queue.get()
            choice = self.choices[index]
            if choice.finish is not None:
                continue  # events sent before a stop string ended it
            if event.token is None:
                choice.finish = event.finish
                open_ -= 1
                yield choice, choice.text.flush(), True
                continue
            choice.tokens.append(event.token)
            if event.logprob is not None:
                choice.logprobs.append((event.token, event.logprob, event.top or []))
            piece = choice.text.add(event.token)
            if choice.text.stopped:
                choice.job.cancelled, choice.finish = True, "stop"
                open_ -= 1
            yield choice, piece, choice.finish is not None

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.tokens) for c in self.choices)


def deliver_to(loop: asyncio.AbstractEventLoop):
    """An Engine's deliver for requests served on loop: a step's events reach their queues in
    one call on the loop's thread."""

    def deliver(batch: list) -> None:
        try:
            loop.call_soon_threadsafe(call_each, batch)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    return deliver


async def _read_body(request: Request, limit: int) -> dict:
    """The JSON body, refused (413) past limit bytes whatever Content-Length says."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the body is over {limit} bytes (--max-body)")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise ApiError(413, f"the body is over {limit} bytes (--max-body)")
    return parse_json(bytes(raw))


class _KeyGate:
    """Refuses /v1/ requests without the API key (401). Plain ASGI, not Starlette's
    BaseHTTPMiddleware: that one passes every streamed chunk through a task and a memory
    stream of its own (the HTTP side's CPU a streamed token, int8 gpt2 at one client, medians
    of 3 alternated runs: 482 us with it, 339 without)."""

    def __init__(self, app, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                e = ApiError(401, "a wrong or missing API key", code="invalid_api_key")
                await JSONResponse(e.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(served: Served) -> FastAPI:
    """The FastAPI application serving one model."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        served.engine.deliver = deliver_to(asyncio.get_running_loop())
        yield

    app = FastAPI(
        title="minigpt2", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan
    )
    block = served.engine.model.config.block_size
    slots = served.engine.load.slots

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status == 503 else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    if served.api_key:
        app.add_middleware(_KeyGate, key=served.api_key)

    @app.get("/health")
    async def health() -> dict:
        load = served.engine.load
        counts = {k: getattr(load, k) for k in ("running", "queued", "steps", "peak", "cancelled")}
        return {"status": "ok"} | counts

    @app.get("/v1/models")
    async def models() -> dict:
        card = {"id": served.name, "object": "model", "created": served.created}
        return {"object": "list", "data": [card | {"owned_by": "minigpt2"}]}

    @app.get("/")
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files(__package__).joinpath("page.html").read_text())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await _read_body(request, served.max_body)
        knobs = read_knobs(body, chat=False, default_max=16, most_choices=slots)
        prompts = completion_prompts(body, served.tokenizer)
        for prompt in prompts:
            check_context(len(prompt), knobs.max_tokens, block, "prompt")
        return await _answer(served, request, prompts, knobs, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body = await _read_body(request, served.max_body)
        prompt = chat_prompt_ids(body, served.data_format, served.tokenizer)
        room = max(1, block - len(prompt))  # by default a reply may fill the context
        knobs = read_knobs(body, chat=True, default_max=room, most_choices=slots)
        check_context(len(prompt), knobs.max_tokens, block, "messages")
        return await _answer(served, request, [prompt], knobs, chat=True)

    return app


async def _answer(
    served: Served, request: Request, prompts: list[list[int]], knobs: Knobs, chat: bool
) -> Response:
    """Start the request's jobs; reply whole, or stream the reply."""
    try:
        run = _Run(served, prompts, knobs)
    except QueueFull as e:
        raise ApiError(503, f"the server is busy: {e}; retry later") from None
    except MiniGPT2Error as e:
        raise bad(str(e)) from None
    ident = new_id("chatcmpl" if chat else "cmpl")
    if knobs.stream:
        events = _stream(served, run, ident, chat)
        return StreamingResponse(events, media_type="text/event-stream")
    watch = asyncio.create_task(_watch_disconnect(request, run))
    try:
        texts = {c.index: "" for c in run.choices}
        async for choice, piece, _ in run.pieces():
            texts[choice.index] += piece
    finally:
        watch.cancel()
        run.cancel()
    return JSONResponse(_whole(served, run, ident, chat, texts))


async def _watch_disconnect(request: Request, run: _Run) -> None:
    """Cancel run's jobs when the client of a whole (not streamed) reply goes away."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.2)
    run.cancel()


def _whole(served: Served, run: _Run, ident: str, chat: bool, texts: dict) -> dict:
    """The reply object of a finished request."""
    tok = served.tokenizer
    choices = []
    for c in run.choices:
        if chat:
            logprobs = chat_logprobs(tok, c.logprobs) if run.knobs.logprobs is not None else None
            message = {"role": "assistant", "content": texts[c.index]}
            item = {"index": c.index, "message": message, "logprobs": logprobs}
        else:
            text = (tok.decode(c.prompt) if run.knobs.echo else "") + texts[c.index]
            asked = run.knobs.logprobs is not None
            logprobs = completion_logprobs(tok, c.logprobs) if asked else None
            item = {"index": c.index, "text": text, "logprobs": logprobs}
        choices.append(item | {"finish_reason": c.finish})
    kind = "chat.completion" if chat else "text_completion"
    reply = envelope(kind, ident, served.name) | {"choices": choices}
    return reply | {"usage": usage(run.prompt_tokens, run.completion_tokens)}


async def _stream(served: Served, run: _Run, ident: str, chat: bool) -> AsyncIterator[str]:
    """Server-sent events: a chunk per new piece of text, a last one per choice with its
    finish_reason, usage when asked, then [DONE]. Leaving early (the client went away)
    frees the request's rows."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    head = envelope(kind, ident, served.name)
    tok = served.tokenizer

    def chunk(index: int, piece: dict | str, finish: str | None, logprobs=None) -> str:
        key = "delta" if chat else "text"
        item = {"index": index, key: piece, "logprobs": logprobs, "finish_reason": finish}
        return _sse(head | {"choices": [item]})

    try:
        for c in run.choices:
            if chat:
                yield chunk(c.index, {"role": "assistant", "content": ""}, None)
            elif run.knobs.echo:
                yield chunk(c.index, tok.decode(c.prompt), None)
        async for choice, piece, finished in run.pieces():
            logprobs = None
            if run.knobs.logprobs is not None and choice.logprobs and piece:
                entry = choice.logprobs[-1:]
                logprobs = chat_logprobs(tok, entry) if chat else completion_logprobs(tok, entry)
            if piece:
                yield chunk(choice.index, {"content": piece} if chat else piece, None, logprobs)
            if finished:
                yield chunk(choice.index, {} if chat else "", choice.finish)
        if run.knobs.include_usage:
            counts = usage(run.prompt_tokens, run.completion_tokens)
            yield _sse(head | {"choices": [], "usage": counts})
        yield _sse("[DONE]")
    finally:
        run.cancel()
