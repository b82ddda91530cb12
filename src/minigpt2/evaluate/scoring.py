"""Measuring a model: log-likelihoods of continuations, sliding-window perplexity, HellaSwag.

One primitive serves every task: score_continuations() runs each context once into a KV
cache (rows of one length together, so padding is never computed), repeats the cached rows for
the context's continuations and runs those as one right-padded batch. HellaSwag's four endings,
perplexity's windows and lm-evaluation-harness requests are all contexts with continuations.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..data.sources import dataset_error, resolve_source
from ..decode.generate import Generator
from ..errors import MiniGPT2Error
from ..model.gpt import GPT, KVCache

HEAD_CHUNK = 1024  # positions whose logits exist at once (1024 x 50257 float32 = 206 MB)
ROWS_PER_PASS = 16  # continuations per forward pass, sorted by length: little padding


class Score(NamedTuple):
    """How a model scores one continuation after its context."""

    logprob: float  # summed log-probability of the continuation's tokens, in nats
    tokens: int
    greedy: bool  # every token was the model's argmax


Group = tuple[list[int], list[list[int]]]  # a context and its continuations


def _fit(group: Group, block: int) -> list[Group]:
    """A group as groups that fit the context window: when context plus continuation is longer
    than block + 1 tokens, each continuation keeps the last tokens it can (lm-eval's rule)."""
    ctx, conts = group
    if not ctx:
        raise MiniGPT2Error("a continuation needs a context of at least one token")
    if len(ctx) + max(map(len, conts)) <= block + 1:
        return [group]
    out = []
    for cont in conts:
        if not 0 < len(cont) <= block:
            raise MiniGPT2Error(f"a continuation of {len(cont)} tokens does not fit the context")
        whole = (ctx + cont)[-(block + 1) :]
        out.append((whole[: -len(cont)], [cont]))
    return out


@torch.inference_mode()
def _score_batch(model: GPT, groups: list[Group]) -> list[list[Score]]:
    """Scores of one batch of groups (each fitting the context window): the contexts run once
    into a cache, then the continuations, shortest first, ROWS_PER_PASS rows a pass so that
    each pass pads little."""
    device, dtype = model.transformer.wte.weight.device, model.transformer.wte.weight.dtype
    width = max(len(c) for c, _ in groups)
    longest = max(len(t) for _, conts in groups for t in conts)
    ids = torch.zeros(len(groups), width, dtype=torch.long, device=device)
    real = torch.zeros(len(groups), width, dtype=torch.bool, device=device)
    for i, (ctx, _) in enumerate(groups):  # contexts left-padded: their last tokens line up
        ids[i, width - len(ctx) :], real[i, width - len(ctx) :] = torch.tensor(ctx), True
    cache = KVCache(model.config, len(groups), width + longest, device, dtype)
    first = Generator(model).prefill(ids, real, cache)  # (groups, V): each context's next token
    rows = [g for g, (_, conts) in enumerate(groups) for _ in conts]
    conts = [t for _, cs in groups for t in cs]
    scores: list = [None] * len(conts)
    order = sorted(range(len(conts)), key=lambda r: len(conts[r]))
    for start in range(0, len(order), ROWS_PER_PASS):
        part = order[start : start + ROWS_PER_PASS]
        done = _score_rows(model, cache, first, [rows[r] for r in part], [conts[r] for r in part])
        for r, score in zip(part, done, strict=True):
            scores[r] = score
    out, k = [], 0
    for _, cs in groups:
        out.append(scores[k : k + len(cs)])
        k += len(cs)
    return out


def _score_rows(model: GPT, cache, first, ctx_rows: list[int], conts: list[list[int]]):
    """Scores of continuations after the cached contexts ctx_rows (first: their logits)."""
    device = first.device
    index = torch.tensor(ctx_rows, device=device)
    longest = max(map(len, conts))
    targets = torch.full((len(conts), longest), -1, dtype=torch.long, device=device)
    for r, t in enumerate(conts):
        targets[r, : len(t)] = torch.tensor(t)
    nll = torch.zeros_like(targets, dtype=torch.float32)
    hit = torch.ones_like(targets, dtype=torch.bool)
    logits0 = first[index].float()
    nll[:, 0] = F.cross_entropy(logits0, targets[:, 0], reduction="none")
    hit[:, 0] = logits0.argmax(-1) == targets[:, 0]
    if longest > 1:  # continuation tokens but each row's last are inputs, right-padded
        inputs = targets[:, :-1].clamp(min=0)
        hidden = model.hidden_states(inputs, cache.select_rows(index), targets[:, 1:] >= 0)
        where = (targets[:, 1:] >= 0).nonzero()  # only positions that are scored
        for start in range(0, len(where), HEAD_CHUNK):
            r, j = where[start : start + HEAD_CHUNK].unbind(1)
            logits = model.lm_head(hidden[r, j]).float()
            nll[r, j + 1] = F.cross_entropy(logits, targets[r, j + 1], reduction="none")
            hit[r, j + 1] = logits.argmax(-1) == targets[r, j + 1]
    counted = targets >= 0
    sums = (nll.double() * counted).sum(1).tolist()
    greedy = (hit | ~counted).all(1).tolist()
    return [Score(-s, len(t), g) for s, t, g in zip(sums, conts, greedy, strict=True)]


def score_continuations(
    model: GPT,
    groups: list[Group],
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> list[list[Score]]:
    """Score of every continuation of every (context, continuations) group, in order. Runs
    batch_size groups at a time; progress(n) is called after each batch with its group count."""
    block = model.config.block_size
    pieces = [(g, part) for g, group in enumerate(groups) for part in _fit(group, block)]
    last = {g: i for i, (g, _) in enumerate(pieces)}  # a group is done with its last piece
    results: list[list[Score]] = [[] for _ in groups]
    for start in range(0, len(pieces), batch_size):
        batch = pieces[start : start + batch_size]
        for (g, _), scores in zip(batch, _score_batch(model, [p for _, p in batch]), strict=True):
            results[g] += scores
        if progress is not None:
            progress(sum(last[g] == start + i for i, (g, _) in enumerate(batch)))
    return results


def perplexity_windows(n: int, block: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, first scored, end) of Hugging Face's sliding windows over n tokens: windows of
    the context start every stride tokens, and each scores the tokens no earlier window did."""
    if not 1 <= stride <= block:
        raise MiniGPT2Error(f"stride={stride} must be between 1 and the context ({block})")
    if n < 2:
        raise MiniGPT2Error(f"the text is {n} token(s); perplexity needs at least 2")
    out, scored_to = [], 1  # token 0 has no context: it is never scored
    for begin in range(0, n, stride):
        end = min(begin + block, n)
        out.append((begin, max(scored_to, begin + 1), end))
        scored_to = end
        if end == n:
            break
    return out


def perplexity(
    model: GPT, tokens: np.ndarray, stride: int, batch_size: int = 4, progress=None
) -> dict:
    """Token-weighted mean NLL (nats) of tokens under sliding windows: tokens, nll, nll_sum,
    perplexity."""
    windows = perplexity_windows(len(tokens), model.config.block_size, stride)
    ids = tokens.tolist()
    groups = [(ids[b:first], [ids[first:end]]) for b, first, end in windows]
    scores = [s[0] for s in score_continuations(model, groups, batch_size, progress)]
    total, count = -sum(s.logprob for s in scores), sum(s.tokens for s in scores)
    return {
        "tokens": count,
        "nll": total / count,
        "nll_sum": total,
        "perplexity": math.exp(min(total / count, 700.0)),
    }


def read_hellaswag(spec: str, limit: int | None = None) -> list[dict]:
    """HellaSwag examples (ctx, endings, label) from a JSONL file in the original release's
    format, or hf:NAME (the validation split of a dataset with those fields)."""
    if spec.startswith("hf:"):
        name, config = resolve_source(spec).hf
        # here for start-up time: importing datasets takes about 2 s
        try:
            import datasets

            rows = [dict(r) for r in datasets.load_dataset(name, config, split="validation")]
        except Exception as e:  # offline, unknown name: one line
            raise dataset_error(spec, e, "a local HellaSwag .jsonl file") from None
        where = [f"{spec}: example {n}" for n in range(1, len(rows) + 1)]
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise MiniGPT2Error(f"HellaSwag file {spec} not found")
        rows, where = [], []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise MiniGPT2Error(f"{path}: invalid JSON at line {n} ({e.msg})") from None
                where.append(f"{path}: line {n}")
    rows, where = rows[:limit], where[:limit]
    for row, at in zip(rows, where, strict=True):
        _check_example(row, at)
    if not rows:
        raise MiniGPT2Error(f"{spec} holds no HellaSwag examples")
    return rows


def _check_example(row, at: str) -> None:
    if not isinstance(row, dict) or not isinstance(row.get("ctx"), str):
        raise MiniGPT2Error(f"{at}: a HellaSwag example needs ctx, endings and label")
    endings = row.get("endings")
    if not isinstance(endings, list) or not endings or not all(isinstance(e, str) for e in endings):
        raise MiniGPT2Error(f"{at}: endings must be a non-empty list of strings")
    try:
        label = int(row.get("label"))
    except (TypeError, ValueError):
        raise MiniGPT2Error(f"{at}: label {row.get('label')!r} is not a number") from None
    if not 0 <= label < len(endings):
        raise MiniGPT2Error(f"{at}: label {label} is out of range for {len(endings)} endings")
    row["label"] = label


def hellaswag_groups(tokenizer, examples: list[dict]) -> list[Group]:
    """Each example as its context and endings, tokenized as llm.c does: " " + ending."""
    return [
        (tokenizer.encode(ex["ctx"]), [tokenizer.encode(" " + e) for e in ex["endings"]])
        for ex in examples
    ]


def hellaswag_correct(
    model: GPT, groups: list[Group], labels: list[int], batch_size: int = 8, progress=None
) -> tuple[int, int]:
    """(right by summed loss, right by mean loss per token) over the examples."""
    scores = score_continuations(model, groups, batch_size, progress)
    acc = acc_norm = 0
    for label, endings in zip(labels, scores, strict=True):
        acc += int(np.argmax([s.logprob for s in endings])) == label
        acc_norm += int(np.argmax([s.logprob / s.tokens for s in endings])) == label
    return acc, acc_norm


def hellaswag(model: GPT, tokenizer, examples: list[dict], batch_size: int = 8, progress=None):
    """HellaSwag as llm.c scores it: each ending is " " + ending after the context, acc picks
    the lowest summed loss, acc_norm the lowest mean loss per token. (lm-eval's acc_norm
    divides by the ending's length in bytes instead.)"""
    labels = [ex["label"] for ex in examples]
    acc, acc_norm = hellaswag_correct(
        model, hellaswag_groups(tokenizer, examples), labels, batch_size, progress
    )
    n = len(examples)
    return {"examples": n, "acc": acc / n, "acc_norm": acc_norm / n}
