"""The model on its own: shapes, causality, attention paths, parameter count, init, errors."""

import math

import pytest
import torch

from minigpt2 import GPT, GPTConfig, MiniGPT2Error


def tiny(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=4, n_embd=32, vocab_size=97, block_size=16, **kw)).eval()


def test_logits_and_loss_shapes():
    model = tiny()
    idx = torch.randint(0, 97, (3, 10))
    assert model(idx).shape == (3, 10, 97)
    logits, loss = model(idx, torch.randint(0, 97, (3, 10)))
    assert logits.shape == (3, 10, 97)
    # a fresh model predicts nearly uniformly: loss close to ln(vocab)
    assert abs(loss.item() - math.log(97)) < 0.1


def test_causality_changing_token_t_leaves_earlier_logits():
    model = tiny()
    idx = torch.randint(0, 97, (2, 16))
    base = model(idx)
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 97
        out = model(changed)
        assert torch.equal(out[:, :t], base[:, :t])
        assert not torch.allclose(out[:, t:], base[:, t:])


def test_sdpa_and_explicit_masked_softmax_agree():
    a, b = tiny(attn_impl="sdpa"), tiny(attn_impl="math")
    idx = torch.randint(0, 97, (2, 16))
    assert torch.allclose(a(idx), b(idx), atol=1e-5)


def test_kv_cache_matches_full_forward():
    from minigpt2.model.gpt import KVCache

    for impl in ("sdpa", "math"):
        model = tiny(attn_impl=impl)
        idx = torch.randint(0, 97, (2, 12))
        full = model.hidden_states(idx)
        cache = KVCache(model.config, 2, 16, "cpu", torch.float32)
        parts = [model.hidden_states(idx[:, :5], cache)]
        parts += [model.hidden_states(idx[:, t : t + 1], cache) for t in range(5, 9)]
        parts.append(model.hidden_states(idx[:, 9:], cache))  # a multi-token step after the past
        assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_gpt2_parameter_count_and_flops():
    model = GPT(GPTConfig.preset("gpt2"))
    assert model.num_params() == 124_439_808
    n = model.num_params(non_embedding=True)
    assert n == 124_439_808 - 1024 * 768
    assert model.flops_per_token(1024) == 6 * n + 12 * 12 * 768 * 1024


def test_head_is_tied_and_init_follows_gpt2():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, vocab_size=500, block_size=64))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert abs(model.transformer.wte.weight.std().item() - 0.02) < 1e-3
    proj = model.transformer.h[0].mlp.c_proj.weight
    assert abs(proj.std().item() - 0.02 / math.sqrt(16)) < 5e-4
    assert torch.count_nonzero(model.transformer.h[0].attn.c_attn.bias) == 0


def test_sequence_longer_than_context_is_an_error():
    with pytest.raises(MiniGPT2Error, match="longer than the model's context"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_crop_block_size():
    model = tiny()
    model.crop_block_size(8)
    assert model.transformer.wpe.weight.shape == (8, 32)
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 97)
    with pytest.raises(MiniGPT2Error, match="block_size=9"):
        model.crop_block_size(9)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=30, n_head=4), "not divisible"),
        (dict(n_layer=0), "n_layer must be at least 1"),
        (dict(dropout=1.5), "dropout"),
        (dict(attn_impl="flash"), "attn_impl"),
    ],
)
def test_bad_model_config(kwargs, message):
    with pytest.raises(MiniGPT2Error, match=message):
        GPTConfig(**kwargs)


def test_presets_and_unknown_preset():
    assert GPTConfig.preset("gpt2-xl").n_embd == 1600
    assert GPTConfig.preset("gpt2-medium", dropout=0.1).dropout == 0.1
    with pytest.raises(MiniGPT2Error, match="unknown model preset 'gpt3'.*gpt2-medium"):
        GPTConfig.preset("gpt3")
    with pytest.raises(MiniGPT2Error, match="unknown key"):
        GPTConfig.from_dict({"n_layers": 3})


def test_device_switch():
    from minigpt2.device import resolve_device, resolve_dtype

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(MiniGPT2Error, match="CUDA is not available"):
            resolve_device("cuda:1")
    with pytest.raises(MiniGPT2Error, match="unknown device 'tpu0'"):
        resolve_device("tpu0")
    assert resolve_dtype("bfloat16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(MiniGPT2Error, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_gpu_peaks_by_exact_name_and_native_bfloat16_only(monkeypatch):
    """Without a GPU: the table is read by the exact device name, fp16 and bf16 apart, TF32
    where it is on; emulated bfloat16 is refused; tf32 sets torch's CUDA matmul precision."""
    from minigpt2 import device as dev

    cuda = torch.device("cuda", 0)
    name = ["NVIDIA H100 PCIe"]
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name[0])
    assert dev.peak_flops(cuda, torch.bfloat16) == 756e12  # not the SXM part's 989
    assert dev.peak_flops(cuda, torch.float32) == 51.2e12
    assert dev.peak_flops(cuda, torch.float32, tf32=True) == 378e12
    name[0] = "NVIDIA L40"  # not the L4
    assert dev.peak_flops(cuda, torch.float16) == 181e12
    name[0] = "Tesla T4"
    assert dev.peak_flops(cuda, torch.float16) == 65e12
    assert dev.peak_flops(cuda, torch.bfloat16) is None  # emulated only: no peak to quote
    assert dev.peak_flops(cuda, torch.float32, tf32=True) == 8.1e12  # no TF32 units
    name[0] = "Some Future GPU"
    assert dev.peak_flops(cuda, torch.bfloat16) is None

    asked = {}

    def bf16_supported(including_emulation=True):
        asked["including_emulation"] = including_emulation
        return including_emulation  # a T4: bfloat16 only through emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_supported)
    name[0] = "Tesla T4"
    with pytest.raises(MiniGPT2Error, match="Tesla T4 has no native bfloat16; use --dtype=float16"):
        dev.resolve_dtype("bfloat16", cuda)
    assert asked["including_emulation"] is False
    before = torch.backends.cuda.matmul.fp32_precision
    try:
        dev.use_tf32(cuda, True)
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        dev.use_tf32(cuda, False)
        assert torch.backends.cuda.matmul.fp32_precision == "ieee"
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
