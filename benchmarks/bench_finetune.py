"""Fine-tuning beyond next-token loss, against the tools people use for it, on the gpt2 shape
(random weights saved by transformers), on the CPU, side by side in one sitting:

    python benchmarks/bench_finetune.py dpo --tokenizer PATH/gpt2.tiktoken [--pairs 32]
    python benchmarks/bench_finetune.py classify --tokenizer PATH/gpt2.tiktoken [--steps 6]

dpo: one epoch of DPO with LoRA (r 8, alpha 16, dropout 0.05 on c_attn: PEFT's and this
project's defaults), batch 4 pairs, beta 0.1, the same generated pairs, against TRL's
DPOTrainer (peft_config: its reference is the base with the adapters off, as here). Timed:
from loading the model to the end of the epoch, reference log-probabilities included; TRL
both ways (computing the reference at every step, its default, and precompute_ref_log_probs).
TRL evaluates nothing; a minigpt2 run always ends with an evaluation, here of one batch of
training pairs and the held-out pair (eval_iters = 1).
classify: optimizer steps per second of full fine-tuning (AdamW, batch 8, texts of 40-120
tokens) against a plain PyTorch loop over transformers' GPT2ForSequenceClassification.
Rounds alternate the two sides; the figures are medians.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from minigpt2.data.tokenizer import get_tokenizer
from minigpt2.formats.hf_tokenizer import write_tokenizer_files


def gpt2_dir(root: Path, tokenizer_path: str) -> Path:
    """Random gpt2-shaped weights in the released layout, with the tokenizer's files."""
    import transformers

    out = root / "gpt2"
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(out)
    write_tokenizer_files(get_tokenizer(tokenizer_path), out, 1024)
    return out


def words(rng: random.Random, n: int) -> str:
    vocab = "the a model answer short long polite plain reply good fine clear kind".split()
    return " ".join(rng.choice(vocab) for _ in range(n))


def pairs(n: int) -> list[dict]:
    rng = random.Random(0)
    return [
        {
            "prompt": f"Question {i}: {words(rng, rng.randint(10, 30))}?\nAnswer:",
            "chosen": " " + words(rng, rng.randint(10, 40)),
            "rejected": " " + words(rng, rng.randint(10, 40)),
        }
        for i in range(n)
    ]


def ours_dpo(model: Path, data: Path, tokenizer: str, out: Path, threads: int) -> float:
    from minigpt2.train.config import parse_args
    from minigpt2.train.trainer import Trainer

    steps = -(-sum(1 for _ in open(data)) // 4)
    args = {
        "init_from": model,
        "data": data,
        "tokenizer": tokenizer,
        "objective": "dpo",
        "out_dir": out,
        "overwrite": True,
        "lora_r": 8,
        "batch_size": 4,
        "max_iters": steps,
        "val_fraction": 0.01,
        "eval_interval": 10_000,
        "eval_iters": 1,  # the run's closing evaluation: one batch and the held-out pair
        "checkpoint_interval": 10_000,
        "learning_rate": 1e-4,
        "warmup_iters": 0,
        "decay": "constant",
        "min_lr": 1e-4,
        "sample_tokens": 0,
        "progress": False,
        "dropout": 0.0,
        "grad_clip": 0.0,
    }
    t0 = time.perf_counter()
    Trainer(parse_args([f"--{k}={v}" for k, v in args.items()])).run()
    return time.perf_counter() - t0


def trl_dpo(model: Path, rows: list[dict], out: Path, precompute: bool) -> float:
    import datasets
    import transformers
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    t0 = time.perf_counter()
    net = transformers.GPT2LMHeadModel.from_pretrained(model)
    tok = transformers.AutoTokenizer.from_pretrained(model)
    tok.pad_token = tok.eos_token
    config = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=4,
        num_train_epochs=1,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        beta=0.1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1000,
        max_grad_norm=0.0,
        precompute_ref_log_probs=precompute,
        dataloader_num_workers=0,
    )
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.05,
        target_modules=["c_attn"],
        task_type="CAUSAL_LM",
        fan_in_fan_out=True,
    )
    trainer = DPOTrainer(
        model=net,
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tok,
        peft_config=lora,
    )
    trainer.train()
    return time.perf_counter() - t0


def bench_dpo(args, root: Path) -> dict:
    model = gpt2_dir(root, args.tokenizer)
    rows = pairs(args.pairs)
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    # ours trains on the pairs val_fraction leaves (all but one): TRL gets the same ones
    trained = rows[: len(rows) - 1]
    times: dict[str, list[float]] = {"minigpt2": [], "trl": [], "trl_precompute": []}
    for _ in range(args.rounds):
        times["minigpt2"].append(ours_dpo(model, data, args.tokenizer, root / "ours", args.threads))
        times["trl"].append(trl_dpo(model, trained, root / "trl", False))
        times["trl_precompute"].append(trl_dpo(model, trained, root / "trl", True))
        print({k: round(v[-1], 1) for k, v in times.items()}, file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "pairs": len(trained),
        "batch": 4,
        "seconds": med,
        "speedup_vs_trl": med["trl"] / med["minigpt2"],
        "speedup_vs_trl_precompute": med["trl_precompute"] / med["minigpt2"],
    }


def bench_classify(args, root: Path) -> dict:
    import transformers

    from minigpt2.formats.released import load_pretrained

    rng = random.Random(0)
    batches = []
    for _ in range(args.steps + 1):
        lengths = [rng.randint(40, 120) for _ in range(8)]
        width = max(lengths)
        x = torch.full((8, width), 50256)
        mask = torch.zeros(8, width, dtype=torch.long)
        for r, n in enumerate(lengths):
            x[r, :n] = torch.randint(0, 50000, (n,))
            mask[r, :n] = 1
        batches.append((x, mask, torch.randint(0, 2, (8,))))
    torch.manual_seed(0)
    config = transformers.GPT2Config(num_labels=2, pad_token_id=50256)
    hf = transformers.GPT2ForSequenceClassification(config).train()
    hf.save_pretrained(root / "cls")
    ours = load_pretrained(root / "cls").train()

    def hf_step(b):
        hf(input_ids=b[0], attention_mask=b[1], labels=b[2]).loss.backward()

    def our_step(b):
        ours(b[0], b[2], b[1], head="score")[1].backward()

    rates: dict[str, list[float]] = {"minigpt2": [], "transformers": []}
    for _ in range(args.rounds):
        for name, model, step in (("minigpt2", ours, our_step), ("transformers", hf, hf_step)):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
            for i, b in enumerate(batches):
                if i == 1:  # the first step warms up
                    t0 = time.perf_counter()
                step(b)
                opt.step()
                opt.zero_grad(set_to_none=True)
            rates[name].append(args.steps / (time.perf_counter() - t0))
        print({k: round(v[-1], 3) for k, v in rates.items()}, file=sys.stderr)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return {"steps_per_sec": med, "ratio": med["minigpt2"] / med["transformers"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("dpo", "classify"))
    p.add_argument("--tokenizer", required=True, help="path/to/gpt2.tiktoken")
    p.add_argument("--pairs", type=int, default=33, help="dpo: pairs (one held out)")
    p.add_argument("--steps", type=int, default=6, help="classify: timed steps")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run = bench_dpo if args.what == "dpo" else bench_classify
        print(json.dumps(run(args, Path(tmp)), indent=2))


if __name__ == "__main__":
    main()
