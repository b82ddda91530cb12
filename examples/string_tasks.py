"""A worked example of fine-tuning on records: teach the quickstart model string tasks.

Each record is a one-turn conversation (the `chat` record format): an instruction about a
made-up word, "Reverse the word 'qofir'.", and the answer, "rifoq". The held-out test words
never occur in training, so a right answer means the model follows the instruction, not that
it remembers. After fine-tuning, sample.py wraps a prompt in the same chat template:
python sample.py --model out/string_tasks --prompt "Reverse the word 'hello'." --greedy

    python examples/string_tasks.py make data/string_tasks     # train.jsonl and test.jsonl
    python train.py                                           # the quickstart: out/quickstart
    python examples/string_tasks.py score out/quickstart --data data/string_tasks  # before
    python train.py configs/string_tasks.toml                 # fine-tune: out/string_tasks
    python examples/string_tasks.py score out/string_tasks --data data/string_tasks  # after
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

TASKS = {
    "reverse": ("Reverse the word '{w}'.", lambda w: w[::-1]),
    "upper": ("Write '{w}' in capital letters.", str.upper),
    "twice": ("Repeat '{w}' twice.", lambda w: f"{w} {w}"),
    "first": ("What is the first letter of '{w}'?", lambda w: w[0]),
    "last": ("What is the last letter of '{w}'?", lambda w: w[-1]),
    "length": ("How many letters does '{w}' have?", lambda w: str(len(w))),
}


def words(rng: random.Random, count: int) -> list[str]:
    """Distinct made-up lowercase words of 3 to 7 letters."""
    out: set[str] = set()
    while len(out) < count:
        out.add("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 7))))
    return sorted(out)


def record(task: str, word: str) -> dict:
    """One chat record; the task name rides along (training ignores it)."""
    template, answer = TASKS[task]
    messages = [
        {"role": "user", "content": template.format(w=word)},
        {"role": "assistant", "content": answer(word)},
    ]
    return {"messages": messages, "task": task}


def make(out: Path, train_words: int, test_words: int, seed: int) -> None:
    """Write train.jsonl (every task on every training word, shuffled) and test.jsonl."""
    rng = random.Random(seed)
    pool = words(rng, train_words + test_words)
    rng.shuffle(pool)
    train, test = pool[:train_words], pool[train_words:]
    rows = [record(t, w) for w in train for t in TASKS]
    rng.shuffle(rows)
    held_out = [record(rng.choice(list(TASKS)), w) for w in test]
    out.mkdir(parents=True, exist_ok=True)
    for name, data in (("train.jsonl", rows), ("test.jsonl", held_out)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in data))
    print(f"{out}: {len(rows):,} training records, {len(held_out):,} held-out test records")


def score(model_spec: str, data: Path, batch_size: int) -> float:
    """Exact-match accuracy of greedy answers on test.jsonl, per task and overall."""
    from tqdm import tqdm

    from minigpt2.data.records import wrap_prompt
    from minigpt2.decode.generate import Generator, SamplingConfig
    from minigpt2.formats.loading import load_any, tokenizer_for

    model, header = load_any(model_spec)
    tok = tokenizer_for(header, None)
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    gen = Generator(model.eval(), vocab_limit=tok.vocab_size)
    cfg = SamplingConfig(max_new_tokens=24, greedy=True, stop_at_eot=True, eot_id=tok.eot_id)
    right: dict[str, list[bool]] = {t: [] for t in TASKS}
    # about half a minute on 2 cores: a bar, so it is not silent (none when stderr is a log)
    bar = tqdm(total=len(rows), unit="record", desc="scoring", file=sys.stderr, disable=None)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [wrap_prompt("chat", r["messages"][0]["content"]) for r in chunk]
        outs = gen.generate([tok.encode(p) for p in prompts], cfg)
        for r, ids in zip(chunk, outs, strict=True):
            answer = tok.decode([i for i in ids if i != tok.eot_id])
            right[r["task"]].append(answer == r["messages"][1]["content"])
        bar.update(len(chunk))
    bar.close()
    overall = sum(sum(v) for v in right.values()) / len(rows)
    parts = ", ".join(f"{t} {sum(v)}/{len(v)}" for t, v in right.items())
    print(f"{model_spec}: exact match {overall:.1%} of {len(rows)} held-out records ({parts})")
    return overall


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write train.jsonl and test.jsonl")
    m.add_argument("out", type=Path)
    m.add_argument("--train-words", type=int, default=3000)
    m.add_argument("--test-words", type=int, default=600)
    m.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("score", help="exact-match accuracy of a model on test.jsonl")
    s.add_argument("model", help="a training out_dir or checkpoint")
    s.add_argument("--data", type=Path, default=Path("data/string_tasks"))
    s.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    if args.command == "make":
        make(args.out, args.train_words, args.test_words, args.seed)
    else:
        score(args.model, args.data, args.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
