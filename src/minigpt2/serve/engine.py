"""Continuous batching: one thread owns the model and decodes the next token of every running
sequence in one step; new sequences join between steps and finished ones leave at once.

Each sequence has a slot of one KVCache.slots cache, at its own length. A joining sequence's
prompt runs alone into its slot (as `minigpt2 sample` runs it); then a step feeds every live
slot's last token through the model together, each row at its own position (products read
the weights once for all rows). The whole step runs in native.c (one row: the same step as
`minigpt2 sample`'s), with float32 weights up to NATIVE_ROWS sequences and with bfloat16 and
int8 ones at any number. Every row keeps its own sampling knobs, random generator and token
history, so a sequence gets the tokens it would get alone.
"""

from __future__ import annotations

import collections
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..decode.generate import (
    Generator,
    SamplingConfig,
    fresh_seed,
    pick_tokens,
    process_logits,
    seeded_generator,
)
from ..decode.kernels import pack_beside_native
from ..decode.native import slots_attention
from ..errors import MiniGPT2Error
from ..model.attention import KVCache
from ..model.gpt import GPT

# Seconds an idle engine sleeps at most. The kernel may hand SIGTERM to any thread of the
# process; Python runs the handler only once the main thread runs Python code again, so a
# wait without a timeout could sleep through it (tests/test_serve.py reproduces that).
SIGNAL_CHECK = 0.2
# Rows up to which a float32 step runs whole in native.c (NativeDecoder.step_slots); past them
# torch's batch with oneDNN's packed products is faster, and as exact (float32 activations). A
# gpt2 float32 step in ms, native against torch (`python benchmarks/bench_engine.py
# --skip-engine --rows 2,4,8,16`): 2 rows 17.1 against 20.8, 4 rows 27.0 against 29.4, 8 rows
# 33.2 against 31.8. bfloat16 and int8 steps stay native at every size: torch's products of
# those round the activations to bfloat16, and a sequence's greedy tokens in a batch then
# differed from its tokens alone (8 at once: all 8 within 34 tokens, BENCHMARKS.md).
NATIVE_ROWS = 4


class QueueFull(MiniGPT2Error):
    """More sequences wait than the engine was told to hold."""


@dataclass
class Event:
    """What a sequence got from one step: a token (with its log-probabilities when asked), or
    its end (finish: stop, length, abort or error; token None)."""

    token: int | None = None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # the likeliest tokens and their log-probs
    finish: str | None = None


@dataclass
class Job:
    """One sequence to generate: its prompt, its knobs (a seed of its own), and emit, called
    with each Event (through the engine's deliver). cancelled may be set from any thread: the
    engine frees the row at its next step and emits nothing more."""

    prompt: list[int]
    cfg: SamplingConfig
    emit: Callable[[Event], None]
    logprobs: int | None = None  # None: none; k: the chosen token's and the k likeliest
    cancelled: bool = False


@dataclass
class _Row:
    job: Job
    seq: torch.Tensor  # (1, n): prompt and tokens so far (the repetition penalty reads it)
    generator: torch.Generator
    made: int = 0
    last: int = 0  # seq's last token, the next step's input (reading it from seq costs more)


@dataclass
class Load:
    """What the engine holds now."""

    running: int = 0
    peak: int = 0  # the most rows that ran together
    queued: int = 0
    steps: int = 0
    cancelled: int = 0  # rows freed because nobody waited for them any more
    slots: int = 0
    last_error: str | None = None


def call_each(batch: list[tuple[Callable[[Event], None], Event]]) -> None:
    """Hand each event to its job's emit."""
    for emit, event in batch:
        emit(event)


class Engine:
    """The decode loop of a server: submit() jobs from any thread; a thread of its own runs
    them, up to `slots` at once, holding at most max_queue more waiting.

    deliver(batch) receives a step's (emit, event) pairs at once, on the engine's thread; the
    default calls each emit there. A server sets it to hand the batch to its event loop in one
    wake-up a step rather than one a token (the loop's thread competes for the GIL and the
    cores)."""

    def __init__(
        self,
        model: GPT,
        vocab_limit: int,
        slots: int,
        max_queue: int,
        deliver=call_each,
        own_thread: bool = True,
    ) -> None:
        self.generator = Generator(model, vocab_limit=vocab_limit)
        self.model, self.vocab = self.generator.model, self.generator.vocab
        config, weight = self.model.config, self.model.transformer.wte.weight
        self.cache = KVCache.slots(config, slots, config.block_size, weight.device, weight.dtype)
        # float32 steps of several rows, and prompts, multiply in oneDNN's layout, a second
        # copy of the weights (the one-row native step reads the first): at 4 to 16 gpt2 rows
        # 1.03-1.28x the engine alone (BENCHMARKS.md); other dtypes get no copy
        pack_beside_native(self.model)
        self.native_rows = slots if self.generator.batch_rounds_activations else NATIVE_ROWS
        self.cache.attend = slots_attention(self.cache)  # None: torch's attention
        self.rows: list[_Row | None] = [None] * slots
        self.max_queue = max_queue
        self._pending: collections.deque[Job] = collections.deque()
        self._wake = threading.Condition()
        self._closing = False
        self.load = Load(slots=slots)
        self._native = None  # the engine thread's native decoder (steps of a few rows), or None
        self.deliver, self._outbox = deliver, []
        self._thread = None
        if own_thread:  # else the caller runs run() in a thread of its choosing
            self._thread = threading.Thread(target=self.run, name="minigpt2-engine", daemon=True)
            self._thread.start()

    def submit(self, jobs: list[Job]) -> None:
        """Queue jobs (one request's choices, all or none); QueueFull when there is no room."""
        with self._wake:
            if self._closing:
                raise QueueFull("the server is shutting down")
            if len(self._pending) + len(jobs) > self.max_queue:
                raise QueueFull(f"{len(self._pending)} sequences wait already (--max-queue)")
            self._pending.extend(jobs)
            self.load.queued = len(self._pending)
            self._wake.notify()

    def shutdown(self, wait: bool = True) -> None:
        """Take no more jobs; end the running and waiting ones (finish "abort") and stop; wait
        for the engine's thread (at most a step) unless told not to."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        if wait and self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def run(self) -> None:
        """The decode loop, in this thread, until shutdown(). A server runs it in the main
        thread: torch's and native.c's OpenMP work from another thread ran a gpt2 batch step
        of 4 rows in 47-58 ms against 36-41 from the main one (BENCHMARKS.md, serving)."""
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._pending and not self._live() and not self._closing:
                        self._wake.wait(SIGNAL_CHECK)
                    if self._closing:
                        break
                    joining = []
                    free = [i for i, row in enumerate(self.rows) if row is None]
                    while self._pending and len(joining) < len(free):
                        joining.append(self._pending.popleft())
                    self.load.queued = len(self._pending)
                try:
                    for slot, job in zip(free, joining, strict=False):
                        self._join(slot, job)
                    self._flush()  # first tokens out before the step
                    self._drop_cancelled()
                    if self._live():
                        self._step()
                except Exception as e:  # a fault ends the running rows, never the server
                    self.load.last_error = "".join(traceback.format_exception_only(e)).strip()
                    running = {id(self.rows[slot].job) for slot in self._live()}
                    for slot in self._live():
                        self._leave(slot, "error")
                    for job in joining:
                        if id(job) not in running and not job.cancelled:
                            self._outbox.append((job.emit, Event(finish="error")))
                self._flush()
            self._abort_all()

    def _flush(self) -> None:
        if self._outbox:
            batch, self._outbox = self._outbox, []
            self.deliver(batch)

    def _live(self) -> list[int]:
        return [i for i, row in enumerate(self.rows) if row is not None]

    def _join(self, slot: int, job: Job) -> None:
        """Run job's prompt into slot and pick its first token."""
        if job.cancelled:
            return
        ids = torch.tensor([job.prompt], device=self.cache.kv.device)
        logits = self.generator.prompt_into_slot(ids, self.cache, slot)  # as sample runs it
        self.cache.live[slot] = True
        seed = job.cfg.seed if job.cfg.seed is not None else fresh_seed()
        self.rows[slot] = _Row(job, ids, seeded_generator(seed, ids.device))
        # prompt_into_slot has just made sure it is current (a pass over the weights' versions,
        # 0.2 ms on gpt2): checked once a join, not at each step, and not twice here
        self._native = self.generator.native
        self.load.running = len(self._live())
        self.load.peak = max(self.load.peak, self.load.running)
        self._advance(slot, logits)

    def _step(self) -> None:
        """One token for every live row: the whole step in native.c (float32: up to
        NATIVE_ROWS rows), else a batch in torch (packed products, native.c's attention)."""
        live = self._live()
        last = [self.rows[i].last for i in live]
        if self._native is not None and len(live) <= self.native_rows:
            logits = self._native.step_slots(last, live, self.cache)[:, : self.vocab]
        else:
            top = live[-1] + 1  # rows [0, top): holes between live rows run too, unread
            idx = torch.zeros(top, 1, dtype=torch.long, device=self.cache.kv.device)
            idx[live, 0] = torch.tensor(last, device=idx.device)
            hidden = self.model.hidden_states(idx, self.cache)[live, -1]
            logits = self.model.lm_head(hidden)[:, : self.vocab]
        self.load.steps += 1
        best = [None] * len(live)  # greedy rows' picks in one operation, not one a row
        if any(self.rows[slot].job.cfg.picks_argmax for slot in live):
            best = logits.argmax(-1).tolist()
        for k, slot in enumerate(live):
            self._advance(slot, logits[k : k + 1], best[k])

    def _advance(self, slot: int, logits: torch.Tensor, best: int | None = None) -> None:
        """Pick slot's next token from its logits (1, vocab) (best: their argmax, where
        known), emit it, and end the row when it is done: end-of-text (stop), max_new_tokens
        (length) or the context's end."""
        row = self.rows[slot]
        cfg = row.job.cfg
        if best is not None and cfg.picks_argmax:
            t = best
        else:
            t = int(pick_tokens(process_logits(logits, cfg, row.seq), cfg, [row.generator])[0])
        row.seq = torch.cat([row.seq, torch.tensor([[t]], device=row.seq.device)], dim=1)
        row.made, row.last = row.made + 1, t
        if cfg.stop_at_eot and t == cfg.eot_id:
            self._leave(slot, "stop")
            return
        event = Event(token=t)
        if row.job.logprobs is not None:
            logprobs = torch.log_softmax(logits[0].float(), -1)
            event.logprob = float(logprobs[t])
            if row.job.logprobs:
                values, ids = logprobs.topk(min(row.job.logprobs, logprobs.shape[0]))
                event.top = list(zip(ids.tolist(), values.tolist(), strict=True))
        self._outbox.append((row.job.emit, event))
        full = row.seq.shape[1] >= self.model.config.block_size
        if row.made >= cfg.max_new_tokens or full:
            self._leave(slot, "length")

    def _leave(self, slot: int, finish: str | None) -> None:
        """Free slot; tell its job why it ended (None: it was cancelled, nobody listens)."""
        row, self.rows[slot] = self.rows[slot], None
        self.cache.lengths[slot], self.cache.live[slot] = 0, False
        self.load.running = len(self._live())
        if finish is not None:
            self._outbox.append((row.job.emit, Event(finish=finish)))

    def _drop_cancelled(self) -> None:
        for slot in self._live():
            if self.rows[slot].job.cancelled:
                self._leave(slot, None)
                self.load.cancelled += 1

    def _abort_all(self) -> None:
        for slot in self._live():
            self._leave(slot, "abort")
        with self._wake:
            waiting, self._pending = list(self._pending), collections.deque()
        for job in waiting:
            self._outbox.append((job.emit, Event(finish="abort")))
        self._flush()
