"""Text generation with a key/value cache: the prompt runs once, then one token per step."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import MiniGPT2Error
from ..model.gpt import GPT, KVCache
from .native import NativeDecoder


@dataclass
class SamplingConfig:
    """How to pick each next token; the semantics of transformers' generate()."""

    max_new_tokens: int = 100
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # keep the k most likely tokens (0 = all)
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p (nucleus)
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the sequence (CTRL)
    greedy: bool = False  # argmax, as do_sample=False
    stop_at_eot: bool = False  # end a sample at the end-of-text token
    eot_id: int | None = None
    seed: int | None = None  # sample i draws from a generator seeded with seed + i

    def check(self) -> SamplingConfig:
        """Refuse values with no meaning, each with a one-line message."""
        if self.temperature < 0:
            raise MiniGPT2Error(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise MiniGPT2Error(f"top_p={self.top_p} must be in (0, 1]")
        if self.top_k < 0:
            raise MiniGPT2Error(f"top_k={self.top_k} must be >= 0 (0 turns it off)")
        if self.repetition_penalty <= 0:
            raise MiniGPT2Error(f"repetition_penalty={self.repetition_penalty} must be > 0")
        if self.max_new_tokens < 1:
            raise MiniGPT2Error(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        return self

    @property
    def is_greedy(self) -> bool:
        """Argmax decoding, asked for directly or by temperature 0."""
        return self.greedy or self.temperature == 0

    @property
    def picks_argmax(self) -> bool:
        """Whether the next token is the raw logits' argmax: greedy, and no repetition
        penalty to change them first (process_logits)."""
        return self.is_greedy and self.repetition_penalty == 1.0


def process_logits(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None = None):
    """Apply repetition penalty, temperature, top-k and top-p to (B, V) logits, in that order
    (transformers' order); filtered-out entries become -inf."""
    logits = logits.float()
    if cfg.repetition_penalty != 1.0 and seen is not None:
        picked = logits.gather(1, seen)
        picked = torch.where(
            picked > 0, picked / cfg.repetition_penalty, picked * cfg.repetition_penalty
        )
        logits = logits.scatter(1, seen, picked)
    if cfg.is_greedy:
        return logits
    logits = logits / cfg.temperature
    if 0 < cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= cfg.top_p  # the mass before this token is already p
        drop[:, 0] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def pick_tokens(logits: torch.Tensor, cfg: SamplingConfig, generators: list) -> torch.Tensor:
    """Next token per row from processed logits: argmax, or a draw with each row's generator."""
    if cfg.is_greedy:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.cat(
        [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)]
    )


def fresh_seed() -> int:
    """A seed drawn from the OS, for a run given none."""
    return int.from_bytes(os.urandom(7), "little")


def seeded_generator(seed: int, device) -> torch.Generator:
    """A private generator: draws from it leave the global RNG untouched."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass
class GenerationStats:
    """What one generate() call did, for the timing line."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    finish: list[str] = field(default_factory=list)

    @property
    def tokens_per_sec(self) -> float:
        """New tokens per second per sample."""
        return self.new_tokens / self.seconds if self.seconds else 0.0


class Generator:
    """Generates from a GPT with a KV cache; several prompts (or samples) run as one batch."""

    def __init__(self, model: GPT, vocab_limit: int | None = None, native: bool = True) -> None:
        self.model = getattr(model, "_orig_mod", model).eval()
        wte = self.model.transformer.wte.weight
        vocab = vocab_limit or wte.shape[0]
        if vocab > wte.shape[0]:
            raise MiniGPT2Error(
                f"the tokenizer has {vocab} ids but the model only "
                f"{wte.shape[0]}: they do not belong together"
            )
        self.vocab = vocab  # padded ids past the tokenizer's are never picked
        self.device, self.dtype = wte.device, wte.dtype
        self.hidden_states = self.model.hidden_states
        # one-sequence steps in native.c where it runs (decode/native), made at the first such
        # call, one per thread: a decoder's scratch and logits serve one step at a time
        self.use_native, self._threads = native, threading.local()

    @property
    def native(self) -> NativeDecoder | None:
        """This thread's native decoder, if one was made."""
        return getattr(self._threads, "decoder", None)

    @native.setter
    def native(self, decoder: NativeDecoder | None) -> None:
        self._threads.decoder = decoder

    def native_decoder(self) -> NativeDecoder | None:
        """This thread's native decoder for one-sequence steps, made (again) at the first call
        and whenever the model's weights moved or changed; None where native.c cannot run."""
        if not self.use_native:
            return None
        if self.native is None or not self.native.current():
            self.native = NativeDecoder.for_model(self.model)
            self.use_native = self.native is not None  # a model it cannot read stays so
        return self.native

    def compile(self) -> Generator:
        """torch.compile the model's per-step computation (shapes vary: dynamic)."""
        self.hidden_states = torch.compile(self.model.hidden_states, dynamic=True)
        self.use_native, self.native = False, None
        return self

    def logits(self, idx: torch.Tensor, cache: KVCache | None, mask=None) -> torch.Tensor:
        """Next-token logits (B, V) after idx (left-padded where mask is 0)."""
        return self.model.lm_head(self.hidden_states(idx, cache, mask)[:, -1, :])[:, : self.vocab]

    def prompt_into_slot(self, ids: torch.Tensor, cache: KVCache, slot: int) -> torch.Tensor:
        """Logits (1, vocab) after prompt ids (1, n) run alone into slot `slot` of a slot cache
        (KVCache.slots) from its start, as stream() runs a prompt: a one-token one as a native
        step where native.c runs (a tensor the next step reuses), longer ones in torch. The
        slot's length is set after."""
        cache.lengths[slot] = 0
        alone = cache.row(slot)
        native = self.native_decoder()
        if native is not None and native.fits(alone, ids):
            logits = native.step(int(ids), alone)[:, : self.vocab]
        else:
            logits = self.logits(ids, alone)
        cache.lengths[slot] = alone.pos
        return logits

    @property
    def batch_rounds_activations(self) -> bool:
        """Whether a batch in torch would round activations to bfloat16 where a sequence alone
        runs native.c's float32 ones (bfloat16 or int8 weights): such batches step in
        native.c instead, here and in a server's engine."""
        linears = (m for m in self.model.modules() if hasattr(m, "weight"))
        return any(m.weight.dtype in (torch.bfloat16, torch.int8) for m in linears)

    def prefill(self, ids: torch.Tensor, real: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run left-padded prompts ids (real marks their tokens) into an empty cache and return
        each row's next-token logits. Rows of one length run together, so no padding is ever
        computed: with 8 prompts of 5-100 tokens that is 319 token positions instead of 800."""
        lengths, width = real.sum(1), ids.shape[1]
        # Padding columns are never written below, and masked attention still multiplies
        # their values by 0: fresh memory there could hold NaN, and 0 * NaN is NaN.
        cache.kv[:, :, :, :, :width] = 0
        last = torch.empty(ids.shape[0], self.model.config.n_embd, device=ids.device)
        for n in lengths.unique().tolist():
            rows = (lengths == n).nonzero().flatten()
            part = KVCache(self.model.config, len(rows), n, ids.device, self.dtype)
            last[rows] = self.hidden_states(ids[rows, width - n :], part)[:, -1].to(last.dtype)
            cache.kv[:, :, rows, :, width - n : width] = part.kv
        cache.mark_filled(real)
        return self.model.lm_head(last.to(self.dtype))[:, : self.vocab]

    @torch.inference_mode()
    def stream(
        self,
        prompts: list[list[int]],
        cfg: SamplingConfig,
        use_cache: bool = True,
        stats: GenerationStats | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yield the next token of every prompt, (len(prompts),), step by step.

        Prompts of different lengths run as one left-padded batch with one KV cache; each row
        gets its own mask, positions and random generator, so a row's tokens are those it
        would get alone. With stop_at_eot a finished row repeats end-of-text until all end.
        """
        cfg.check()
        block = self.model.config.block_size
        device, n = self.device, len(prompts)
        if not prompts or not all(prompts):
            raise MiniGPT2Error("empty prompt: start from the end-of-text token instead")
        prompts = [p[-block:] for p in prompts]
        width = max(map(len, prompts))
        seq = torch.zeros(n, width, dtype=torch.long, device=device)
        real = torch.zeros(n, width, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):  # left padding: every row's last token is real
            seq[i, width - len(p) :] = torch.tensor(p, device=device)
            real[i, width - len(p) :] = True
            seq[i, : width - len(p)] = p[-1]  # a seen token, so repetition_penalty ignores pads
        mask = None if bool(real.all()) else real
        base = cfg.seed if cfg.seed is not None else fresh_seed()
        gens = [seeded_generator(base + i, device) for i in range(n)]
        room = min(block, width + cfg.max_new_tokens)  # what this call can fill, no more
        stats = stats or GenerationStats()
        stats.prompt_tokens, stats.finish = sum(map(len, prompts)), ["length"] * n
        if n > 1 and use_cache and room == width + cfg.max_new_tokens:
            if self.batch_rounds_activations and self.native_decoder() is not None:
                yield from self._slot_stream(prompts, cfg, room, gens, stats)
                return
        cache = KVCache(self.model.config, n, room, device, self.dtype) if use_cache else None
        done = torch.zeros(n, dtype=torch.bool, device=device)
        native = self.native_decoder() if n == 1 and use_cache else None
        step_input, step_mask, t0 = seq, mask, time.perf_counter()
        for _ in range(cfg.max_new_tokens):
            if cache is None or cache.pos + step_input.shape[1] > block:
                # no cache, or a full one: run the last window again from position 0
                step_input = seq[:, -block:]
                step_mask = None if mask is None else mask[:, -block:]
                if cache is not None:
                    cache.reset()
            if cache is not None and step_mask is not None:  # a padded batch starts
                logits = self.prefill(step_input, step_mask, cache)
            elif native is not None and native.fits(cache, step_input):
                logits = native.step(int(step_input), cache)[:, : self.vocab]
            else:
                logits = self.logits(step_input, cache, step_mask)
            token = pick_tokens(process_logits(logits, cfg, seq), cfg, gens)
            if cfg.stop_at_eot and cfg.eot_id is not None:
                token = torch.where(done, cfg.eot_id, token)
            seq = torch.cat([seq, token[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, torch.ones_like(token, dtype=torch.bool)[:, None]], 1)
            step_input, step_mask = token[:, None], None
            stats.new_tokens += 1
            yield token
            if cfg.stop_at_eot and cfg.eot_id is not None:
                for i in (token == cfg.eot_id).logical_and(~done).nonzero().flatten().tolist():
                    stats.finish[i] = "eot"
                done |= token == cfg.eot_id
                if bool(done.all()):
                    break
        stats.seconds = time.perf_counter() - t0

    def _slot_stream(self, prompts, cfg: SamplingConfig, room: int, gens, stats) -> Iterator:
        """stream() for several prompts that each run alone into a slot of one cache (as
        `minigpt2 serve` runs them), then step together in native.c with float32 activations:
        each row's tokens are those it gets alone, which a batch through torch's bfloat16
        products did not give (BENCHMARKS.md, batched decoding). Finished rows repeat
        end-of-text."""
        n, native = len(prompts), self.native
        cache = KVCache.slots(self.model.config, n, room, self.device, self.dtype)
        seqs = [torch.tensor([p], device=self.device) for p in prompts]
        t0 = time.perf_counter()  # each prompt's logits copied: a native step's are reused
        logits = torch.cat(
            [self.prompt_into_slot(seq, cache, i).clone() for i, seq in enumerate(seqs)]
        )
        live = list(range(n))
        token = torch.full((n,), -1 if cfg.eot_id is None else cfg.eot_id, device=self.device)
        for step in range(cfg.max_new_tokens):
            if step:  # the live rows' last tokens, each at its own slot's length
                ids = [int(token[i]) for i in live]
                logits = native.step_slots(ids, live, cache)[:, : self.vocab]
            for k, i in enumerate(live):
                row = process_logits(logits[k : k + 1], cfg, seqs[i])
                token[i] = pick_tokens(row, cfg, [gens[i]])[0]
                seqs[i] = torch.cat([seqs[i], token[i].view(1, 1)], dim=1)
            stats.new_tokens += 1
            yield token.clone()
            if cfg.stop_at_eot and cfg.eot_id is not None:
                for i in [i for i in live if int(token[i]) == cfg.eot_id]:
                    stats.finish[i] = "eot"
                    live.remove(i)
            if not live:
                break
        stats.seconds = time.perf_counter() - t0

    def generate(
        self,
        prompts: list[list[int]],
        cfg: SamplingConfig,
        use_cache: bool = True,
        stats: GenerationStats | None = None,
    ) -> list[list[int]]:
        """New token ids of each prompt (cut after end-of-text when stop_at_eot)."""
        steps = list(self.stream(prompts, cfg, use_cache, stats))
        out = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in prompts]
        if cfg.stop_at_eot and cfg.eot_id is not None:
            out = [row[: row.index(cfg.eot_id) + 1] if cfg.eot_id in row else row for row in out]
        return out
