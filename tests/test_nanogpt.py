"""nanoGPT's ckpt.pt in: sampling, fine-tuning and export read it safely and exactly."""

import pickle

import pytest
import torch
from conftest import GPT2_TIKTOKEN, in_process

from minigpt2 import GPT, GPTConfig
from minigpt2.errors import MiniGPT2Error
from minigpt2.formats.loading import load_any


def nanogpt_model(bias: bool, vocab_size: int = 50304) -> GPT:
    """A model of the shape nanoGPT trains: exact GELU, vocabulary padded to 50304."""
    torch.manual_seed(0)
    config = GPTConfig(
        n_layer=2,
        n_head=2,
        n_embd=32,
        block_size=64,
        vocab_size=vocab_size,
        bias=bias,
        gelu="exact",
    )
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model.eval()


def save_nanogpt(model: GPT, path, compiled: bool = True, mask_buffers: bool = True) -> None:
    """torch.save the dict nanoGPT's train.py writes: its key names, a torch.compile prefix,
    the causal-mask buffers old PyTorch saves, optimizer state and the run's config."""
    c = model.config
    prefix = "_orig_mod." if compiled else ""
    state = {prefix + k: v.clone() for k, v in model.state_dict().items()}
    if mask_buffers:
        mask = torch.tril(torch.ones(c.block_size, c.block_size)).view(1, 1, c.block_size, -1)
        for i in range(c.n_layer):
            state[f"{prefix}transformer.h.{i}.attn.bias"] = mask
    model_args = dict(
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_embd=c.n_embd,
        block_size=c.block_size,
        bias=c.bias,
        vocab_size=c.vocab_size,
        dropout=0.0,
    )
    optimizer = torch.optim.AdamW(model.parameters()).state_dict()
    torch.save(
        {
            "model": state,
            "optimizer": optimizer,
            "model_args": model_args,
            "iter_num": 2000,
            "best_val_loss": torch.tensor(1.47),
            "config": {"dataset": "openwebtext", "learning_rate": 6e-4, "compile": compiled},
        },
        path,
    )


@pytest.mark.parametrize("bias", [True, False])
def test_nanogpt_checkpoint_gives_the_same_logits(tmp_path, bias):
    source = nanogpt_model(bias)
    save_nanogpt(source, tmp_path / "ckpt.pt")
    loaded, header = load_any(str(tmp_path / "ckpt.pt"))
    assert loaded.config == source.config and header["tokenizer"] == "gpt2"
    idx = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(idx), source(idx))


def test_nanogpt_export_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    source = nanogpt_model(bias=False)  # zero biases in the export compute the same thing
    save_nanogpt(source, tmp_path / "ckpt.pt", compiled=False, mask_buffers=False)
    result = in_process(
        [
            "-m",
            "minigpt2",
            "export",
            str(tmp_path / "ckpt.pt"),
            str(tmp_path / "hf"),
            "--no-tokenizer",
        ],
        ".",
    )
    assert result.returncode == 0, result.stderr
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.activation_function == "gelu"  # nanoGPT's exact GELU travels along
    idx = torch.randint(0, 50257, (2, 64))
    with torch.no_grad():
        assert (hf(idx).logits - source(idx)).abs().max().item() < 1e-4


@pytest.mark.skipif(not GPT2_TIKTOKEN.is_file(), reason=f"no GPT-2 BPE file at {GPT2_TIKTOKEN}")
def test_sample_and_fine_tune_from_nanogpt(tmp_path):
    from minigpt2.cli.train import train_main

    save_nanogpt(nanogpt_model(bias=True), tmp_path / "ckpt.pt")
    sample = in_process(
        [
            "-m",
            "minigpt2",
            "sample",
            "--model",
            str(tmp_path / "ckpt.pt"),
            "--tokenizer",
            str(GPT2_TIKTOKEN),
            "--prompt",
            "Hello",
            "--greedy",
            "--max-new-tokens",
            "5",
            "--json",
        ],
        ".",
    )
    assert sample.returncode == 0, sample.stderr
    (tmp_path / "data.txt").write_text("To be, or not to be, that is the question. " * 300)
    code = train_main(
        [
            f"--init_from={tmp_path / 'ckpt.pt'}",
            f"--data={tmp_path / 'data.txt'}",
            f"--tokenizer={GPT2_TIKTOKEN}",
            f"--out_dir={tmp_path / 'out'}",
            f"--data_cache={tmp_path / 'cache'}",
            "--max_iters=2",
            "--batch_size=2",
            "--block_size=32",
            "--eval_interval=2",
            "--eval_iters=1",
            "--device=cpu",
            "--progress=false",
        ]
    )
    assert code == 0
    tuned, header = load_any(str(tmp_path / "out"), "latest")
    assert tuned.config.gelu == "exact" and tuned.config.vocab_size == 50304
    assert header["iter"] == 2


def test_nanogpt_bad_inputs_are_one_line(tmp_path):
    # a character-level run: its meta.pkl beside the checkpoint
    save_nanogpt(nanogpt_model(bias=True, vocab_size=65), tmp_path / "ckpt.pt")
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 65, "itos": {}, "stoi": {}}, f)
    with pytest.raises(MiniGPT2Error, match="vocab_size 65 is a character vocabulary"):
        load_any(str(tmp_path / "ckpt.pt"))
    # a pickle that would run code is refused by the weights-only loader
    torch.save({"model": {}, "model_args": {}, "obj": ValueError("x")}, tmp_path / "code.pt")
    with pytest.raises(MiniGPT2Error, match="weights-only load refuses"):
        load_any(str(tmp_path / "code.pt"))
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(MiniGPT2Error, match="not a nanoGPT checkpoint"):
        load_any(str(tmp_path / "other.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(MiniGPT2Error, match="not a readable PyTorch checkpoint"):
        load_any(str(tmp_path / "junk.pt"))
    model = nanogpt_model(bias=True)
    save_nanogpt(model, tmp_path / "shape.pt")
    saved = torch.load(tmp_path / "shape.pt", weights_only=True)
    saved["model_args"]["n_embd"] = 64
    torch.save(saved, tmp_path / "shape.pt")
    with pytest.raises(MiniGPT2Error, match="weights do not match model_args"):
        load_any(str(tmp_path / "shape.pt"))
