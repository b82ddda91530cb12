"""Muon for the blocks' matrices: its update against a hand-written one, which parameters it
takes, exact resume, two processes against one, bad input."""

import math
import shutil

import pytest
import torch
from test_distributed import assert_same_run, run_world, tiny
from test_train import settings, weights

from minigpt2 import GPT, GPTConfig, MiniGPT2Error
from minigpt2.cli.train import train_main
from minigpt2.train.config import TrainConfig
from minigpt2.train.optim import build_optimizer

NS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic Newton-Schulz coefficients


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Orthogonalize g as Muon does: Frobenius-normalize, then 5 quintic steps, in bfloat16."""
    a, b, c = NS
    x = g.bfloat16()
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):  # x <- a x + (b G + c G^2) x, G = x x^T; each product one rounding
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def small_model() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))


def test_muon_step_matches_a_hand_written_update():
    model = small_model()
    cfg = TrainConfig(optimizer="muon", muon_lr=0.05, muon_momentum=0.9, learning_rate=1e-3)
    opt, names = build_optimizer(model, cfg, torch.device("cpu"))
    w = model.transformer.h[0].mlp.c_fc.weight  # (64, 16): taller than wide
    expected, buf = w.detach().clone(), torch.zeros_like(w)
    for step in range(2):
        torch.manual_seed(step)
        grad = torch.randn_like(w)
        for p in model.parameters():
            p.grad = grad.clone() if p is w else torch.zeros_like(p)
        for group in opt.param_groups:
            group["lr"] = cfg.learning_rate * group.get("lr_scale", 1.0)
        opt.step()
        buf = 0.9 * buf + 0.1 * grad  # momentum, as a running average
        nesterov = 0.1 * grad + 0.9 * buf
        adjusted = 0.05 * math.sqrt(max(1, 64 / 16))  # "original": sqrt(max(1, out/in))
        expected = expected - adjusted * newton_schulz(nesterov).float()
    assert torch.allclose(w.detach(), expected, atol=1e-6)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = small_model()
    opt, names = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    muon, adamw = opt.parts
    by_id = {id(p): n for n, p in model.named_parameters()}
    to_muon = sorted(by_id[id(p)] for g in muon.param_groups for p in g["params"])
    assert to_muon == [
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.0.mlp.c_proj.weight",
    ]
    rest = {by_id[id(p)] for g in adamw.param_groups for p in g["params"]}
    assert "transformer.wte.weight" in rest and "transformer.wpe.weight" in rest
    assert "transformer.h.0.ln_1.weight" in rest and "transformer.h.0.attn.c_attn.bias" in rest
    assert len(names) == len(set(names)) == len(list(model.parameters()))
    assert muon.param_groups[0]["lr_scale"] == pytest.approx(0.02 / 1e-3)


def test_muon_resumes_exactly_with_dropout(tmp_path):
    args = dict(optimizer="muon", muon_lr=0.02, dropout=0.1, max_iters=6)
    assert train_main(settings(tmp_path, **args)) == 0
    full = weights(tmp_path)
    shutil.rmtree(tmp_path / "out")
    assert train_main(settings(tmp_path, **{**args, "max_iters": 3})) == 0
    out = str(tmp_path / "out")
    assert train_main([f"--out_dir={out}", "--init_from=resume", "--max_iters=6"]) == 0
    again = weights(tmp_path)
    assert full.keys() == again.keys()
    for k in full:
        assert torch.equal(full[k], again[k]), k


def test_two_processes_match_one_with_muon(tmp_path):
    run_world(1, tiny(tmp_path, "one", optimizer="muon"), tmp_path)
    run_world(2, tiny(tmp_path, "two", optimizer="muon"), tmp_path)
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_muon_bad_input_is_one_line(tmp_path):
    with pytest.raises(MiniGPT2Error, match="optimizer=muon needs whole weight matrices"):
        train_main(settings(tmp_path, optimizer="muon", fsdp=True))
    with pytest.raises(MiniGPT2Error, match="optimizer='lion'; use one of adamw, adam, muon"):
        train_main(settings(tmp_path, optimizer="lion"))
    with pytest.raises(MiniGPT2Error, match="muon_adjust_lr='rms'"):
        train_main(settings(tmp_path, optimizer="muon", muon_adjust_lr="rms"))
    assert not (tmp_path / "out").exists()
