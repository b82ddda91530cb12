"""Training on records: formats and templates, the masked loss against a hand computation,
token-weighted accumulation, exact evaluation and resume, sampling a record model, bad input."""

import json
import math

import pytest
import torch
from test_train import settings
from test_train_cli import ROOT, run

from minigpt2 import MiniGPT2Error
from minigpt2.cli.train import train_main
from minigpt2.data.records import segments
from minigpt2.data.tokenizer import ByteTokenizer
from minigpt2.train.config import parse_args
from minigpt2.train.trainer import Trainer

BYTE = ByteTokenizer()


def completion_records(n: int = 40) -> list[dict]:
    """Prompt/completion records of different lengths: sums of small numbers."""
    return [
        {"prompt": f"{i} plus {i % 7}{' please' * (i % 3)} =", "completion": f" {i + i % 7}"}
        for i in range(n)
    ]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def record_settings(tmp_path, rows=None, **overrides) -> list[str]:
    data = write_jsonl(tmp_path / "records.jsonl", rows or completion_records())
    base = dict(data=data, val_fraction=0.25, batch_size=4, block_size=48, dropout=0.0)
    return settings(tmp_path, **{**base, **overrides})


def test_alpaca_templates_are_stanford_alpacas():
    with_input = segments(
        {"instruction": "Sum.", "input": "2 and 3", "output": "5"}, "instruction", "r"
    )
    assert with_input == [
        (
            "Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\nSum.\n\n### Input:\n2 and 3\n\n### Response:\n",
            False,
        ),
        ("5", True),
    ]
    no_input = "Below is an instruction that describes a task. Write a response that " + (
        "appropriately completes the request.\n\n### Instruction:\nSum.\n\n### Response:\n"
    )
    for record in ({"instruction": "Sum.", "output": "5"}, {"instruction": "Sum.", "input": ""}):
        record.setdefault("output", "5")
        assert segments(record, "instruction", "r") == [(no_input, False), ("5", True)]


def test_chat_template_counts_every_assistant_turn():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye."},
    ]
    assert segments({"messages": messages}, "chat", "r") == [
        ("### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\n", False),
        ("Hello.", True),
        ("### User:\nBye\n\n### Assistant:\n", False),
        ("Bye.", True),
    ]


def hand_loss(model, rows: list[dict]) -> float:
    """Token-weighted cross-entropy over completion bytes and end-of-text, record by record."""
    total, count = 0.0, 0
    for r in rows:
        prompt, response = list(r["prompt"].encode()), list(r["completion"].encode()) + [256]
        ids = torch.tensor([prompt + response])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids[:, :-1])[0].float(), -1)
        for j in range(len(prompt) - 1, ids.shape[1] - 1):  # the targets that are response
            total -= logp[j, ids[0, j + 1]].item()
            count += 1
    return total / count


def test_record_loss_equals_a_hand_computation(tmp_path):
    rows = completion_records()
    trainer = Trainer(parse_args(record_settings(tmp_path)))
    assert trainer.data_format == "prompt_completion"
    val = rows[30:]  # the last quarter, in file order
    assert trainer.evaluate()["val"] == pytest.approx(hand_loss(trainer.model, val), rel=1e-5)
    picked = trainer.train_batches.picks(0, trainer.global_batch)
    expected = hand_loss(trainer.model, [rows[i] for i in picked])
    assert trainer.train_step().item() == pytest.approx(expected, rel=1e-5)


def test_unmasked_prompts_count_too(tmp_path):
    trainer = Trainer(parse_args(record_settings(tmp_path, mask_prompt=False)))
    b = trainer.train_batches.batch([0, 5])
    assert b.counted == b.tokens == int(b.attention_mask.sum())  # every real target counts
    masked = Trainer(parse_args(record_settings(tmp_path))).train_batches.batch([0, 5])
    assert masked.counted < b.counted and masked.x.shape == b.x.shape


def test_batches_pad_to_the_longest_record_not_the_context(tmp_path):
    trainer = Trainer(parse_args(record_settings(tmp_path, block_size=128)))
    lengths = [len(trainer.train_batches.ids[i]) for i in (0, 1, 2)]
    b = trainer.train_batches.batch([0, 1, 2])
    assert b.x.shape == (3, max(lengths) - 1) and b.x.shape[1] < 128
    assert b.attention_mask.sum(1).tolist() == [n - 1 for n in lengths]
    assert (b.y[b.attention_mask == 0] == -1).all()


def test_accumulation_does_not_depend_on_how_records_fall(tmp_path):
    one = Trainer(parse_args(record_settings(tmp_path, batch_size=8)))
    two = Trainer(
        parse_args(record_settings(tmp_path, batch_size=2, gradient_accumulation_steps=4))
    )
    assert one.train_step().item() == pytest.approx(two.train_step().item(), abs=1e-6)
    for pa, pb in zip(one.model.parameters(), two.model.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_long_records_are_cut_and_counted(tmp_path):
    rows = completion_records()
    rows[3]["completion"] = " " + "9" * 80  # 80+ bytes: longer than block_size + 1
    trainer = Trainer(parse_args(record_settings(tmp_path, rows=rows)))
    assert trainer.train_batches.cut == 1 and len(trainer.train_batches.ids[3]) == 49
    assert "1 longer than block_size+1 = 49 tokens were cut at the end" in trainer.data_note


def test_record_run_resumes_exactly_and_evaluates_every_record(tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    full.mkdir(), half.mkdir()
    assert train_main(record_settings(full, max_iters=6, lr_decay_iters=6, dropout=0.1)) == 0
    assert train_main(record_settings(half, max_iters=3, lr_decay_iters=6, dropout=0.1)) == 0
    assert train_main([f"--out_dir={half / 'out'}", "--init_from=resume", "--max_iters=6"]) == 0
    rows = [
        [json.loads(x) for x in (d / "out" / "metrics.jsonl").read_text().splitlines()]
        for d in (full, half)
    ]
    assert [r["train_loss"] for r in rows[0]] == [r["train_loss"] for r in rows[1]]
    assert [r["val_loss"] for r in rows[0]] == [r["val_loss"] for r in rows[1]]
    val = [r["val_loss"] for r in rows[0] if r["val_loss"] is not None]
    assert len(val) == 2 and all(math.isfinite(v) for v in val)


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "a"}\n', "records.jsonl: record 1 matches no record format"),
        (
            '{"prompt": "a", "completion": "b"}\n{"instruction": "x", "output": "y"}\n',
            "records.jsonl: record 2 has the fields of instruction records but the file holds "
            "prompt_completion records",
        ),
        (
            '{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n',
            "records.jsonl: record 2 lacks the fields of prompt_completion records",
        ),
        ('{"prompt": "a", "completion": 3}\n', "record 1 has a non-string (int) 'completion'"),
        ("", "records.jsonl holds no records"),
        ('{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n', "invalid JSON at line 2"),
        (('{"prompt": "' + "p" * 60 + '", "completion": "b"}\n') * 4, "record 1: its prompt"),
        (
            '{"messages": [{"role": "robot", "content": "x"}]}\n',
            "record 1, message 1: role 'robot'",
        ),
    ],
)
def test_bad_record_files_are_one_line_and_write_nothing(tmp_path, content, message):
    (tmp_path / "records.jsonl").write_text(content)
    args = settings(tmp_path, data=str(tmp_path / "records.jsonl"), block_size=48)
    result = run([str(ROOT / "train.py"), *args], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, lines
    assert not (tmp_path / "out").exists()


def test_format_named_but_not_a_record_file(tmp_path):
    with pytest.raises(
        MiniGPT2Error, match="data_format=chat reads a .json or .jsonl record file or an hf:NAME"
    ):
        Trainer(parse_args(settings(tmp_path, data_format="chat")))


@pytest.fixture(scope="module")
def record_run(tmp_path_factory):
    """A tiny model trained a few steps on Alpaca-style instruction records."""
    tmp = tmp_path_factory.mktemp("records")
    rows = [{"instruction": f"Add {i} and {i % 7}.", "output": str(i + i % 7)} for i in range(40)]
    assert train_main(record_settings(tmp, rows=rows, max_iters=3, block_size=256)) == 0
    return tmp / "out"


def sample(*args, cwd):
    return run([str(ROOT / "sample.py"), *args], cwd=cwd)


def test_sampling_a_record_model_uses_its_template_and_stops_at_eot(record_run, tmp_path):
    from minigpt2.data.records import ALPACA_NO_INPUT
    from minigpt2.decode.generate import Generator, SamplingConfig
    from minigpt2.formats.loading import load_any

    common = ["--model", str(record_run), "--prompt", "Add 3 and 3.", "--json", "--greedy"]
    wrapped = sample(*common, "--max-new-tokens", "60", cwd=tmp_path)
    raw = sample(*common, "--max-new-tokens", "60", "--raw", cwd=tmp_path)
    assert wrapped.returncode == 0 and raw.returncode == 0, wrapped.stderr + raw.stderr
    gen = Generator(load_any(str(record_run))[0])
    text = ALPACA_NO_INPUT.format(instruction="Add 3 and 3.")
    stop = SamplingConfig(max_new_tokens=60, greedy=True, stop_at_eot=True, eot_id=256)
    expected = gen.generate([BYTE.encode(text)], stop)[0]
    assert json.loads(wrapped.stdout)["token_ids"] == expected
    plain = SamplingConfig(max_new_tokens=60, greedy=True)
    assert (
        json.loads(raw.stdout)["token_ids"] == gen.generate([BYTE.encode("Add 3 and 3.")], plain)[0]
    )
    assert expected != gen.generate([BYTE.encode("Add 3 and 3.")], plain)[0]


def test_batch_file_writes_one_object_per_prompt_in_order(record_run, tmp_path):
    prompts = ["1 plus 1 =", "a much longer prompt than the first one =", "x"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    common = ["--model", str(record_run), "--greedy", "--max-new-tokens", "8", "--raw"]
    outs = []
    for name in ("p.jsonl", "p.txt"):
        result = sample(
            *common, "--batch-file", str(tmp_path / name), "--batch-size", "2", cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr
        outs.append([json.loads(line) for line in result.stdout.splitlines()])
    assert outs[0] == outs[1] and [o["prompt"] for o in outs[0]] == prompts
    for o, p in zip(outs[0], prompts, strict=True):
        alone = sample(*common, "--prompt", p, "--json", cwd=tmp_path)
        assert json.loads(alone.stdout)["token_ids"] == o["token_ids"]
        assert set(o) == {"prompt", "text", "token_ids", "finish_reason"}


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("p.jsonl", '{"prompt": "a"}\n{"prompt": \n', "p.jsonl: invalid JSON at line 2"),
        ("p.jsonl", '{"text": "a"}\n', "p.jsonl: record 1 has no string 'prompt' field"),
        ("p.txt", "\n\n", "p.txt holds no prompts"),
        ("p.csv", "a\n", "use .jsonl"),
        ("p.txt", "a\n", "not both"),
    ],
)
def test_bad_batch_files(record_run, tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    both = ["--prompt", "x"] if message == "not both" else []
    args = ["--model", str(record_run), "--batch-file", str(tmp_path / name), *both]
    result = sample(*args, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_hf_record_dataset(tmp_path, hf_folder):
    folder = hf_folder
    rows = completion_records()
    write_jsonl(folder / "train.jsonl", rows)
    spec = settings(tmp_path, data=f"hf:{folder}", val_fraction=0.25, block_size=48)
    trainer = Trainer(parse_args([*spec, "--data_format=prompt_completion", "--dropout=0"]))
    local = Trainer(parse_args(record_settings(tmp_path)))
    assert trainer.evaluate()["val"] == local.evaluate()["val"]  # the same records, same model
    missing = [*spec, "--data_format=chat", "--data=hf:no-such/dataset"]
    with pytest.raises(MiniGPT2Error, match="cannot read dataset 'hf:no-such/dataset'"):
        Trainer(parse_args(missing))


def test_chat_prompt_is_the_training_template_up_to_the_reply():
    """A conversation asks for its next reply exactly as training showed replies: the chat
    record with that reply, tokenized for training, starts with the prompt; an instruction
    model gets Alpaca's template around the last user message."""
    from minigpt2.data.records import ALPACA_NO_INPUT, chat_prompt, tokenize_records
    from minigpt2.data.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    record = {"messages": [*messages, {"role": "assistant", "content": "See you."}]}
    trained = tokenize_records([record], "chat", tok, True, "test").ids[0].tolist()
    prompt = chat_prompt(messages, "chat", tok)
    assert trained[: len(prompt)] == prompt and tok.eot_id in prompt  # the earlier reply's end
    assert trained[len(prompt) :] == tok.encode("See you.") + [tok.eot_id]
    assert chat_prompt(messages, "text", tok) == prompt  # plain models: the same template
    alpaca = chat_prompt(messages, "instruction", tok)
    assert alpaca == tok.encode(ALPACA_NO_INPUT.format(instruction="Bye"))
    with pytest.raises(MiniGPT2Error, match="role 'wizard'"):
        chat_prompt([{"role": "wizard", "content": "x"}], "chat", tok)
