"""The training loop: schedule, optimizer groups, accumulation, exact resume, faults."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from minigpt2 import MiniGPT2Error
from minigpt2.cli.train import train_main
from minigpt2.train.config import TrainConfig, parse_args
from minigpt2.train.optim import lr_at, param_groups
from minigpt2.train.trainer import Trainer

CORPUS = "".join(
    f"line {i}: the cat sat on the mat, and the dog ran after it.\n" for i in range(400)
)


def settings(tmp_path, **overrides) -> list[str]:
    """Command-line settings of a tiny CPU run on a small generated corpus."""
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text(CORPUS)
    base = dict(
        data=str(corpus),
        data_cache=str(tmp_path / "cache"),
        out_dir=str(tmp_path / "out"),
        tokenizer="byte",
        n_layer=2,
        n_head=2,
        n_embd=32,
        block_size=32,
        batch_size=4,
        max_iters=6,
        eval_interval=3,
        eval_iters=2,
        log_interval=1,
        checkpoint_interval=3,
        warmup_iters=2,
        learning_rate=3e-3,
        sample_tokens=0,
        progress=False,
        device="cpu",
        threads=1,  # fixed: runs compared bit for bit must not depend on how busy the machine is
        dropout=0.1,
        model="",
    )
    base.update(overrides)
    return [f"--{k}={v}" for k, v in base.items()]


def weights(tmp_path, name="ckpt.safetensors"):
    return {k: v for k, v in load_file(tmp_path / "out" / name).items() if k.startswith("model.")}


def metrics(tmp_path):
    path = tmp_path / "out" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lr_schedule_at_chosen_steps():
    cfg = TrainConfig(
        learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=110, max_iters=200
    )
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 11)
    assert lr_at(9, cfg) == pytest.approx(1e-3 * 10 / 11)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way: cosine at 0.5
    assert lr_at(35, cfg) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4)
    assert lr_at(110, cfg) == pytest.approx(1e-4) and lr_at(150, cfg) == pytest.approx(1e-4)
    linear = TrainConfig(
        learning_rate=1e-3, min_lr=1e-5, warmup_iters=0, max_iters=100, decay="linear"
    )
    assert lr_at(25, linear) == pytest.approx(1e-3 - 0.25 * (1e-3 - 1e-5))
    assert lr_at(50, TrainConfig(decay="constant", warmup_iters=0)) == 1e-3


def test_weight_decay_only_on_matrices():
    from minigpt2 import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=16, vocab_size=50, block_size=8))
    groups, names = param_groups(model, 0.1)
    decayed = {n for n, p in model.named_parameters() if any(p is q for q in groups[0]["params"])}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decayed == {
        f"transformer.h.{i}.{m}.weight"
        for i in range(2)
        for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert "transformer.wte.weight" in names and "transformer.wpe.weight" in names
    assert len(names) == len(list(model.parameters()))  # tied head listed once


def test_gradient_accumulation_equals_larger_batch(tmp_path):
    a = Trainer(parse_args(settings(tmp_path, batch_size=8, dropout=0.0)))
    b = Trainer(
        parse_args(settings(tmp_path, batch_size=4, gradient_accumulation_steps=2, dropout=0.0))
    )
    la, lb = a.train_step(), b.train_step()
    assert la.item() == pytest.approx(lb.item(), abs=1e-6)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_resume_is_exact(tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    full.mkdir(), half.mkdir()
    assert train_main(settings(full, max_iters=6, lr_decay_iters=6)) == 0
    assert train_main(settings(half, max_iters=3, lr_decay_iters=6)) == 0
    assert train_main([f"--out_dir={half / 'out'}", "--init_from=resume", "--max_iters=6"]) == 0
    wf, wh = weights(full), weights(half)
    assert wf.keys() == wh.keys()
    assert all(torch.equal(wf[k], wh[k]) for k in wf)
    assert [m["train_loss"] for m in metrics(full)] == [m["train_loss"] for m in metrics(half)]
    assert [m["val_loss"] for m in metrics(full)] == [m["val_loss"] for m in metrics(half)]


def test_resume_refuses_finished_run_and_missing_checkpoint(tmp_path):
    with pytest.raises(MiniGPT2Error, match="no checkpoint at"):
        train_main(settings(tmp_path, init_from="resume"))
    train_main(settings(tmp_path, max_iters=3))
    with pytest.raises(MiniGPT2Error, match="already reached step 3; raise max_iters"):
        train_main([f"--out_dir={tmp_path / 'out'}", "--init_from=resume"])


def test_outputs_beside_the_checkpoints(tmp_path):
    assert train_main(settings(tmp_path, max_iters=4, eval_interval=2, sample_tokens=8)) == 0
    out = tmp_path / "out"
    assert {"ckpt.safetensors", "best.safetensors", "config.toml", "metrics.jsonl"} <= {
        p.name for p in out.iterdir()
    }
    saved = parse_args([str(out / "config.toml")])
    assert saved.max_iters == 4 and saved.n_embd == 32
    rows = metrics(tmp_path)
    assert [r["iter"] for r in rows] == [1, 2, 3, 4]
    assert {"iter", "train_loss", "val_loss", "lr", "tokens_per_sec", "elapsed"} <= rows[0].keys()
    assert rows[1]["val_loss"] is not None and rows[0]["val_loss"] is None
    assert not any(k.startswith("model._orig_mod") for k in load_file(out / "ckpt.safetensors"))


def test_eval_only_reports_loss_and_perplexity(tmp_path, capsys):
    assert train_main(settings(tmp_path, eval_only="true")) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))
    assert summary["val_loss"] == pytest.approx(math.log(257), abs=0.3)  # untrained: ~uniform


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(parse_args(settings(tmp_path, checkpoint_interval=2, max_iters=10)))
    real_step = trainer.train_step

    def step():
        loss = real_step()
        return loss * float("nan") if trainer.iter == 3 else loss

    monkeypatch.setattr(trainer, "train_step", step)
    with pytest.raises(MiniGPT2Error, match="loss became nan at step 3.*last good checkpoint"):
        trainer.run()
    from minigpt2.formats.checkpoint import load_checkpoint

    tensors, header = load_checkpoint(tmp_path / "out" / "ckpt.safetensors")
    assert header["iter"] == 2 and all(torch.isfinite(t).all() for t in tensors.values())


def test_corrupted_checkpoint_is_refused(tmp_path):
    train_main(settings(tmp_path, max_iters=3))
    path = tmp_path / "out" / "ckpt.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # one flipped byte in the tensor data
    path.write_bytes(bytes(data))
    with pytest.raises(MiniGPT2Error, match="is corrupt: its contents do not match"):
        train_main([f"--out_dir={tmp_path / 'out'}", "--init_from=resume", "--max_iters=6"])
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(MiniGPT2Error, match="truncated or corrupt"):
        train_main([f"--out_dir={tmp_path / 'out'}", "--init_from=resume", "--max_iters=6"])


def test_format_1_checkpoints_still_resume(tmp_path):
    """Checkpoints written before digests by pieces (one digest over the file) still load."""
    import json

    from safetensors.torch import save_file

    from minigpt2.formats.checkpoint import _digest, load_checkpoint

    train_main(settings(tmp_path, max_iters=3))
    path = tmp_path / "out" / "ckpt.safetensors"
    tensors, header = load_checkpoint(path)
    header = {k: v for k, v in header.items() if k not in ("digests", "digest_pieces")}
    header |= {"format_version": 1, "digest": _digest(tensors)}
    save_file(tensors, path, metadata={"format": "pt", "minigpt2": json.dumps(header)})
    again, _ = load_checkpoint(path)
    assert all(torch.equal(again[k], v) for k, v in tensors.items())
    train_main([f"--out_dir={tmp_path / 'out'}", "--init_from=resume", "--max_iters=4"])
    assert load_checkpoint(path)[1]["iter"] == 4


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    import minigpt2.formats.checkpoint as checkpoint

    train_main(settings(tmp_path, max_iters=3))
    before = (tmp_path / "out" / "ckpt.safetensors").read_bytes()

    def full_disk(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(MiniGPT2Error, match="No space left on device.*previous file there is"):
        train_main([f"--out_dir={tmp_path / 'out'}", "--init_from=resume", "--max_iters=6"])
    assert (tmp_path / "out" / "ckpt.safetensors").read_bytes() == before
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]


def test_compiled_model_checkpoints_without_prefix():
    from minigpt2 import GPT, GPTConfig
    from minigpt2.formats.checkpoint import load_model_tensors, model_tensors

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=50, block_size=8))
    compiled = torch.compile(model)  # wrapping is lazy: nothing is compiled here
    tensors = model_tensors(compiled)
    assert tensors.keys() == model_tensors(model).keys()
    fresh = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=50, block_size=8))
    load_model_tensors(torch.compile(fresh), tensors)
    assert torch.equal(fresh.transformer.wte.weight, model.transformer.wte.weight)


def test_resume_with_another_tokenizer_is_refused(tmp_path):
    from conftest import GPT2_TIKTOKEN

    if not GPT2_TIKTOKEN.is_file():
        pytest.skip(f"no GPT-2 BPE at {GPT2_TIKTOKEN}")
    train_main(settings(tmp_path, max_iters=2))
    with pytest.raises(MiniGPT2Error, match="trained with tokenizer 'byte', not 'gpt2'"):
        train_main(
            [
                f"--out_dir={tmp_path / 'out'}",
                "--init_from=resume",
                "--max_iters=4",
                f"--tokenizer={GPT2_TIKTOKEN}",
            ]
        )


def test_sinusoidal_positions_train_resume_exactly_and_refuse_export(tmp_path):
    from minigpt2.decode.generate import Generator, SamplingConfig
    from minigpt2.formats.loading import load_model
    from minigpt2.formats.released import save_pretrained

    full, half = tmp_path / "full", tmp_path / "half"
    full.mkdir(), half.mkdir()
    sin = dict(pos_embedding="sinusoidal", lr_decay_iters=6)
    assert train_main(settings(full, max_iters=6, **sin)) == 0
    assert train_main(settings(half, max_iters=3, **sin)) == 0
    assert train_main([f"--out_dir={half / 'out'}", "--init_from=resume", "--max_iters=6"]) == 0
    wf, wh = weights(full), weights(half)
    assert not any("wpe" in k for k in wf) and wf.keys() == wh.keys()
    assert all(torch.equal(wf[k], wh[k]) for k in wf)
    val = [m["val_loss"] for m in metrics(full) if m["val_loss"] is not None]
    assert val == [m["val_loss"] for m in metrics(half) if m["val_loss"] is not None]
    assert val[-1] < val[0] < math.log(257)  # it learns
    model, _ = load_model(full / "out" / "ckpt.safetensors")
    assert model.config.pos_embedding == "sinusoidal"
    gen, cfg = Generator(model), SamplingConfig(max_new_tokens=40, greedy=True)
    assert gen.generate([[104, 105]], cfg) == gen.generate([[104, 105]], cfg, use_cache=False)
    with pytest.raises(MiniGPT2Error, match="only learned positions"):
        save_pretrained(model, tmp_path / "export")
    assert not (tmp_path / "export").exists()
    with pytest.raises(
        MiniGPT2Error, match="pos_embedding=sinusoidal applies to init_from=scratch"
    ):
        Trainer(parse_args(settings(tmp_path, init_from=str(full / "out"), **sin)))


def test_fine_tune_from_a_training_out_dir(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    assert train_main(settings(base, max_iters=3)) == 0
    start = weights(base, "best.safetensors")
    trainer = Trainer(parse_args(settings(tmp_path, init_from=str(base / "out"), dropout=0.0)))
    assert trainer.iter == 0  # a fresh run from those weights, not a resume
    for name, value in trainer.model.state_dict().items():
        if name != "lm_head.weight":
            assert torch.equal(value, start[f"model.{name}"]), name
    from conftest import GPT2_TIKTOKEN

    if not GPT2_TIKTOKEN.is_file():
        pytest.skip(f"no GPT-2 BPE file at {GPT2_TIKTOKEN} for the tokenizer mismatch")
    other = settings(tmp_path, init_from=str(base / "out"), tokenizer=str(GPT2_TIKTOKEN))
    with pytest.raises(MiniGPT2Error, match="trained with tokenizer 'byte'; pass --tokenizer=byte"):
        Trainer(parse_args(other))
