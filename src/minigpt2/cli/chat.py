"""`minigpt2 chat --model M`: a conversation in the terminal, each reply streamed as it is made.

The conversation goes to the model in the template it was fine-tuned with (see
data.records.chat_prompt); when it outgrows the context the oldest turns are dropped, with a
note. /reset forgets it, /exit (or end of input) leaves.
"""

from __future__ import annotations

import argparse
import sys

from ..data.records import chat_prompt
from ..decode.generate import Generator, SamplingConfig
from ..decode.text import ChoiceText
from ..errors import MiniGPT2Error
from .options import add_model_options, add_sampling_options, load_for_generation


def parser() -> argparse.ArgumentParser:
    """The command's options."""
    p = argparse.ArgumentParser(
        prog="minigpt2 chat",
        description="Chat with a GPT-2 in the terminal (/reset forgets, /exit leaves).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_options(p, "out/quickstart")
    p.add_argument("--system", default=None, help="a system message to start with")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest reply, in tokens")
    add_sampling_options(p, temperature=0.8)
    return p


def fit_history(messages: list[dict], fmt: str, tok, room: int) -> tuple[list[int], int]:
    """The prompt of messages within room tokens, dropping the oldest turns (never a system
    message, nor the last user message) until it fits; and how many were dropped."""
    dropped = 0
    while True:
        prompt = chat_prompt(messages, fmt, tok)
        turns = [i for i, m in enumerate(messages[:-1]) if m["role"] != "system"]
        if len(prompt) <= room or not turns:
            return prompt[-room:], dropped
        del messages[turns[0]]
        dropped += 1


def chat_main(argv: list[str]) -> int:
    """Read a line, stream the reply, until /exit or end of input."""
    args = parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise MiniGPT2Error(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
    model, header, tok = load_for_generation(args, sequences=1)
    block = model.config.block_size
    reply_room = min(args.max_new_tokens, block // 2)  # half the context at least for history
    fmt = (header or {}).get("data_format", "text")
    cfg = SamplingConfig(
        max_new_tokens=reply_room,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        stop_at_eot=True,
        eot_id=tok.eot_id,
        seed=args.seed,
    ).check()
    gen = Generator(model, vocab_limit=tok.vocab_size)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    print("minigpt2 chat: /reset forgets the conversation, /exit leaves", file=sys.stderr)
    for line in _lines():
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            messages = list(start)
            print("(conversation forgotten)", file=sys.stderr)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        prompt, dropped = fit_history(messages, fmt, tok, block - reply_room)
        if dropped:
            print(f"(dropped the {dropped} oldest turns: past the context)", file=sys.stderr)
        messages.append({"role": "assistant", "content": _reply(gen, cfg, tok, prompt)})
    return 0


def _lines():
    """Lines typed (or piped) in, with a prompt where a person types."""
    while True:
        if sys.stdin.isatty():
            sys.stdout.write("you> ")
            sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            return
        yield line.rstrip("\n")


def _reply(gen: Generator, cfg: SamplingConfig, tok, prompt: list[int]) -> str:
    """Stream a reply to stdout; return its text."""
    text = ChoiceText(tok, [])
    sys.stdout.write("model> ")
    for token in gen.stream([prompt], cfg):
        t = int(token[0])
        if t == tok.eot_id:
            break
        sys.stdout.write(text.add(t))
        sys.stdout.flush()
    sys.stdout.write(text.flush() + "\n")
    sys.stdout.flush()
    return text.text
