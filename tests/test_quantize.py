"""Decoding layouts: int8 weights (`--quantize int8`) and bfloat16's per-shape kernels."""

import copy
import json

import pytest
import torch
from conftest import in_process, write_wide_byte_checkpoint

from minigpt2 import GPT, GPTConfig, MiniGPT2Error
from minigpt2.decode.generate import Generator, SamplingConfig
from minigpt2.decode.kernels import FewRowsLinear, PackedLinear, layout_for_inference
from minigpt2.decode.quantize import Int8Linear, int8_kernel_available, quantize_for_decoding
from minigpt2.model.attention import KVCache

needs_int8 = pytest.mark.skipif(
    not int8_kernel_available(torch.device("cpu")),
    reason="this PyTorch has no CPU int8 weight kernel",
)


def small() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=300)).eval()


@needs_int8
def test_int8_weights_are_within_half_a_step_and_logits_within_two_percent():
    model = small()
    weight = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    layer = Int8Linear(weight, None)
    step = weight.abs().amax(dim=1, keepdim=True) / 127
    # half a rounding step, plus the bfloat16 scale's own rounding over up to 127 steps
    assert torch.all((layer.dequantized() - weight).abs() <= step * (0.5 + 127 * 2.0**-8))
    idx = torch.randint(0, 300, (2, 32))
    with torch.no_grad():
        ref = model(idx)
        out = quantize_for_decoding(copy.deepcopy(model))(idx).float()
    # measured 0.96% (bfloat16 alone: 0.56%) on this model
    assert ((out - ref).norm() / ref.norm()).item() < 0.02
    assert all(not isinstance(m, torch.nn.Linear) for m in quantize_for_decoding(small()).modules())


@needs_int8
def test_quantized_sampling_through_the_command_line(tmp_path):
    model_dir = write_wide_byte_checkpoint(tmp_path / "m", n_positions=64)
    result = in_process(
        ["-m", "minigpt2", "sample", "--model", str(model_dir), "--tokenizer",
         "byte", "--prompt", "hello", "--greedy", "--max-new-tokens", "12", "--quantize", "int8",
         "--json"],
        ".",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    ours = quantize_for_decoding(GPT.from_pretrained(str(model_dir)))
    expected = Generator(ours, vocab_limit=257).generate(
        [list(b"hello")], SamplingConfig(max_new_tokens=12, greedy=True)
    )[0]
    assert json.loads(result.stdout)["token_ids"] == expected


def test_bfloat16_layout_picks_a_kernel_per_shape_and_keeps_the_numbers(tmp_path):
    model = small().to(torch.bfloat16)
    plain = copy.deepcopy(model)
    laid_out = layout_for_inference(model)
    kinds = [type(m) for m in laid_out.modules() if isinstance(m, FewRowsLinear | PackedLinear)]
    assert len(kinds) == 2 * 4 + 1  # every block matrix and the head
    idx = torch.randint(0, 300, (1, 20))
    cfg = SamplingConfig(max_new_tokens=1, greedy=True)
    with torch.inference_mode():
        for rows in (idx[:, :1], idx):  # one row: the decode kernels; 20: prefill's
            a, b = laid_out(rows).float(), plain(rows).float()
            assert ((a - b).norm() / b.norm()).item() < 0.01
        Generator(laid_out).generate([idx[0].tolist()], cfg)
        # decoding attends in float32 over a float32 cache, and matches the whole-window pass
        cache = KVCache(laid_out.config, 1, 20, "cpu", torch.bfloat16)
        assert cache.kv.dtype is torch.float32
        laid_out.hidden_states(idx[:, :19], cache)
        last = laid_out.lm_head(laid_out.hidden_states(idx[:, 19:], cache)).float()
        whole = plain(idx)[:, -1:].float()
        assert ((last - whole).norm() / whole.norm()).item() < 0.01


def test_quantize_bad_input_is_one_line(tmp_path, monkeypatch):
    model_dir = write_wide_byte_checkpoint(tmp_path / "m", n_positions=64)
    result = in_process(
        ["-m", "minigpt2", "sample", "--model", str(model_dir), "--tokenizer",
         "byte", "--quantize", "int4"],
        ".",
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown quantization 'int4'; schemes: int8"
    ]
    import minigpt2.decode.quantize as quantize

    monkeypatch.setattr(quantize, "int8_kernel_available", lambda device: False)
    with pytest.raises(MiniGPT2Error, match="no int8 weight kernel on cpu"):
        quantize_for_decoding(small())


def test_without_the_native_decoder_decoding_runs_in_pytorch(monkeypatch):
    import minigpt2.decode.native as native

    monkeypatch.setattr(native, "_library", lambda: None)  # not built, or a CPU without AVX-512
    model = layout_for_inference(small().to(torch.bfloat16), sequences=1)
    assert any(isinstance(m, FewRowsLinear | PackedLinear) for m in model.modules())
    gen = Generator(model)
    assert gen.native is None
    out = gen.generate([[1, 2, 3]], SamplingConfig(max_new_tokens=5, greedy=True))
    assert len(out[0]) == 5
