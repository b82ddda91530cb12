"""Generation: parity with transformers, cache vs no cache, sampling filters, the CLI."""

import json

import pytest
import torch
from conftest import ROOT, fill_slots, in_process, slot_tokens, write_hf_checkpoint

from minigpt2 import GPT, GPTConfig, MiniGPT2Error
from minigpt2.decode.generate import Generator, SamplingConfig, process_logits


def tiny_model(vocab=101, block=24, seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=vocab, block_size=block))


def test_greedy_matches_transformers_generate(tmp_path):
    transformers = pytest.importorskip("transformers")
    directory = write_hf_checkpoint(
        tmp_path / "hf", n_layer=2, n_head=4, n_embd=64, vocab_size=500, n_positions=64
    )
    hf = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    prompt = [5, 17, 300, 42, 9]
    ref = hf.generate(
        torch.tensor([prompt]),
        do_sample=False,
        max_new_tokens=40,
        min_new_tokens=40,
        pad_token_id=0,
    )[0, len(prompt) :].tolist()
    gen = Generator(GPT.from_pretrained(directory))
    assert gen.generate([prompt], SamplingConfig(max_new_tokens=40, greedy=True))[0] == ref
    assert gen.generate([prompt], SamplingConfig(max_new_tokens=40, temperature=0))[0] == ref


def test_cached_and_uncached_give_identical_tokens():
    gen = Generator(tiny_model())
    cfg = SamplingConfig(max_new_tokens=40, top_k=20, seed=3)  # runs past block_size=24
    prompt = [1, 2, 3, 4, 5, 6]
    assert gen.generate([prompt] * 2, cfg) == gen.generate([prompt] * 2, cfg, use_cache=False)
    greedy = SamplingConfig(max_new_tokens=40, greedy=True)
    assert gen.generate([prompt], greedy) == gen.generate([prompt], greedy, use_cache=False)


def test_context_overflow_slides_the_window():
    model = tiny_model(block=8)
    gen = Generator(model)
    prompt = list(range(1, 12))  # longer than the context: its last 8 tokens are kept
    out = gen.generate([prompt], SamplingConfig(max_new_tokens=5, greedy=True))[0]
    seq = prompt[-8:]
    for _ in range(5):  # reference: full forward over the last 8 tokens, argmax
        with torch.no_grad():
            seq.append(int(model(torch.tensor([seq[-8:]]))[0, -1].argmax()))
    assert out == seq[-5:]


def test_fixed_seed_reproduces_and_batch_equals_one_by_one():
    gen = Generator(tiny_model())
    cfg = SamplingConfig(max_new_tokens=12, temperature=1.3, top_p=0.9, seed=11)
    batch = gen.generate([[3, 4]] * 3, cfg)
    assert batch == gen.generate([[3, 4]] * 3, cfg)
    for i in range(3):
        single = SamplingConfig(max_new_tokens=12, temperature=1.3, top_p=0.9, seed=11 + i)
        assert gen.generate([[3, 4]], single)[0] == batch[i]
    assert len({tuple(r) for r in batch}) > 1


@pytest.mark.parametrize("kind", ["bfloat16", "int8"])
def test_bfloat16_and_int8_batches_equal_each_prompt_alone(kind):
    """12 prompts of 1-40 tokens as one batch, greedy and seeded: each row gets the tokens its
    prompt gets alone (one slot cache, stepped in native.c with float32 activations). Before,
    the batch ran torch's products, which round activations to bfloat16: rows differed from
    their 2nd to their 40th token."""
    import dataclasses
    import random

    from minigpt2.decode.kernels import layout_for_inference
    from minigpt2.decode.native import native_available
    from minigpt2.decode.quantize import quantize_for_decoding

    if not native_available():
        pytest.skip("native decoder not built, or this CPU has no AVX2")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=2000, block_size=256))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:  # wide: logits far apart, as a real model's
                p.normal_(0, 0.3)
    model = model.eval()
    if kind == "int8":
        model = quantize_for_decoding(model, "int8")
    else:
        model = layout_for_inference(model.to(torch.bfloat16), sequences=12)
    rng = random.Random(0)
    prompts = [[rng.randrange(2000) for _ in range(rng.randint(5, 40))] for _ in range(10)]
    prompts += [[7], [1999]]  # one-token prompts: their first step is native.c's
    gen = Generator(model)
    for cfg in (
        SamplingConfig(max_new_tokens=50, greedy=True),
        SamplingConfig(max_new_tokens=50, temperature=0.9, seed=5),
    ):
        batch = gen.generate(prompts, cfg)
        for i, prompt in enumerate(prompts):
            seed = None if cfg.seed is None else cfg.seed + i
            assert gen.generate([prompt], dataclasses.replace(cfg, seed=seed))[0] == batch[i], i


def test_top_k_top_p_temperature_on_hand_made_logits():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    top2 = process_logits(logits, SamplingConfig(top_k=2))
    assert torch.isinf(top2[0, 2:]).all() and torch.isfinite(top2[0, :2]).all()
    # nucleus: 0.5 + 0.2 = 0.7 < 0.8, so 0.15 is needed too; 0.1 and 0.05 are dropped
    nucleus = process_logits(logits, SamplingConfig(top_p=0.8))
    assert torch.isfinite(nucleus[0, :3]).all() and torch.isinf(nucleus[0, 3:]).all()
    assert torch.isfinite(process_logits(logits, SamplingConfig(top_p=0.5))[0]).sum() == 1
    hot = process_logits(logits, SamplingConfig(temperature=2.0)).softmax(-1)
    expected = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]).sqrt()
    assert torch.allclose(hot, expected / expected.sum(), atol=1e-6)
    penalised = process_logits(
        torch.tensor([[2.0, -2.0, 1.0]]),
        SamplingConfig(repetition_penalty=2.0, greedy=True),
        torch.tensor([[0, 1]]),
    )
    assert penalised.tolist() == [[1.0, -4.0, 1.0]]


def test_top_p_matches_transformers_warper():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    ref = transformers.TopPLogitsWarper(0.7)(None, logits.clone())
    ours = process_logits(logits, SamplingConfig(top_p=0.7))
    assert torch.equal(torch.isinf(ref), torch.isinf(ours))


def test_sampled_tokens_respect_the_filters():
    gen = Generator(tiny_model())
    for seed in range(5):
        out = gen.generate([[7]], SamplingConfig(max_new_tokens=5, top_k=1, seed=seed))[0]
        assert out == gen.generate([[7]], SamplingConfig(max_new_tokens=5, greedy=True))[0]


def test_padded_vocabulary_never_emits_unknown_ids():
    model = tiny_model(vocab=128)
    with torch.no_grad():
        model.transformer.wte.weight[100:] = 5.0  # make the padding ids the most likely
    gen = Generator(model, vocab_limit=100)
    out = gen.generate([[1, 2]] * 2, SamplingConfig(max_new_tokens=30, seed=0))
    assert max(max(r) for r in out) < 100
    with pytest.raises(MiniGPT2Error, match="tokenizer has 200 ids but the model only 128"):
        Generator(model, vocab_limit=200)


def test_stop_at_eot():
    model = tiny_model()
    with torch.no_grad():  # make token 50 the certain next token after any input
        model.transformer.wte.weight[50] = 1.0
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(model.transformer.wte.weight[50])
    gen = Generator(model)
    cfg = SamplingConfig(max_new_tokens=20, greedy=True, stop_at_eot=True, eot_id=50)
    assert gen.generate([[1, 2]] * 2, cfg) == [[50], [50]]
    cfg.stop_at_eot = False
    assert gen.generate([[1, 2]], cfg) == [[50] * 20]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.5), "temperature=-0.5 must be >= 0"),
        (dict(top_p=0.0), "top_p=0.0 must be in"),
        (dict(top_p=1.5), "top_p=1.5 must be in"),
        (dict(top_k=-1), "top_k=-1 must be >= 0"),
    ],
)
def test_bad_sampling_values(kwargs, message):
    with pytest.raises(MiniGPT2Error, match=message):
        SamplingConfig(**kwargs).check()


def sample_cli(*args, cwd, stdin=None):
    return in_process([ROOT / "sample.py", *args], cwd, stdin)


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    """A tiny trained out_dir with the byte tokenizer."""
    from test_train import settings

    from minigpt2.cli.train import train_main

    tmp = tmp_path_factory.mktemp("run")
    assert train_main(settings(tmp, max_iters=3, dropout=0.0)) == 0
    return tmp / "out"


def test_cli_streams_and_reproduces(byte_run, tmp_path):
    a = sample_cli(
        "--model",
        str(byte_run),
        "--prompt",
        "the cat",
        "--max-new-tokens",
        "30",
        "--seed",
        "5",
        cwd=tmp_path,
    )
    assert a.returncode == 0, a.stderr
    assert a.stdout.startswith("the cat")
    assert "prompt tokens: 7, new tokens: 30" in a.stderr and "tokens/s" in a.stderr
    b = sample_cli(
        "--model",
        str(byte_run),
        "--prompt",
        "-",
        "--max-new-tokens",
        "30",
        "--seed",
        "5",
        cwd=tmp_path,
        stdin="the cat",
    )
    assert b.stdout == a.stdout


def test_cli_json_and_max_length(byte_run, tmp_path):
    result = sample_cli(
        "--model",
        str(byte_run),
        "--prompt",
        "ab",
        "--max-length",
        "10",
        "--num-samples",
        "2",
        "--json",
        "--seed",
        "1",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == 2 and all(len(r["token_ids"]) == 8 for r in rows)
    assert rows[0]["finish_reason"] == "length" and rows[0]["prompt"] == "ab"


def test_cli_released_layout_directory(tmp_path):
    pytest.importorskip("transformers")
    directory = write_hf_checkpoint(
        tmp_path / "hf", n_layer=1, n_head=2, n_embd=32, n_positions=32, vocab_size=257
    )
    result = sample_cli(
        "--model",
        str(directory),
        "--tokenizer",
        "byte",
        "--prompt",
        "hi",
        "--greedy",
        "--max-new-tokens",
        "5",
        "--json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout)["token_ids"]) == 5


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "temperature=-1.0 must be >= 0"),
        (["--top-p", "0"], "top_p=0.0 must be in (0, 1]"),
        (["--top-k", "-3"], "top_k=-3 must be >= 0"),
        (["--max-length", "2", "--prompt", "hello"], "--max-length=2 is not above the prompt"),
        (["--tokenizer", "gpt2.tiktoken"], "does not exist"),
    ],
)
def test_cli_bad_input(byte_run, tmp_path, args, message):
    result = sample_cli("--model", str(byte_run), *args, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_cli_missing_and_corrupt_model(byte_run, tmp_path):
    missing = sample_cli("--model", str(tmp_path / "none"), cwd=tmp_path)
    assert missing.returncode == 2 and "neither a directory nor a released model" in missing.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes((byte_run / "ckpt.safetensors").read_bytes()[:1000])
    corrupt = sample_cli("--model", str(bad), cwd=tmp_path)
    assert corrupt.returncode == 2 and "truncated or corrupt" in corrupt.stderr


def test_cli_tokenizer_too_big_for_model(byte_run, tmp_path):
    from conftest import GPT2_TIKTOKEN

    if not GPT2_TIKTOKEN.is_file():
        pytest.skip(f"no GPT-2 BPE at {GPT2_TIKTOKEN}")
    result = sample_cli("--model", str(byte_run), "--tokenizer", str(GPT2_TIKTOKEN), cwd=tmp_path)
    assert result.returncode == 2
    assert "--tokenizer gpt2 is not the tokenizer the model was trained with ('byte')" in (
        result.stderr
    )


def test_cli_prompt_longer_than_context_keeps_its_end(byte_run, tmp_path):
    result = sample_cli(
        "--model",
        str(byte_run),
        "--prompt",
        "x" * 40,
        "--max-new-tokens",
        "3",
        "--json",
        "--greedy",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (
        "warning: the prompt's 40 tokens exceed the context (32); keeping its last 32"
        in result.stderr
    )
    assert len(json.loads(result.stdout)["token_ids"]) == 3


@pytest.mark.parametrize("pack", [True, False])
def test_decoding_layout_keeps_logits_and_tokens(pack):
    import copy

    from minigpt2.decode.kernels import PackedLinear, layout_for_inference

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=101, block_size=64))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10)  # logits far from uniform: a layout that changed numbers would show
    laid_out = layout_for_inference(copy.deepcopy(model).eval(), pack=pack)
    packed = any(isinstance(m, PackedLinear) for m in laid_out.modules())
    assert packed == (pack and torch.backends.mkldnn.is_available())
    idx = torch.randint(0, 101, (3, 20))
    with torch.no_grad():
        assert torch.allclose(laid_out(idx), model(idx), atol=1e-4, rtol=1e-5)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    cfg = SamplingConfig(max_new_tokens=20, greedy=True)
    assert Generator(laid_out).generate(prompts, cfg) == Generator(model).generate(prompts, cfg)


def test_cli_no_native_gives_the_same_float32_greedy_tokens(byte_run, tmp_path):
    args = ["--model", str(byte_run), "--prompt", "the", "--greedy", "--max-new-tokens", "20"]
    native = sample_cli(*args, "--json", cwd=tmp_path)
    plain = sample_cli(*args, "--json", "--no-native", cwd=tmp_path)
    assert native.returncode == 0 and plain.returncode == 0, plain.stderr
    assert json.loads(native.stdout)["token_ids"] == json.loads(plain.stdout)["token_ids"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_slot_cache_steps_rows_at_their_own_lengths(dtype):
    """KVCache.slots (the server's continuous batching): prompts of 3, 9 and 5 tokens in slots
    0, 2 and 3 (slot 1 empty), then 4 steps of all rows together; each row's logits equal the
    whole sequence run alone, and the empty slot stays empty."""
    from minigpt2.model.attention import KVCache

    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=3, n_embd=66, vocab_size=53, block_size=32)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    model = model.to(dtype)
    tol = 1e-5 if dtype is torch.float32 else 0.1  # bfloat16 activations round differently
    seqs = {0: torch.randint(0, 53, (1, 13)), 2: torch.randint(0, 53, (1, 13))}
    seqs[3] = torch.randint(0, 53, (1, 13))
    lengths = {0: 3, 2: 9, 3: 5}
    cache = KVCache.slots(model.config, 4, 32, "cpu", dtype)
    fill_slots(model, cache, seqs, lengths)
    with torch.inference_mode():
        for step in range(4):
            idx = slot_tokens(seqs, lengths, step, 4)
            logits = model.lm_head(model.hidden_states(idx, cache))[:, -1]
            for slot, n in lengths.items():
                ref = model(seqs[slot][:, : n + step + 1])[0, -1]
                assert torch.allclose(logits[slot].float(), ref.float(), atol=tol), (slot, step)
    assert cache.lengths.tolist() == [7, 0, 13, 9]
