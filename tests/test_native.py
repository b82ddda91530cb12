"""The native decoder (native.c): its step and few-row products against PyTorch's numbers."""

import copy
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import fill_slots, slot_tokens, write_hf_checkpoint

from minigpt2 import GPT, GPTConfig, MiniGPT2Error
from minigpt2.decode.generate import Generator, SamplingConfig
from minigpt2.decode.kernels import layout_for_inference, pack_beside_native
from minigpt2.decode.native import (
    NativeDecoder,
    NativeLinear,
    instruction_set,
    instruction_sets,
    native_available,
    slots_attention,
    use_native_linears,
)
from minigpt2.decode.quantize import Int8Linear, quantize_for_decoding
from minigpt2.model.attention import KVCache

pytestmark = pytest.mark.skipif(
    not native_available(), reason="native decoder not built, or this CPU has no AVX2"
)


@pytest.fixture(params=["avx512bf16", "avx512", "avx2"], autouse=True)
def isa(request):
    """Every test in each instruction set this CPU has (AVX2's kernels run on AVX-512 CPUs)."""
    if request.param not in instruction_sets():
        pytest.skip(f"this CPU has no {request.param}, or the build has no kernels for it")
    yield instruction_set(request.param)
    instruction_set(None)


def odd_model(**overrides) -> GPT:
    """Widths that are no multiple of 8 or 16 (66 columns, head size 11, MLP 264 = 16 x 16 + 8,
    a 37-row head): every kernel's tails run, in AVX2 and AVX-512. Wide init: logits far
    apart, as real models' are."""
    torch.manual_seed(0)
    cfg = dict(n_layer=2, n_head=6, n_embd=66, vocab_size=37, block_size=40)
    model = GPT(GPTConfig(**(cfg | overrides)))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


def steps(model: GPT, decoder: NativeDecoder, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits of the native step after each token from `prompt` on (the prompt by PyTorch)."""
    cache = KVCache(model.config, 1, ids.shape[1], "cpu", torch.float32)
    with torch.inference_mode():
        model.hidden_states(ids[:, :prompt], cache)
        return torch.cat([decoder.step(int(t), cache).clone() for t in ids[0, prompt:]])


@pytest.mark.parametrize(
    "overrides", [{}, {"gelu": "exact", "pos_embedding": "sinusoidal"}, {"bias": False}]
)
def test_float32_step_equals_the_model(overrides):
    model = odd_model(**overrides)
    ids = torch.randint(0, 37, (1, 30))
    with torch.inference_mode():
        ref = model(ids)[0, 10:]
    out = steps(model, NativeDecoder(model), ids, prompt=10)
    assert torch.allclose(out, ref, atol=2e-5, rtol=1e-5), (out - ref).abs().max()


def float_twin(quantized: GPT) -> GPT:
    """A float32 model holding the weights quantized multiplies by: bfloat16 ones widened,
    int8 ones dequantized (the head's int8 copy untied from the embedding)."""
    twin = GPT(quantized.config).eval()
    with torch.no_grad():
        for name, layer in quantized.named_modules():
            target = twin.get_submodule(name)
            if isinstance(layer, Int8Linear):
                target.weight = torch.nn.Parameter(layer.dequantized())
                if layer.bias is not None:
                    target.bias.copy_(layer.bias.float())
            else:  # parameters, and buffers (a sinusoidal table rounded to bfloat16 too)
                for key, p in [*layer.named_parameters(recurse=False), *layer.named_buffers(
                        recurse=False)]:  # fmt: skip
                    getattr(target, key).copy_(p.float())
    return twin


def test_bfloat16_and_int8_steps_compute_exactly_their_weights_in_float32():
    """native.c multiplies bfloat16 and int8 weights exactly in float32, activations too: the
    reference is a float32 model holding those weights."""
    ids = torch.randint(0, 37, (1, 24))
    for quantized in (odd_model().to(torch.bfloat16), quantize_for_decoding(odd_model())):
        twin = float_twin(quantized)
        out = steps(twin, NativeDecoder(quantized), ids, prompt=8)
        with torch.inference_mode():
            ref = twin(ids)[0, 8:]
        assert torch.allclose(out, ref, atol=2e-5, rtol=1e-5), (out - ref).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_row_products_equal_torch(dtype):
    layer = torch.nn.Linear(66, 37).to(dtype)
    x = torch.randn(8, 66).to(dtype)
    ref = torch.nn.functional.linear(x.float(), layer.weight.float(), layer.bias.float())
    layer.__class__ = NativeLinear
    with torch.inference_mode():
        for rows in (1, 3, 8):  # 9 or more rows go to torch
            out = layer(x[:rows]).float()
            tol = 1e-5 if dtype is torch.float32 else 1e-2  # the output rounds to dtype
            assert torch.allclose(out, ref[:rows], rtol=tol, atol=tol)


def test_generation_matches_transformers_and_the_pytorch_path(tmp_path):
    transformers = pytest.importorskip("transformers")
    directory = write_hf_checkpoint(
        tmp_path / "hf", n_layer=2, n_head=4, n_embd=64, vocab_size=500, n_positions=64,
        initializer_range=0.3,
    )  # fmt: skip
    prompt, n = [5, 17, 300, 42, 9], 50  # runs past the 64 positions: the window slides
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    ref = hf.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=40, min_new_tokens=40,
        pad_token_id=0,
    )[0, len(prompt) :].tolist()  # fmt: skip
    model = layout_for_inference(GPT.from_pretrained(directory), sequences=1)
    native = Generator(model)
    greedy = SamplingConfig(max_new_tokens=n, greedy=True)
    assert native.generate([prompt], greedy)[0][:40] == ref
    assert native.native is not None
    plain = Generator(model, native=False)
    assert native.generate([prompt], greedy) == plain.generate([prompt], greedy)
    sampled = SamplingConfig(max_new_tokens=n, top_k=50, top_p=0.9, seed=4)
    assert native.generate([prompt], sampled) == plain.generate([prompt], sampled)
    for b in (native, plain):  # batches of several run in PyTorch with native products
        assert b.generate([prompt, prompt[:2]], greedy) == plain.generate(
            [prompt, prompt[:2]], greedy
        )


def test_a_replaced_weight_is_seen():
    model = odd_model()
    gen = Generator(model)
    prompt, cfg = [1, 2, 3], SamplingConfig(max_new_tokens=12, greedy=True)
    gen.generate([prompt], cfg)
    model.transformer.h[0].ln_1.bias = torch.nn.Parameter(torch.randn(66))  # not in place
    assert gen.generate([prompt], cfg) == Generator(model, native=False).generate([prompt], cfg)


def test_laid_out_models_still_copy_and_bad_steps_are_refused():
    model = layout_for_inference(odd_model(), sequences=1)
    gen, cfg = Generator(model), SamplingConfig(max_new_tokens=4, greedy=True)
    first = gen.generate([[1, 2]], cfg)  # makes gen.native
    assert Generator(copy.deepcopy(model)).generate([[1, 2]], cfg) == first  # no C pointers copied
    cache = KVCache(model.config, 1, 2, "cpu", torch.float32)
    with pytest.raises(MiniGPT2Error, match="token 99"):
        gen.native.step(99, cache)
    cache.pos = 2
    with pytest.raises(MiniGPT2Error, match="position 2 of a cache of 2"):
        gen.native.step(1, cache)


def test_lora_layers_make_the_model_decline_the_native_path():
    """An unmerged LoRA model decodes as its merged self, not as its frozen base."""
    from minigpt2.model.lora import LoRAConfig, apply_lora, merge_lora

    model = odd_model()
    apply_lora(model, LoRAConfig(4, 8.0, 0.0, ("c_attn", "c_fc")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # trained adapters: B is zero only at the start
    model.eval()
    assert NativeDecoder.for_model(model) is None
    cfg = SamplingConfig(max_new_tokens=20, greedy=True)
    prompt = [[1, 2, 3, 4, 5]]
    unmerged = Generator(model).generate(prompt, cfg)
    merged = Generator(merge_lora(copy.deepcopy(model)).eval(), native=False).generate(prompt, cfg)
    assert unmerged == merged


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_changed_in_place_are_seen(dtype):
    """load_state_dict keeps every address; the decoder notices the new values all the same."""
    model, other = odd_model().to(dtype), odd_model().to(dtype)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    cfg = SamplingConfig(max_new_tokens=15, greedy=True)
    gen = Generator(model)
    gen.generate([[1, 2, 3]], cfg)  # builds the decoder on the first model's weights
    model.load_state_dict(other.state_dict())
    assert gen.generate([[1, 2, 3]], cfg) == Generator(other).generate([[1, 2, 3]], cfg)
    layer = NativeLinear(66, 30).eval()
    x = torch.randn(2, 66)
    with torch.inference_mode():
        layer(x)
        layer.bias.fill_(100.0)
        assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_step_guards_positions_and_caches():
    model = odd_model()
    decoder = NativeDecoder(model)
    room = model.config.block_size + 8  # a cache longer than the position table
    cache = KVCache(model.config, 1, room, "cpu", torch.float32)
    with torch.inference_mode():
        model.hidden_states(torch.tensor([[1, 2, 3]]), cache)
        cache.pos = model.config.block_size - 1
        decoder.step(4, cache)  # the last position there is
        with pytest.raises(MiniGPT2Error, match="the model has 40 positions"):
            decoder.step(4, cache)
        small = KVCache(
            GPTConfig(**{**vars(model.config), "n_layer": 1}), 1, 8, "cpu", torch.float32
        )
        with pytest.raises(MiniGPT2Error, match="not this model's float32 one-sequence cache"):
            decoder.step(4, small)
    with torch.inference_mode(), pytest.raises(MiniGPT2Error, match="input of width 65"):
        NativeLinear(66, 30)(torch.randn(1, 65))  # nn.Linear raises too; before: NaN


def test_minigpt2_native_0_switches_it_off(monkeypatch):
    monkeypatch.setenv("MINIGPT2_NATIVE", "0")
    assert not native_available()
    gen = Generator(odd_model())
    gen.generate([[1, 2, 3]], SamplingConfig(max_new_tokens=3, greedy=True))
    assert gen.native is None


def test_two_threads_share_one_generator():
    """Each thread decodes with a decoder of its own: both get the tokens they get alone."""
    import threading

    model = odd_model(n_layer=4, n_embd=132, block_size=200)
    cfg = SamplingConfig(max_new_tokens=150, greedy=True)
    prompts = [[1, 2, 3], [7, 8, 9, 10]]
    alone = [Generator(model).generate([p], cfg) for p in prompts]
    shared, got = Generator(model), {}

    def run(i: int) -> None:
        got[i] = [shared.generate([prompts[i]], cfg) for _ in range(3)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got[0] == [alone[0]] * 3 and got[1] == [alone[1]] * 3


def test_the_thread_count_is_read_at_each_step():
    model = odd_model()
    decoder, ids = NativeDecoder(model), torch.randint(0, 37, (1, 20))
    before = torch.get_num_threads()
    try:
        first = steps(model, decoder, ids, 5)
        torch.set_num_threads(1)
        again = steps(model, decoder, ids, 5)
        assert decoder.model.threads == 1
    finally:
        torch.set_num_threads(before)
    assert torch.allclose(first, again, atol=1e-5)


def test_native_linears_fall_back_after_a_change_of_dtype():
    model = odd_model()
    assert use_native_linears(model)
    assert any(isinstance(m, NativeLinear) for m in model.modules())
    model = model.half()  # weights the C code cannot read
    ids = torch.randint(0, 37, (1, 4))
    with torch.inference_mode():
        out = model(ids)  # raised before
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_int8_with_a_width_no_multiple_of_8_in_a_child(tmp_path):
    """Prompts past 8 rows through the int8 fallback at width 66: torch's int8 kernel crashed
    the process there, so this runs in a child process and compares with the dequantized
    weights."""
    script = tmp_path / "int8.py"
    script.write_text(
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_native import odd_model\n"
        "from minigpt2.decode.quantize import Int8Linear\n"
        "layer = odd_model().transformer.h[0].attn.c_attn\n"
        "q = Int8Linear(layer.weight, layer.bias)\n"
        "x = torch.randn(12, 66)\n"
        "with torch.inference_mode():\n"
        "    out = q(x).float()\n"
        "ref = x @ q.dequantized().T + layer.bias\n"
        "print(float((out - ref).abs().max() / ref.abs().max()))\n"
    )
    env = {**os.environ, "MINIGPT2_NATIVE": "0"}  # the fallback path
    child = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
    )
    assert child.returncode == 0, child.stderr
    assert float(child.stdout) < 0.02  # bfloat16 activations


def random_case(rng: random.Random) -> tuple[GPT, GPT, int]:
    """A model of random shape and kind (widths from 1 up, any head size), its float32 twin
    (the weights it multiplies by), and a thread count from 1 to 3 (more than the cores)."""
    heads, head_dim = rng.randint(1, 5), rng.choice([1, 3, 7, 8, 11, 16, 17, 24])
    config = dict(
        n_layer=rng.randint(1, 3), n_head=heads, n_embd=heads * head_dim,
        vocab_size=rng.randint(3, 90), block_size=rng.randint(2, 48), bias=rng.random() < 0.7,
        gelu=rng.choice(["tanh", "exact"]), pos_embedding=rng.choice(["learned", "sinusoidal"]),
    )  # fmt: skip
    torch.manual_seed(rng.randrange(2**31))
    model = odd_model(**config)
    kind = rng.choice(["float32", "bfloat16", "int8"])
    if kind == "bfloat16":
        model = model.to(torch.bfloat16)
    elif kind == "int8":
        model = quantize_for_decoding(model)
    return model, float_twin(model), rng.randint(1, 3)


def test_fuzz_native_steps_against_pytorch():
    """Seeded random shapes, dtypes, prompt lengths, thread counts and positions up to the
    last one: the native step never crashes and its logits and argmax equal PyTorch's on the
    weights it reads (a near-tie, under 1e-4 apart, may go either way)."""
    rng, before = random.Random(22), torch.get_num_threads()
    try:
        for case in range(16):
            model, twin, threads = random_case(rng)
            torch.set_num_threads(threads)
            block = model.config.block_size
            ids = torch.randint(0, model.config.vocab_size, (1, block))
            prompt = rng.randint(1, block - 1)  # then steps to position block - 1, the last
            out = steps(twin, NativeDecoder(model), ids, prompt)
            with torch.inference_mode():
                ref = twin(ids)[0, prompt:]
            where = f"case {case}: {model.config}, {threads} threads, prompt {prompt}"
            assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4), where
            top2 = ref.topk(min(2, ref.shape[1])).values
            clear = (top2[:, 0] - top2[:, -1] > 1e-4) | (ref.shape[1] == 1)
            assert (out.argmax(1) == ref.argmax(1))[clear].all(), where
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
def test_packed_copies_multiply_several_rows_and_leave_one_row_to_native(kind):
    """A server's float32 layers: products of more than PACKED_FROM rows in the oneDNN copy,
    one row in native.c over the dense weight, both equal to nn.Linear's logits. bfloat16 and
    int8 layers get no copy (oneDNN's products of those round activations to bfloat16)."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=64, vocab_size=101, block_size=16)
    plain = GPT(cfg).eval()
    for p in plain.parameters():  # wider than the default init: logits that differ in earnest
        torch.nn.init.normal_(p, std=0.3)
    model = copy.deepcopy(plain)
    if kind == "int8":
        model = quantize_for_decoding(model)
    else:
        model = layout_for_inference(model.to(getattr(torch, kind)), sequences=1)
    added = pack_beside_native(model)
    layers = [m for m in model.modules() if isinstance(m, (NativeLinear, Int8Linear))]
    if kind != "float32":
        assert added == 0 and not any("packed" in m.__dict__ for m in layers)
        return
    if not added:
        pytest.skip("this PyTorch has no oneDNN")
    assert added == sum(4 * m.weight.numel() for m in layers)
    calls = []
    for m in layers:
        forward = m.__dict__["packed"].forward
        m.__dict__["packed"].forward = lambda x, f=forward: calls.append(len(x)) or f(x)
    for rows in (1, 2, 3, 16):
        idx = torch.randint(0, 101, (rows, 1))
        calls.clear()
        with torch.inference_mode():
            got, exact = model(idx), plain(idx)
        assert bool(calls) == (rows > 2)
        assert torch.allclose(got, exact, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_slot_attention_steps_equal_each_sequence_alone(dtype):
    """Rows at different lengths (one slot free between them) step together with native.c's
    attention over each row's own slot: each row's logits are its sequence's alone."""
    model = odd_model().to(dtype)
    seqs = {slot: torch.randint(0, 37, (1, 20)) for slot in (0, 2, 3)}
    lengths = {0: 3, 2: 11, 3: 6}
    cache = KVCache.slots(model.config, 4, 40, "cpu", dtype)
    cache.attend = slots_attention(cache)
    assert cache.attend is not None
    twin = KVCache.slots(model.config, 4, 40, "cpu", dtype)  # the same steps in torch
    for c in (cache, twin):
        fill_slots(model, c, seqs, lengths)
    with torch.inference_mode():
        for step in range(5):
            idx = slot_tokens(seqs, lengths, step, 4)
            logits = model.lm_head(model.hidden_states(idx, cache))[:, -1].float()
            torch_way = model.lm_head(model.hidden_states(idx, twin))[:, -1].float()
            for slot, n in lengths.items():
                if dtype is torch.float32:
                    ref = model(seqs[slot][:, : n + step + 1])[0, -1]
                    assert torch.allclose(logits[slot], ref, atol=2e-5, rtol=1e-5), (slot, step)
                else:  # bfloat16 products: rounding apart from torch's attention, no more
                    scale = torch_way[slot].abs().max()
                    assert (logits[slot] - torch_way[slot]).abs().max() < 0.05 * scale
    assert cache.lengths.tolist() == [8, 0, 16, 11]  # later steps read the stored keys


def test_slot_attention_refuses_a_length_past_the_cache():
    model = odd_model()
    cache = KVCache.slots(model.config, 2, 8, "cpu", torch.float32)
    cache.attend = slots_attention(cache)
    cache.lengths[1], cache.live[1] = 8, True
    before = cache.kv.clone()
    with torch.inference_mode(), pytest.raises(MiniGPT2Error, match="8 positions"):
        cache.attend(0, torch.randn(2, 3 * 66))
    assert torch.equal(cache.kv, before)  # nothing written
    assert slots_attention(KVCache(model.config, 1, 8, "cpu", torch.float32)) is None


@pytest.mark.parametrize("kind", ["float32", "bfloat16", "int8"])
def test_steps_of_many_slots_equal_each_sequence_alone(kind):
    """One native step for 9 sequences of a slot cache, given out of slot order and at their
    own lengths (9 rows: tiles of 4 x 4 inputs and a pass of one): each row's logits are its
    sequence's alone, for 4 steps; the reference is a float32 model holding the weights."""
    model = odd_model()
    if kind != "float32":  # module.to converts in place
        model = model.to(torch.bfloat16) if kind == "bfloat16" else quantize_for_decoding(model)
    twin = float_twin(model) if kind != "float32" else model
    order = [7, 0, 3, 9, 1, 5, 8, 2, 4]
    lengths = {slot: 1 + (5 * slot) % 13 for slot in order}
    seqs = {slot: torch.randint(0, 37, (1, 20)) for slot in order}
    cache = KVCache.slots(model.config, 10, 40, "cpu", torch.float32)
    fill_slots(twin, cache, seqs, lengths)
    decoder = NativeDecoder(model)
    with torch.inference_mode():
        for step in range(4):
            tokens = [int(seqs[s][0, lengths[s] + step]) for s in order]
            logits = decoder.step_slots(tokens, order, cache)
            for row, slot in enumerate(order):
                ref = twin(seqs[slot][:, : lengths[slot] + step + 1])[0, -1]
                assert torch.allclose(logits[row], ref, atol=3e-5, rtol=1e-5), (slot, step)
    assert cache.lengths.tolist() == [lengths[s] + 4 if s in lengths else 0 for s in range(10)]


def test_a_step_of_slots_refuses_what_is_out_of_range():
    """A token past the vocabulary, a slot past the cache, a full slot, two rows on one slot:
    an error naming them, and nothing written."""
    model = odd_model()
    cache = KVCache.slots(model.config, 3, 8, "cpu", torch.float32)
    cache.lengths[2] = 8
    decoder, before = NativeDecoder(model), cache.kv.clone()
    for tokens, slots in [([37], [0]), ([1], [3]), ([1], [2]), ([1, 2], [1, 1]), ([-1], [0])]:
        with torch.inference_mode(), pytest.raises(MiniGPT2Error, match="out of range"):
            decoder.step_slots(tokens, slots, cache)
    assert torch.equal(cache.kv, before) and cache.lengths.tolist() == [0, 0, 8]
