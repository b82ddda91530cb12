"""Preference tuning (objective = "dpo"): loss and rewards against a hand computation with
transformers, LoRA's reference against a frozen copy, exact resume, and bad records."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import write_wide_byte_checkpoint
from test_records import write_jsonl
from test_train import settings

from minigpt2 import MiniGPT2Error
from minigpt2.cli.train import train_main
from minigpt2.data.preference import PairBatches, tokenize_pairs
from minigpt2.data.tokenizer import get_tokenizer
from minigpt2.formats.released import load_pretrained
from minigpt2.model.lora import LoRAConfig, apply_lora
from minigpt2.train.config import parse_args
from minigpt2.train.objectives import Preference, reference_logps, response_logps
from minigpt2.train.startup import reference_model
from minigpt2.train.trainer import Trainer


def pairs(n: int = 24) -> list[dict]:
    """Prompt/chosen/rejected records of different lengths."""
    return [
        {
            "prompt": f"Q{i}{'?' * (i % 3)}:",
            "chosen": " yes" * (1 + i % 2),
            "rejected": " no" + "!" * (i % 4),
        }
        for i in range(n)
    ]


def dpo_keys(tmp_path, rows=None) -> dict:
    """A DPO run's keys over a policy and pairs written in tmp_path (the policy once)."""
    policy = tmp_path / "policy"
    if not policy.exists():
        write_wide_byte_checkpoint(policy, 64, seed=0)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows or pairs())
    return dict(
        init_from=str(policy),
        data=data,
        objective="dpo",
        val_fraction=0.25,
        block_size=64,
        learning_rate=1e-3,
    )


def dpo_settings(tmp_path, rows=None, **overrides) -> list[str]:
    base = dict(dpo_keys(tmp_path, rows), batch_size=4, dropout=0.0)
    return settings(tmp_path, **{**base, **overrides})


def hand_logps(model, row: dict, key: str) -> float:
    """log p(response + end-of-text | prompt) under a transformers model (byte ids)."""
    prompt, response = list(row["prompt"].encode()), list(row[key].encode()) + [256]
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1]).logits[0].double(), -1)
    return sum(logp[j, ids[0, j + 1]].item() for j in range(len(prompt) - 1, ids.shape[1] - 1))


@pytest.mark.parametrize("kind", ["sigmoid", "ipo"])
def test_loss_and_rewards_equal_a_hand_computation(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    reference = write_wide_byte_checkpoint(tmp_path / "reference", 64, seed=1)
    beta = 0.3
    cfg = dpo_settings(tmp_path, dpo_reference=str(reference), dpo_beta=beta, dpo_loss=kind)
    trainer = Trainer(parse_args([*cfg, "--eval_only=true"]))
    hf = {
        name: transformers.GPT2LMHeadModel.from_pretrained(tmp_path / name).eval()
        for name in ("policy", "reference")
    }

    def hand(row):
        lp = {(m, k): hand_logps(hf[m], row, k) for m in hf for k in ("chosen", "rejected")}
        if kind == "ipo":  # mean log-probability per response token
            for (m, k), v in lp.items():
                lp[m, k] = v / (len(row[k].encode()) + 1)
        chosen = beta * (lp["policy", "chosen"] - lp["reference", "chosen"])
        rejected = beta * (lp["policy", "rejected"] - lp["reference", "rejected"])
        h = (chosen - rejected) / beta
        loss = (
            (h - 1 / (2 * beta)) ** 2
            if kind == "ipo"
            else -F.logsigmoid(torch.tensor(beta * h)).item()
        )
        return loss, chosen, rejected, lp["policy", "chosen"], lp["policy", "rejected"]

    rows = pairs()
    val = [hand(r) for r in rows[18:]]
    result = trainer.evaluate()
    assert result["val"] == pytest.approx(sum(v[0] for v in val) / 6, rel=1e-5)
    assert result["val_reward_accuracy"] == pytest.approx(sum(v[1] > v[2] for v in val) / 6)
    assert result["val_reward_margin"] == pytest.approx(sum(v[1] - v[2] for v in val) / 6, rel=1e-5)
    # one step's statistics: TRL's names, means over the batch's pairs
    picked = trainer.train_batches.picks(0, 4)
    loss, sums = trainer.objective.loss(trainer.model.eval(), trainer.train_batches.batch(picked))
    expect = [hand(rows[i]) for i in picked]
    assert loss.item() == pytest.approx(sum(e[0] for e in expect) / 4, rel=1e-5)
    if kind == "sigmoid":
        means = dict(zip(Preference.stats, (sums / 4).tolist(), strict=True))
        assert means["rewards/chosen"] == pytest.approx(sum(e[1] for e in expect) / 4, abs=1e-5)
        assert means["rewards/rejected"] == pytest.approx(sum(e[2] for e in expect) / 4, abs=1e-5)
        assert means["logps/chosen"] == pytest.approx(sum(e[3] for e in expect) / 4, rel=1e-5)
        assert means["logps/rejected"] == pytest.approx(sum(e[4] for e in expect) / 4, rel=1e-5)


def test_a_packed_pair_scores_and_trains_as_two_separate_rows(tmp_path):
    # an empty prompt, responses cut at the context's end, lengths that make padding
    rows = [
        {"prompt": "", "chosen": " yes yes", "rejected": " no"},
        {"prompt": "Q: a long question?", "chosen": " certainly, at length" * 3, "rejected": "!"},
        {"prompt": "Q:", "chosen": " y", "rejected": " no, no, no" * 4},
    ]
    block = 24
    _, rowset, _ = tokenize_pairs(rows, get_tokenizer("byte"), "pairs.jsonl")
    packed = PairBatches(rowset, block, 0).batch([0, 1, 2])
    model = load_pretrained(write_wide_byte_checkpoint(tmp_path / "m", 64, seed=2)).train()
    logps, tokens = response_logps(model, packed)
    sum(logps * torch.arange(1.0, 7.0)).backward()  # every response weighs differently
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expect, counted = [], []
    for side in (0, 1):  # each response as its own row, cut as record fine-tuning cuts it
        for i in range(3):
            ids = torch.tensor(rowset.ids[2 * i + side][: block + 1])
            scored = torch.tensor(rowset.counted[2 * i + side][1 : block + 1])
            logp = torch.log_softmax(model(ids[None, :-1])[0], -1)
            expect.append(logp[torch.arange(len(ids) - 1), ids[1:]][scored].sum())
            counted.append(int(scored.sum()))
    assert tokens.tolist() == counted
    assert torch.allclose(logps, torch.stack(expect), rtol=1e-5, atol=1e-4)
    sum(torch.stack(expect) * torch.arange(1.0, 7.0)).backward()
    for g, p in zip(got, model.parameters(), strict=True):
        assert (g - p.grad).abs().max() <= 1e-5 * p.grad.abs().max()


def test_the_starting_model_against_itself_scores_log_2(tmp_path, capsys):
    cfg = dpo_settings(tmp_path)
    assert train_main([*cfg, "--eval_only=true"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["val_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert result["val_reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert "val_ppl" not in result


def test_a_lora_step_equals_one_with_a_frozen_reference_copy(tmp_path):
    cfg = parse_args(dpo_settings(tmp_path, lora_r=4, lora_dropout=0.0))
    tokens = Trainer(parse_args([*dpo_settings(tmp_path), "--eval_only=true"])).tokenizer
    data = Trainer(parse_args([*dpo_settings(tmp_path), "--eval_only=true"])).train_batches
    torch.manual_seed(0)
    lora = load_pretrained(tmp_path / "policy")
    apply_lora(lora, LoRAConfig(4, 16.0, 0.0))
    with torch.no_grad():  # adapters that moved: the policy is no longer its base
        for name, p in lora.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0, 0.05)
    explicit = parse_args(dpo_settings(tmp_path, lora_r=4, dpo_reference=str(tmp_path / "policy")))
    objective = Preference(0.1, "sigmoid")
    grads = []
    for run in (cfg, explicit):
        with reference_model(run, tokens, lora, torch.device("cpu")) as ref:
            assert (ref is lora) == (run is cfg)  # LoRA: no second copy
            reference_logps(ref.eval(), data, 4, 0, 1, lambda fn: fn())
        lora.zero_grad()
        loss, _ = objective.loss(lora.train(), data.batch([0, 1, 2, 3]))
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in lora.parameters() if p.requires_grad]))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6) and grads[0][0] != math.log(2)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_resume_is_exact_and_the_reference_comes_from_the_checkpoint(tmp_path, monkeypatch):
    full, half = tmp_path / "full", tmp_path / "half"
    common = dict(max_iters=6, lr_decay_iters=6, eval_interval=3, checkpoint_interval=3)
    assert train_main(dpo_settings(full, **common)) == 0
    assert train_main(dpo_settings(half, **{**common, "max_iters": 3})) == 0
    import minigpt2.train.trainer as trainer_module

    def no_reference_pass(*args, **kwargs):
        raise AssertionError("resume computed the reference again")

    monkeypatch.setattr(trainer_module, "reference_logps", no_reference_pass)
    assert train_main([f"--out_dir={half / 'out'}", "--init_from=resume", "--max_iters=6"]) == 0
    rows = [
        [json.loads(x) for x in (d / "out" / "metrics.jsonl").read_text().splitlines()]
        for d in (full, half)
    ]
    assert rows[0] == [
        {
            **r,
            "elapsed": a["elapsed"],
            "tokens_per_sec": a["tokens_per_sec"],
            "mfu": a["mfu"],
            **({"eval_seconds": a["eval_seconds"]} if "eval_seconds" in r else {}),
        }
        for a, r in zip(rows[0], rows[1], strict=True)
    ]
    assert "rewards/margins" in rows[0][-1] and "val_reward_accuracy" in rows[0][-1]


def test_two_processes_match_one(tmp_path):
    from test_distributed import assert_same_run, run_world, tiny

    common = dpo_keys(tmp_path)
    run_world(1, tiny(tmp_path, "one", **common), tmp_path)
    run_world(2, tiny(tmp_path, "two", **common), tmp_path)
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_identical_pairs_are_kept_and_counted_in_one_warning(tmp_path, capsys):
    rows = pairs()
    for r in rows[:3]:
        r["rejected"] = r["chosen"]
    trainer = Trainer(parse_args(dpo_settings(tmp_path, rows=rows)))
    assert "warning: 3 pair(s) have the same chosen and rejected response" in trainer.data_note
    assert len(trainer.train_batches) == 18


def test_instruction_and_chat_pairs_use_the_record_templates(tmp_path):
    from minigpt2.data.preference import tokenize_pairs
    from minigpt2.data.records import ALPACA_NO_INPUT, chat_prompt
    from minigpt2.data.tokenizer import get_tokenizer

    tok = get_tokenizer("byte")
    instruction = {"instruction": "Say hi.", "chosen": "hi", "rejected": "no"}
    fmt, rows, _ = tokenize_pairs([instruction], tok, "f")
    prompt = tok.encode(ALPACA_NO_INPUT.format(instruction="Say hi."))
    assert fmt == "instruction" and rows.ids[0].tolist() == prompt + tok.encode("hi") + [256]
    messages = [{"role": "user", "content": "Hello"}]
    chat = {
        "messages": messages,
        "chosen": [{"role": "assistant", "content": "Hi!"}],
        "rejected": "Go.",
    }
    fmt, rows, _ = tokenize_pairs([chat], tok, "f")
    prompt = chat_prompt(messages, "chat", tok)
    assert fmt == "chat" and rows.ids[1].tolist() == prompt + tok.encode("Go.") + [256]
    assert rows.counted[1].sum() == len(tok.encode("Go.")) + 1


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r[5].pop("chosen"), "record 6 has no 'chosen' field"),
        (lambda r: r[5].pop("rejected"), "record 6 has no 'rejected' field"),
        (lambda r: r[5].pop("prompt"), "record 6 has no 'prompt' field"),
        (lambda r: [x.pop("prompt") for x in r], "record 1 has no prompt"),
        (lambda r: r[2].update(prompt="x" * 80), "record 3: its prompt alone is 80 tokens"),
        (lambda r: r[2].update(chosen=7), "record 3 has a int in its 'chosen' field"),
    ],
)
def test_bad_preference_records_are_one_line(tmp_path, change, message):
    rows = pairs()
    change(rows)
    with pytest.raises(MiniGPT2Error, match=message) as e:
        Trainer(parse_args(dpo_settings(tmp_path, rows=rows)))
    assert "\n" not in str(e.value) and "pairs.jsonl" in str(e.value)


def test_objective_and_data_that_do_not_go_together_are_refused(tmp_path):
    with pytest.raises(MiniGPT2Error, match="a classifier"):
        parse_args(dpo_settings(tmp_path, task="classification"))
    with pytest.raises(MiniGPT2Error, match="--objective=dpo"):
        Trainer(parse_args(dpo_settings(tmp_path, objective="lm")))
