"""`minigpt2 sample --model M --prompt ...`: stream samples, or decode a file of prompts."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from ..data.records import RECORD_FORMATS, read_prompts, wrap_prompt
from ..decode.generate import GenerationStats, Generator, SamplingConfig
from ..decode.text import ChoiceText
from ..errors import MiniGPT2Error
from .options import add_model_options, add_sampling_options, load_for_generation


def parser() -> argparse.ArgumentParser:
    """The command's options."""
    p = argparse.ArgumentParser(
        prog="minigpt2 sample",
        description="Generate text from a GPT-2.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_options(p, "out/quickstart")
    p.add_argument("--prompt", default="", help="prompt text, or - to read standard input")
    p.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    p.add_argument(
        "--batch-file",
        default=None,
        help="many prompts: .jsonl ({'prompt': ...} a line) or .txt (one a line); writes one "
        "JSON object per prompt, in order",
    )
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    p.add_argument(
        "--raw",
        action="store_true",
        help="a model trained on records: use the prompt as it is, not in its template",
    )
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to add (None: 100)")
    p.add_argument("--max-length", type=int, default=None, help="prompt plus new tokens")
    add_sampling_options(p, temperature=1.0)
    p.add_argument("--greedy", action="store_true", help="argmax decoding (do_sample=False)")
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--stop-at-eot", action="store_true", help="end a sample at <|endoftext|>")
    p.add_argument("--json", action="store_true", help="one JSON object per sample")
    p.add_argument("--no-cache", action="store_true", help="recompute the context every step")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder")
    return p


def _read_prompt(args) -> str:
    if args.prompt_file is not None:
        if args.prompt_file == "-":
            return sys.stdin.read()
        try:
            return Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise MiniGPT2Error(f"cannot read prompt file {args.prompt_file}: {e}") from None
    return sys.stdin.read() if args.prompt == "-" else args.prompt


def _prompt_ids(tok, text: str, block: int) -> list[int]:
    """Token ids of a prompt, keeping the last block of a prompt longer than the context."""
    prompt = tok.encode(text) or [tok.eot_id]
    if len(prompt) > block:
        print(
            f"warning: the prompt's {len(prompt)} tokens exceed the context ({block}); "
            f"keeping its last {block}",
            file=sys.stderr,
        )
    return prompt[-block:]


def sample_main(argv: list[str]) -> int:
    """Stream samples to stdout (or one JSON object per sample), timing to stderr."""

    args = parser().parse_args(argv)
    for name in ("num_samples", "batch_size", "max_new_tokens", "max_length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise MiniGPT2Error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.batch_file and (args.prompt or args.prompt_file):
        raise MiniGPT2Error(
            "give prompts with --batch-file or with --prompt/--prompt-file, not both"
        )
    texts = read_prompts(args.batch_file) if args.batch_file else [_read_prompt(args)]
    at_once = args.num_samples * (min(args.batch_size, len(texts)) if args.batch_file else 1)
    model, header, tok = load_for_generation(args, at_once, pack=not args.compile)
    fmt = (header or {}).get("data_format", "text")
    template = fmt in RECORD_FORMATS and not args.raw  # as the model saw prompts in training
    block = model.config.block_size
    prompts = [_prompt_ids(tok, wrap_prompt(fmt, t) if template else t, block) for t in texts]
    longest = max(map(len, prompts))
    if args.max_new_tokens is None and args.max_length is not None:
        if args.max_length <= longest:
            raise MiniGPT2Error(
                f"--max-length={args.max_length} is not above the prompt's {longest} tokens"
            )
        args.max_new_tokens = args.max_length - longest
    cfg = SamplingConfig(
        max_new_tokens=100 if args.max_new_tokens is None else args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        greedy=args.greedy,
        stop_at_eot=args.stop_at_eot or template,
        eot_id=tok.eot_id,
        seed=args.seed,
    ).check()
    gen = Generator(model, vocab_limit=tok.vocab_size)
    if args.compile:
        gen.compile()
    if args.batch_file:
        _sample_batch_file(gen, args, cfg, tok, texts, prompts)
        return 0
    stats = GenerationStats()
    _sample_prompt(gen, args, cfg, tok, texts[0], prompts[0], stats, echo=not template)
    print(
        f"prompt tokens: {stats.prompt_tokens}, new tokens: {stats.new_tokens} x "
        f"{args.num_samples}, {stats.seconds:.2f} s, {stats.tokens_per_sec:.1f} tokens/s",
        file=sys.stderr,
    )
    return 0


def _body(tok, cfg, row: list[int]) -> str:
    """A sample's text (without its end-of-text when generation stops there)."""
    return tok.decode([t for t in row if t != tok.eot_id] if cfg.stop_at_eot else row)


def _sample_json(text: str, tok, cfg, row: list[int], finish: str, **extra) -> str:
    """One sample as a JSON object: prompt, text, token_ids, finish_reason."""
    body = _body(tok, cfg, row)
    fields = {"prompt": text, "text": body, "token_ids": row, "finish_reason": finish, **extra}
    return json.dumps(fields, ensure_ascii=False)


def _sample_prompt(gen, args, cfg, tok, text, prompt, stats, echo: bool) -> None:
    """One prompt, num_samples samples: streamed text, or a block / JSON object per sample."""
    steps = gen.stream([prompt] * args.num_samples, cfg, not args.no_cache, stats)
    streaming = args.num_samples == 1 and not args.json
    shown = ChoiceText(tok, [])  # whole characters only
    rows: list[list[int]] = [[] for _ in range(args.num_samples)]
    if streaming and echo:
        sys.stdout.write(text)
    for token in steps:
        for row, t in zip(rows, token.tolist(), strict=True):
            row.append(t)
        if streaming and not (cfg.stop_at_eot and rows[0][-1] == tok.eot_id):
            sys.stdout.write(shown.add(rows[0][-1]))
            sys.stdout.flush()
    if cfg.stop_at_eot:
        rows = [r[: r.index(tok.eot_id) + 1] if tok.eot_id in r else r for r in rows]
    if streaming:
        sys.stdout.write(shown.flush() + "\n")
    for i, row in enumerate(rows if not streaming else []):
        if args.json:
            print(_sample_json(text, tok, cfg, row, stats.finish[i]))
        else:
            print(f"{'-' * 20} sample {i + 1}\n{text if echo else ''}{_body(tok, cfg, row)}")


def _sample_batch_file(gen, args, cfg, tok, texts, prompts) -> None:
    """Every prompt of a batch file, batch_size prompts (times num_samples) at a time; one JSON
    object per sample in input order. Row i of the whole file draws with seed + i."""
    k, new_tokens, seconds = args.num_samples, 0, 0.0
    for start in range(0, len(prompts), args.batch_size):
        chunk = range(start, min(start + args.batch_size, len(prompts)))
        seed = None if cfg.seed is None else cfg.seed + start * k
        stats = GenerationStats()
        rows = gen.generate(
            [prompts[i] for i in chunk for _ in range(k)],
            replace(cfg, seed=seed),
            not args.no_cache,
            stats,
        )
        new_tokens, seconds = new_tokens + sum(map(len, rows)), seconds + stats.seconds
        for j, row in enumerate(rows):
            extra = {"sample": j % k + 1} if k > 1 else {}
            print(_sample_json(texts[chunk[j // k]], tok, cfg, row, stats.finish[j], **extra))
    print(
        f"prompts: {len(prompts)} x {k} sample(s), new tokens: {new_tokens}, {seconds:.2f} s, "
        f"{new_tokens / seconds if seconds else 0.0:.1f} tokens/s",
        file=sys.stderr,
    )
