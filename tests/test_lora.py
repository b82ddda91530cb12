"""Low-rank adapters: parameter counts, exact start, merge, PEFT's format, resume, bad input."""

import json
import shutil

import pytest
import torch
from conftest import in_process, write_hf_checkpoint, write_wide_byte_checkpoint
from safetensors.torch import load_file
from test_distributed import assert_same_run, run_world
from test_train import settings

from minigpt2 import GPT, GPTConfig, MiniGPT2Error
from minigpt2.cli.train import train_main
from minigpt2.formats.checkpoint import load_checkpoint
from minigpt2.formats.loading import load_any
from minigpt2.model.lora import LoRAConfig, LoRALinear, apply_lora, merge_lora
from minigpt2.train.optim import param_groups


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_gpt2_shape_r8_on_c_attn_trains_294912_parameters():
    with torch.device("meta"):
        model = GPT(GPTConfig())
        total = model.num_params()
        apply_lora(model, LoRAConfig())  # PEFT's GPT-2 default: c_attn, r=8
    assert trainable(model) == 294_912  # 12 layers x 8 x (768 + 2304)
    assert 294_912 / (total + 294_912) == pytest.approx(0.00237, abs=1e-5)
    names = param_groups(model, 0.1)[1]
    assert all(n.endswith((".lora_A", ".lora_B")) for n in names) and len(names) == 24


def adapted(targets=("c_attn", "c_proj", "c_fc", "lm_head"), **cfg):
    torch.manual_seed(0)
    base = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=97)).eval()
    model = GPT(base.config)
    model.load_state_dict(base.state_dict())
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=targets), **cfg)
    return base, model.eval()


def test_adapted_model_starts_exactly_at_its_base():
    base, model = adapted()
    idx = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        assert torch.equal(model(idx), base(idx))


def test_merged_logits_equal_base_plus_adapters():
    _, model = adapted()
    with torch.no_grad():  # stand in for training: non-zero updates everywhere
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_(0.0, 0.2)
    idx = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        before = model(idx)
        merged = merge_lora(model)(idx)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (merged - before).abs().max().item() < 1e-5


def test_bfloat16_base_halves_block_weights_and_stays_close():
    base, model = adapted(targets=("c_attn",), base_dtype=torch.bfloat16)
    blocks = [m for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert len(blocks) == 8 and all(m.weight.dtype is torch.bfloat16 for m in blocks)
    assert model.lm_head.weight.dtype is torch.float32  # embeddings and head stay float32
    idx = torch.randint(0, 97, (2, 32))
    with torch.no_grad():
        assert (model(idx) - base(idx)).abs().max().item() < 0.05


def test_activation_checkpointing_gives_the_same_gradients():
    _, model = adapted()
    model.train()
    idx = torch.randint(0, 97, (2, 33))
    grads = []
    for on in (False, True):
        model.activation_checkpointing = on
        model.zero_grad()
        torch.manual_seed(1)
        model(idx[:, :-1], idx[:, 1:])[1].backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.fixture
def base_dir(tmp_path):
    """A released-layout base (transformers' own file) for the byte tokenizer."""
    return write_wide_byte_checkpoint(tmp_path / "base", n_positions=32)


def lora_run(tmp_path, base_dir, **kw):
    kw = {
        "init_from": str(base_dir),
        "lora_r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.1,
        "lora_targets": "c_attn,mlp.c_proj,lm_head",
        "n_layer": 0,
        "n_head": 0,
        "n_embd": 0,
        **kw,
    }
    return [a for a in settings(tmp_path, **kw) if not a.startswith(("--n_", "--model"))]


def test_lora_checkpoint_holds_only_adapters_and_resumes_exactly(tmp_path, base_dir):
    assert train_main(lora_run(tmp_path, base_dir, max_iters=6)) == 0
    full = load_file(tmp_path / "out" / "ckpt.safetensors")
    model_keys = [k for k in full if k.startswith("model.")]
    assert model_keys and all(k.endswith((".lora_A", ".lora_B")) for k in model_keys)
    assert all(".lora_" in k for k in full if k.startswith("optim."))
    shutil.move(tmp_path / "out", tmp_path / "full")
    assert train_main(lora_run(tmp_path, base_dir, max_iters=3)) == 0
    out = str(tmp_path / "out")
    assert train_main([f"--out_dir={out}", "--init_from=resume", "--max_iters=6"]) == 0
    again = load_file(tmp_path / "out" / "ckpt.safetensors")
    for k in model_keys:
        assert torch.equal(full[k], again[k]), k


def test_adapter_only_export_loads_in_peft_with_the_same_logits(tmp_path, base_dir):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    assert train_main(lora_run(tmp_path, base_dir, max_iters=4, lora_dropout=0.0)) == 0
    result = in_process(
        ["-m", "minigpt2", "export", str(tmp_path / "out"),
         str(tmp_path / "adapter"), "--adapter-only", "--checkpoint", "latest"],
        ".",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] is True
    assert config["r"] == 4 and config["target_modules"] == ["c_attn", "mlp.c_proj", "lm_head"]
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
    hf = transformers.GPT2LMHeadModel.from_pretrained(base_dir)
    with pytest.warns(UserWarning, match="fan_in_fan_out"):  # lm_head is nn.Linear, not Conv1D
        peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    ours, _ = load_any(str(tmp_path / "out"), "latest")  # base + adapters, merged
    idx = torch.randint(0, 257, (2, 32))
    with torch.no_grad():
        diff = (peft_model(idx).logits - ours.eval()(idx)).abs().max().item()
    assert diff < 1e-4
    assert not torch.equal(ours.lm_head.weight, ours.transformer.wte.weight)  # adapters trained


def test_sample_and_merged_export_of_a_lora_run(tmp_path, base_dir):
    transformers = pytest.importorskip("transformers")
    args = lora_run(tmp_path, base_dir, max_iters=3, lora_targets="c_attn,c_fc")
    assert train_main(args) == 0
    sample = in_process(
        ["-m", "minigpt2", "sample", "--model", str(tmp_path / "out"),
         "--prompt", "the cat", "--max-new-tokens", "8", "--greedy", "--json"],
        ".",
    )  # fmt: skip
    assert sample.returncode == 0, sample.stderr
    ours, _ = load_any(str(tmp_path / "out"))
    ids = torch.tensor([[116, 104, 101, 32, 99, 97, 116]])
    with torch.no_grad():
        greedy = ours.eval()(ids)[0, -1].argmax().item()
    assert json.loads(sample.stdout)["token_ids"][0] == greedy
    exported = in_process(
        ["-m", "minigpt2", "export", str(tmp_path / "out"),
         str(tmp_path / "merged"), "--tokenizer", "byte"],
        ".",
    )  # fmt: skip
    assert exported.returncode == 0, exported.stderr
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    idx = torch.randint(0, 257, (2, 32))
    with torch.no_grad():
        assert (hf(idx).logits - ours(idx)).abs().max().item() < 1e-4


def test_two_processes_match_one_with_lora(tmp_path, base_dir):
    common = dict(
        batch_size=2, gradient_accumulation_steps=2, max_iters=4, lr_decay_iters=4,
        eval_interval=2, checkpoint_interval=2, threads=1, lora_dropout=0.0, dropout=0.0,
    )  # fmt: skip
    for world, name in ((1, "one"), (2, "two")):
        args = lora_run(tmp_path, base_dir, **common, out_dir=tmp_path / name)
        run_world(world, args, tmp_path)
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_lora_bad_inputs_are_one_line(tmp_path, base_dir):
    with pytest.raises(MiniGPT2Error, match="lora_r=-1 must not be negative"):
        train_main(lora_run(tmp_path, base_dir, lora_r=-1))
    with pytest.raises(MiniGPT2Error, match=r"unknown lora_targets \['q_proj'\]"):
        train_main(lora_run(tmp_path, base_dir, lora_targets="c_attn,q_proj"))
    with pytest.raises(MiniGPT2Error, match="LoRA adapts a trained model"):
        train_main(lora_run(tmp_path, base_dir, init_from="scratch"))
    with pytest.raises(MiniGPT2Error, match="not supported"):
        train_main(lora_run(tmp_path, base_dir, fsdp=True))
    assert not (tmp_path / "out").exists()
    assert train_main(lora_run(tmp_path, base_dir, max_iters=2)) == 0
    shutil.move(base_dir, tmp_path / "moved")  # resuming needs the base the adapters are for
    with pytest.raises(MiniGPT2Error, match="holds adapters for base model"):
        train_main([f"--out_dir={tmp_path / 'out'}", "--init_from=resume", "--max_iters=4"])
    # another shape in the same place
    write_hf_checkpoint(base_dir, n_layer=2, n_head=4, n_embd=32, vocab_size=257, n_positions=32)
    with pytest.raises(MiniGPT2Error, match="trained on a base with another shape"):
        load_any(str(tmp_path / "out"))
    tensors, header = load_checkpoint(tmp_path / "out" / "ckpt.safetensors")
    assert header["iter"] == 2  # nothing was overwritten
