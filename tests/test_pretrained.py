"""Released-weight loading and export, against transformers as the reference."""

import json

import pytest
import torch
from conftest import write_hf_checkpoint

from minigpt2 import GPT, MiniGPT2Error

transformers = pytest.importorskip("transformers")


def hf_logits_and_loss(directory, idx):
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    with torch.no_grad():
        out = hf(idx, labels=idx)
    return out.logits, out.loss


@pytest.mark.parametrize(
    "cfg, published",
    [
        (dict(n_layer=2, n_head=2, n_embd=64, vocab_size=300, n_positions=64), False),
        (dict(n_layer=3, n_head=4, n_embd=96, vocab_size=517, n_positions=40), True),
        (dict(n_layer=1, n_head=3, n_embd=48, vocab_size=1000, n_positions=32), True),
    ],
)
def test_small_configs_match_transformers(tmp_path, cfg, published):
    directory = write_hf_checkpoint(tmp_path / "ckpt", published=published, **cfg)
    idx = torch.randint(0, cfg["vocab_size"], (3, cfg["n_positions"]))
    ref_logits, ref_loss = hf_logits_and_loss(directory, idx)
    model = GPT.from_pretrained(directory).eval()
    with torch.no_grad():
        logits = model(idx)
        _, loss = model(idx[:, :-1], idx[:, 1:])
    assert (logits - ref_logits).abs().max().item() < 1e-4
    assert abs(loss.item() - ref_loss.item()) < 1e-5


def test_full_gpt2_shape_matches_transformers(tmp_path):
    directory = write_hf_checkpoint(tmp_path / "gpt2", published=True)  # GPT2Config() = gpt2
    idx = torch.randint(0, 50257, (2, 64))
    ref_logits, ref_loss = hf_logits_and_loss(directory, idx)
    model = GPT.from_pretrained(directory).eval()
    assert model.num_params() == 124_439_808
    with torch.no_grad():
        logits = model(idx)
        _, loss = model(idx[:, :-1], idx[:, 1:])
    assert (logits - ref_logits).abs().max().item() < 1e-4
    assert abs(loss.item() - ref_loss.item()) < 1e-4


def test_export_round_trip_through_transformers(tmp_path):
    from minigpt2 import GPTConfig

    torch.manual_seed(1)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=211, block_size=24)).eval()
    model.save_pretrained(tmp_path / "export")
    from safetensors.torch import load_file

    keys = load_file(tmp_path / "export" / "model.safetensors").keys()
    assert "wte.weight" in keys and "lm_head.weight" not in keys
    assert not [k for k in keys if "_orig_mod" in k or k.startswith("transformer.")]
    idx = torch.randint(0, 211, (2, 24))
    ref_logits, _ = hf_logits_and_loss(tmp_path / "export", idx)
    with torch.no_grad():
        assert (model(idx) - ref_logits).abs().max().item() < 1e-5
        again = GPT.from_pretrained(tmp_path / "export").eval()
        assert torch.equal(again(idx), model(idx))


def test_compiled_wrapper_exports_without_prefix(tmp_path):
    from minigpt2 import GPTConfig

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=50, block_size=8))
    wrapped = torch.nn.Module()
    wrapped._orig_mod = model  # what torch.compile's OptimizedModule holds
    from minigpt2.formats.released import released_state

    assert set(released_state(wrapped)) == set(released_state(model))


def test_block_size_crop_on_load(hf_tiny):
    model = GPT.from_pretrained(hf_tiny, block_size=16)
    assert model.config.block_size == 16
    assert model.transformer.wpe.weight.shape[0] == 16


def test_missing_directory(tmp_path):
    with pytest.raises(MiniGPT2Error, match="neither a directory nor a released model"):
        GPT.from_pretrained(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(MiniGPT2Error, match="no config.json"):
        GPT.from_pretrained(tmp_path)


def test_unknown_preset_lists_presets():
    with pytest.raises(MiniGPT2Error, match="gpt2-medium"):
        GPT.from_pretrained("gpt5")


def test_preset_offline_without_cache_says_pass_a_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
    with pytest.raises(MiniGPT2Error, match="pass a local directory holding config.json"):
        GPT.from_pretrained("gpt2")


def test_config_that_does_not_match_weights(hf_tiny):
    path = hf_tiny / "config.json"
    cfg = json.loads(path.read_text())
    cfg["n_embd"] = 128
    path.write_text(json.dumps(cfg))
    with pytest.raises(MiniGPT2Error, match="shape .* config.json implies"):
        GPT.from_pretrained(hf_tiny)
    cfg["n_embd"], cfg["n_layer"] = 64, 3
    path.write_text(json.dumps(cfg))
    with pytest.raises(MiniGPT2Error, match="weights do not match config.json"):
        GPT.from_pretrained(hf_tiny)


def test_truncated_safetensors(hf_tiny):
    path = hf_tiny / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MiniGPT2Error, match="truncated or corrupt"):
        GPT.from_pretrained(hf_tiny)


def test_garbage_safetensors(hf_tiny):
    (hf_tiny / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(MiniGPT2Error, match="truncated or corrupt"):
        GPT.from_pretrained(hf_tiny)


def test_bad_config_json(hf_tiny):
    (hf_tiny / "config.json").write_text("{not json")
    with pytest.raises(MiniGPT2Error, match="not valid JSON"):
        GPT.from_pretrained(hf_tiny)


def test_unsupported_variant(hf_tiny):
    path = hf_tiny / "config.json"
    cfg = json.loads(path.read_text())
    cfg["activation_function"] = "relu"
    path.write_text(json.dumps(cfg))
    with pytest.raises(MiniGPT2Error, match="unsupported GPT-2 variant.*activation_function"):
        GPT.from_pretrained(hf_tiny)


def test_pytorch_bin_layout(tmp_path, hf_tiny):
    from safetensors.torch import load_file

    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((hf_tiny / "config.json").read_text())
    torch.save(load_file(hf_tiny / "model.safetensors"), tmp_path / "bin" / "pytorch_model.bin")
    a = GPT.from_pretrained(hf_tiny).eval()
    b = GPT.from_pretrained(tmp_path / "bin").eval()
    idx = torch.randint(0, 300, (1, 10))
    assert torch.equal(a(idx), b(idx))
