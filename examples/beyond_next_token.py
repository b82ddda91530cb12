"""Worked examples of preference tuning (DPO) and classification fine-tuning, each one command
after the quickstart (python train.py, which leaves out/quickstart):

    python examples/beyond_next_token.py preference   # DPO: answers in the chosen style
    python examples/beyond_next_token.py classify     # is a line Python or English?

preference: pairs whose chosen answer is polite ("Sure: " and the answer) and whose rejected
answer is curt (the answer alone), on made-up questions; DPO from out/quickstart, with LoRA.
Before and after, the model answers held-out questions greedily, and the example counts how
many answers open in the chosen style, and the mean DPO reward margin on held-out pairs.
classify: lines of the Python standard library against English sentences of made-up words;
a classifier from out/quickstart, trained on 600 lines, scored on 200 held out.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = "apple river stone cloud lamp green quiet seven paper music garden window".split()


def question(rng: random.Random) -> tuple[str, str]:
    """A made-up question and its answer."""
    a, b = rng.sample(WORDS, 2)
    kind = rng.choice(["first", "join", "upper"])
    if kind == "first":
        return f"Which comes first, {a} or {b}?", min(a, b)
    if kind == "join":
        return f"Join {a} and {b}.", a + b
    return f"Shout {a}.", a.upper()


def preference_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        q, answer = question(rng)
        rows.append({"prompt": f"{q}\n", "chosen": f"Sure: {answer}.", "rejected": answer})
    return rows


def write(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def train(*settings: str) -> None:
    cmd = [sys.executable, "-m", "minigpt2", "train", *settings]
    subprocess.run(cmd, check=True, cwd=ROOT)


def polite_share(model: str, prompts: list[str]) -> float:
    """The share of greedy answers to the held-out questions that open with "Sure:"."""
    from minigpt2.cli.options import add_model_options, load_for_generation
    from minigpt2.decode.generate import Generator, SamplingConfig

    p = argparse.ArgumentParser()
    add_model_options(p, model)
    args = p.parse_args(["--no-native"])
    net, _, tok = load_for_generation(args, sequences=len(prompts))
    ids = [tok.encode(q) for q in prompts]
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.0, stop_at_eot=True, eot_id=tok.eot_id)
    out = Generator(net, vocab_limit=tok.vocab_size).generate(ids, cfg)
    answers = [tok.decode([i for i in row if i != tok.eot_id]) for row in out]
    return sum(a.startswith("Sure:") for a in answers) / len(answers)


def preference(args) -> None:
    data = Path(args.data)
    train_file = write(data / "pairs.jsonl", preference_pairs(600, 0))
    held = preference_pairs(100, 1)
    write(data / "held_out.jsonl", held)
    prompts = [r["prompt"] for r in held]
    before = polite_share(args.start, prompts)
    train(
        f"--init_from={args.start}",
        f"--data={train_file}",
        "--objective=dpo",
        f"--out_dir={args.out}",
        "--overwrite=true",
        "--lora_r=8",
        "--lora_targets=c_attn,c_fc",
        "--batch_size=8",
        "--max_iters=150",
        "--learning_rate=2e-3",
        "--warmup_iters=10",
        "--eval_interval=50",
        "--val_fraction=0.1",
        "--dpo_beta=0.1",
        "--sample_tokens=0",
        "--block_size=256",
    )
    after = polite_share(args.out, prompts)
    metrics = [json.loads(x) for x in (Path(args.out) / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if "val_reward_accuracy" in m][-1]
    print(
        f"held-out questions answered in the chosen style: {before:.0%} before, {after:.0%} "
        f"after; validation reward accuracy {last['val_reward_accuracy']:.0%}, margin "
        f"{last['val_reward_margin']:.2f}"
    )


def english(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10))).capitalize() + "."


def classify(args) -> None:
    import sysconfig

    rng = random.Random(0)
    lines = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]:
        lines += [ln.strip() for ln in path.read_text(errors="replace").splitlines()]
    code = [ln for ln in lines if 12 <= len(ln) <= 80 and not ln.startswith("#")]
    rng.shuffle(code)
    rows = [{"text": t, "label": "python"} for t in code[:400]]
    rows += [{"text": english(rng), "label": "english"} for _ in range(400)]
    rng.shuffle(rows)
    data = write(Path(args.data) / "lines.jsonl", rows)
    train(
        f"--init_from={args.start}",
        f"--data={data}",
        "--task=classification",
        f"--out_dir={args.out}",
        "--overwrite=true",
        "--classifier_trainable=last_block",
        "--batch_size=16",
        "--max_iters=60",
        "--learning_rate=1e-3",
        "--warmup_iters=5",
        "--eval_interval=20",
        "--val_fraction=0.25",
    )
    metrics = [json.loads(x) for x in (Path(args.out) / "metrics.jsonl").read_text().splitlines()]
    last = [m for m in metrics if "val_accuracy" in m][-1]
    print(f"held-out accuracy on {len(rows) // 4} lines: {last['val_accuracy']:.1%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("preference", "classify"))
    p.add_argument("--start", default="out/quickstart", help="the model to start from")
    p.add_argument("--out", default=None, help="out_dir (default: out/preference, out/classify)")
    p.add_argument("--data", default="data/beyond_next_token", help="where the data is written")
    args = p.parse_args()
    args.out = args.out or f"out/{args.what}"
    (preference if args.what == "preference" else classify)(args)


if __name__ == "__main__":
    main()
