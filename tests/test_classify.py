"""Classification fine-tuning (task = "classification"): logits against transformers'
GPT2ForSequenceClassification both ways, accuracy by hand, what trains, the commands, bad input."""

import csv
import json

import pytest
import torch
from conftest import write_wide_byte_checkpoint
from test_records import write_jsonl
from test_train import settings

from minigpt2 import MiniGPT2Error
from minigpt2.cli import main
from minigpt2.cli.train import train_main
from minigpt2.formats.loading import load_any
from minigpt2.formats.released import load_pretrained
from minigpt2.train.config import parse_args
from minigpt2.train.trainer import Trainer


def reviews(n: int = 40) -> list[dict]:
    """Texts whose label is in their words: 'good' ones are pos, 'bad' ones neg."""
    return [
        {
            "text": f"{'so ' * (i % 4)}{'good' if i % 2 else 'bad'} film {i}",
            "label": "pos" if i % 2 else "neg",
        }
        for i in range(n)
    ]


def classify_settings(tmp_path, rows=None, **overrides) -> list[str]:
    start = tmp_path / "start"
    if not start.exists():
        write_wide_byte_checkpoint(start, 64)
    data = write_jsonl(tmp_path / "reviews.jsonl", rows or reviews())
    base = dict(
        init_from=str(start),
        data=data,
        task="classification",
        val_fraction=0.25,
        batch_size=8,
        block_size=64,
        dropout=0.0,
        learning_rate=1e-3,
    )
    return settings(tmp_path, **{**base, **overrides})


def test_exported_logits_equal_transformers_with_padding(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    assert train_main(classify_settings(tmp_path, max_iters=4)) == 0
    out = tmp_path / "exported"
    assert main(["export", str(tmp_path / "out"), str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    assert config["id2label"] == {"0": "neg", "1": "pos"} and config["pad_token_id"] == 256
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    ours, _ = load_any(str(tmp_path / "out"))
    texts = [list(b"so so good film"), list(b"bad"), list(b"good film 7")]
    width = max(map(len, texts))
    x = torch.tensor([t + [256] * (width - len(t)) for t in texts])
    mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in texts])
    with torch.no_grad():
        want = hf(input_ids=x, attention_mask=mask).logits
        got = ours.eval()(x, attention_mask=mask, head="score")
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got[0], got[1], atol=1e-3)  # rows differ: the right token is read


def test_a_transformers_classifier_is_a_starting_point(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=257,
        n_positions=64,
        num_labels=3,
        pad_token_id=256,
        initializer_range=0.3,
        id2label={0: "a", 1: "b", 2: "c"},
    )
    hf = transformers.GPT2ForSequenceClassification(config).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_pretrained(tmp_path / "hf")
    assert ours.config.labels == ("a", "b", "c")
    x = torch.tensor([[5, 6, 7, 8], [9, 10, 256, 256]])
    mask = (x != 256).long()
    with torch.no_grad():
        assert torch.allclose(
            ours(x, attention_mask=mask, head="score"), hf(x, attention_mask=mask).logits, atol=1e-5
        )
    rows = [{"text": r["text"], "label": ["a", "b", "c"][i % 3]} for i, r in enumerate(reviews())]
    trainer = Trainer(
        parse_args(classify_settings(tmp_path, rows=rows, init_from=str(tmp_path / "hf")))
    )
    assert torch.equal(trainer.model.score.weight, ours.score.weight)  # its head is kept


def test_val_accuracy_and_loss_equal_a_hand_count(tmp_path):
    trainer = Trainer(parse_args(classify_settings(tmp_path, eval_only=True)))
    model = trainer.model.eval()
    right, loss = 0, 0.0
    val = reviews()[30:]
    for row in val:
        with torch.no_grad():
            logits = model(torch.tensor([list(row["text"].encode())]), head="score")[0]
        label = ["neg", "pos"].index(row["label"])
        right += int(logits.argmax()) == label
        loss -= torch.log_softmax(logits, -1)[label].item()
    result = trainer.evaluate()
    assert result["val_accuracy"] == pytest.approx(right / len(val))
    assert result["val"] == pytest.approx(loss / len(val), rel=1e-5)


@pytest.mark.parametrize("which", ["head", "last_block"])
def test_classifier_trainable_trains_only_what_it_names(tmp_path, which):
    trainer = Trainer(parse_args(classify_settings(tmp_path, classifier_trainable=which)))
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train_step()
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    expect = {"score.weight"}
    if which == "last_block":
        expect |= {n for n in before if n.startswith(("transformer.h.1.", "transformer.ln_f."))}
    assert moved == expect


def test_lora_trains_adapters_and_head_and_resumes_exactly(tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    common = dict(lora_r=4, max_iters=6, lr_decay_iters=6, eval_interval=3, checkpoint_interval=3)
    assert train_main(classify_settings(full, **common)) == 0
    assert train_main(classify_settings(half, **{**common, "max_iters": 3})) == 0
    assert train_main([f"--out_dir={half / 'out'}", "--init_from=resume", "--max_iters=6"]) == 0
    a, b = (load_any(str(d / "out"), "latest")[0] for d in (full, half))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    start = load_pretrained(tmp_path / "full" / "start")
    assert not torch.equal(
        a.transformer.h[0].attn.c_attn.weight, start.transformer.h[0].attn.c_attn.weight
    )
    assert torch.equal(a.transformer.h[0].mlp.c_fc.weight, start.transformer.h[0].mlp.c_fc.weight)


def test_lora_classifier_adapters_load_in_peft_with_the_same_logits(tmp_path, capsys):
    """--adapter-only of a LoRA classifier: PEFT's SEQ_CLS layout, the trained `score` head
    among modules_to_save, over transformers' GPT2ForSequenceClassification of the base."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    run = classify_settings(tmp_path, lora_r=4, max_iters=4, lr_decay_iters=4)
    assert train_main(run) == 0
    out = tmp_path / "adapter"
    capsys.readouterr()
    assert main(["export", str(tmp_path / "out"), str(out), "--adapter-only"]) == 0
    assert "num_labels=2" in capsys.readouterr().out
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["score"]
    base = transformers.GPT2ForSequenceClassification.from_pretrained(
        tmp_path / "start", num_labels=2, pad_token_id=256
    ).eval()
    texts = [list(b"so so good film"), list(b"bad"), list(b"good film 7")]
    width = max(map(len, texts))
    x = torch.tensor([t + [256] * (width - len(t)) for t in texts])
    mask = torch.tensor([[1] * len(t) + [0] * (width - len(t)) for t in texts])
    with torch.no_grad():
        fresh = base(input_ids=x, attention_mask=mask).logits  # before PEFT wraps it in place
        want = peft.PeftModel.from_pretrained(base, out).eval()(input_ids=x, attention_mask=mask)
        got = load_any(str(tmp_path / "out"))[0].eval()(x, attention_mask=mask, head="score")
    assert torch.allclose(got, want.logits, atol=1e-5)
    assert not torch.allclose(want.logits, fresh, atol=1e-3)  # the adapters and head took effect
    # bad input: one line each, exit 2, nothing written or overwritten
    before = (out / "adapter_model.safetensors").read_bytes()
    for argv, says in [
        ([str(tmp_path / "out"), str(tmp_path / "a.gguf"), "--adapter-only"], "not a .gguf"),
        ([str(tmp_path / "start"), str(tmp_path / "none"), "--adapter-only"], "has none"),
        ([str(tmp_path / "out"), str(out), "--adapter-only"], "exists"),
    ]:
        capsys.readouterr()
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "a.gguf").exists() and not (tmp_path / "none").exists()
    assert (out / "adapter_model.safetensors").read_bytes() == before


def test_classify_and_eval_commands(tmp_path, capsys):
    assert train_main(classify_settings(tmp_path, max_iters=20, warmup_iters=0)) == 0
    capsys.readouterr()
    model = str(tmp_path / "out")
    assert main(["classify", "--model", model, "--text", "so good film", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert set(row["probabilities"]) == {"neg", "pos"} and row["label"] in ("neg", "pos")
    assert sum(row["probabilities"].values()) == pytest.approx(1.0)
    texts = tmp_path / "texts.txt"
    texts.write_text("bad film\ngood film\n")
    assert main(["classify", "--model", model, "--file", str(texts)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].endswith("bad film")
    assert (
        main(
            [
                "eval",
                "--model",
                model,
                "--task",
                "classification",
                "--data",
                str(tmp_path / "reviews.jsonl"),
                "--json",
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    trainer = Trainer(parse_args(classify_settings(tmp_path, init_from=model, eval_only=True)))
    assert result["examples"] == 40
    # the command scores every record; the run's validation is the last ten of them
    sub = tmp_path / "val.jsonl"
    write_jsonl(sub, reviews()[30:])
    assert (
        main(["eval", "--model", model, "--task", "classification", "--data", str(sub), "--json"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    evals = trainer.evaluate()
    assert result["accuracy"] == pytest.approx(evals["val_accuracy"])
    assert result["loss"] == pytest.approx(evals["val"], rel=1e-5)


def test_csv_and_integer_labels(tmp_path):
    path = tmp_path / "spam.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "text"])
        for i in range(20):
            w.writerow([i % 3, f"message {i}"])
    trainer = Trainer(parse_args(classify_settings(tmp_path, data=str(path))))
    assert trainer.model.config.labels == ("0", "1", "2")
    assert trainer.train_batches.labels.tolist() == [i % 3 for i in range(15)]


@pytest.mark.parametrize(
    "change, extra, message",
    [
        (lambda r: r[4].pop("label"), {}, "record 5 has no 'label' field"),
        (
            lambda r: [x.update(label=i % 3) for i, x in enumerate(r)],
            {"num_labels": 2},
            "record 3: label 2 is not one of the model's 2 classes",
        ),
        (lambda r: r[2].update(label=1), {}, "labels mix integers and names"),
        (lambda r: r[1].update(text=""), {}, "record 2 has an empty 'text'"),
    ],
)
def test_bad_classification_records_are_one_line(tmp_path, change, extra, message):
    rows = reviews()
    change(rows)
    with pytest.raises(MiniGPT2Error, match=message) as e:
        Trainer(parse_args(classify_settings(tmp_path, rows=rows, **extra)))
    assert "\n" not in str(e.value) and "reviews.jsonl" in str(e.value)


def test_a_classifier_is_refused_as_gguf_and_a_language_model_by_classify(tmp_path, capsys):
    pytest.importorskip("gguf")
    assert train_main(classify_settings(tmp_path, max_iters=1)) == 0
    capsys.readouterr()
    code = main(["export", str(tmp_path / "out"), str(tmp_path / "c.gguf")])
    err = capsys.readouterr().err
    assert code != 0 and "classifier" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c.gguf").exists()
    code = main(
        ["classify", "--model", str(tmp_path / "start"), "--tokenizer", "byte", "--text", "x"]
    )
    err = capsys.readouterr().err
    assert code != 0 and "not a classifier" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv, message",
    [
        (["classify"], "nothing to classify"),
        (["classify", "--file", "missing.txt"], "--file missing.txt not found"),
        (["classify", "--text", "x", "--batch-size", "0"], "--batch-size=0 must be at least 1"),
        (["eval", "--task", "classification"], "--task classification needs --data"),
    ],
)
def test_bad_classify_and_eval_options_are_one_line(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    write_wide_byte_checkpoint(tmp_path / "m", 64)
    capsys.readouterr()
    code = main([*argv, "--model", str(tmp_path / "m"), "--tokenizer", "byte"])
    err = capsys.readouterr().err
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1
