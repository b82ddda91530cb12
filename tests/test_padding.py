"""Padding masks and sinusoidal positions: padded batches against each sequence alone and against
transformers' GPT2LMHeadModel on the same released-layout weights."""

import math

import pytest
import torch
from conftest import write_wide_byte_checkpoint

from minigpt2 import GPT, GPTConfig, MiniGPT2Error
from minigpt2.model.gpt import KVCache, sinusoid_table

LENGTHS = [7, 3, 11, 1]  # different lengths, one of them a single token


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_wide_byte_checkpoint(tmp_path_factory.mktemp("hf") / "wide", n_positions=32)


def sequences(vocab: int = 257) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in LENGTHS]


def pad(seqs: list[list[int]], side: str, pad_id: int = 0):
    """(ids, attention_mask) of seqs padded to the longest, on the left or the right."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        cols = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, cols], mask[i, cols] = torch.tensor(s), 1
    return ids, mask


def hf_greedy(hf, prompts: list[list[int]], new: int) -> list[list[int]]:
    """transformers' greedy generate of left-padded prompts: each prompt's new token ids."""
    ids, mask = pad(prompts, "left")
    out = hf.generate(
        ids,
        attention_mask=mask,
        do_sample=False,
        max_new_tokens=new,
        min_new_tokens=new,
        pad_token_id=0,
    )
    return out[:, ids.shape[1] :].tolist()


def real_rows(out: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    return [out[i][mask[i].bool()] for i in range(len(out))]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_padded_batch_equals_each_alone_and_transformers(hf_dir, side, impl):
    transformers = pytest.importorskip("transformers")
    model = GPT.from_pretrained(hf_dir).eval()
    model.config.attn_impl = impl
    for block in model.transformer.h:
        block.attn.attn_impl = impl
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    seqs = sequences()
    ids, mask = pad(seqs, side)
    with torch.no_grad():
        ours = model(ids, attention_mask=mask)
        alone = [model(torch.tensor([s]))[0] for s in seqs]
        # transformers' generate derives positions from the mask the same way (cumsum - 1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        ref = hf(ids, attention_mask=mask, position_ids=positions).logits
    assert not torch.isnan(ours).any()
    for got, single, want in zip(real_rows(ours, mask), alone, real_rows(ref, mask), strict=True):
        assert torch.allclose(got, single, atol=1e-5, rtol=0)
        assert torch.allclose(got, want, atol=1e-4, rtol=0)
    assert ours.abs().max() > 1.0  # the wide init gives logits far from uniform


def test_padded_keys_are_never_attended():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=50, block_size=16)).eval()
    ids, mask = pad([[5, 6, 7], [1, 2, 3, 4, 5, 6]], "left")
    other = ids.clone()
    other[0, :3] = torch.tensor([40, 41, 42])  # change only the padding of row 0
    with torch.no_grad():
        assert torch.equal(
            model(ids, attention_mask=mask)[0, 3:], model(other, attention_mask=mask)[0, 3:]
        )
        everything_padded = model(ids, attention_mask=torch.zeros_like(mask))
    assert torch.isfinite(everything_padded).all()


def test_cache_with_padding_equals_full_forward(hf_dir):
    model = GPT.from_pretrained(hf_dir).eval()
    ids, mask = pad(sequences(), "left")
    extra = torch.randint(0, 257, (len(LENGTHS), 4))
    full_ids = torch.cat([ids, extra], 1)
    full_mask = torch.cat([mask, torch.ones_like(extra)], 1)
    with torch.no_grad():
        full = model.hidden_states(full_ids, attention_mask=full_mask)
        cache = KVCache(model.config, len(LENGTHS), full_ids.shape[1], "cpu", torch.float32)
        steps = [model.hidden_states(ids, cache, attention_mask=mask)]
        steps += [model.hidden_states(extra[:, t : t + 1], cache) for t in range(4)]
    got = torch.cat(steps, 1)
    for a, b in zip(real_rows(got, full_mask), real_rows(full, full_mask), strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_both_ignore_indices_are_ignored():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=30, block_size=8)).eval()
    idx = torch.randint(0, 30, (2, 8))
    targets = torch.randint(0, 30, (2, 8))
    ignored = targets.clone()
    ignored[0, :3], ignored[1, 5:] = -1, -100
    logits, loss = model(idx, ignored)
    keep = ignored >= 0
    logp = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
    assert loss.item() == pytest.approx(-logp[keep].mean().item(), abs=1e-6)


def test_sinusoidal_table_matches_the_formula():
    table = sinusoid_table(50, 12)
    for pos in (0, 1, 7, 49):
        for i in range(6):
            angle = pos / 10000 ** (2 * i / 12)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-7)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-7)
    assert sinusoid_table(4, 5).shape == (4, 5)  # an odd width drops the last cosine


def test_sinusoidal_model_has_no_position_parameters():
    cfg = dict(n_layer=1, n_head=2, n_embd=16, vocab_size=30, block_size=8)
    learned = GPT(GPTConfig(**cfg))
    sin = GPT(GPTConfig(**cfg, pos_embedding="sinusoidal"))
    assert learned.num_params() - sin.num_params() == 8 * 16
    assert not any("wpe" in k for k in sin.state_dict())
    assert torch.equal(sin.transformer.wpe.table, sinusoid_table(8, 16))
    seen = {}
    sin.transformer.h[0].register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    idx = torch.tensor([[3, 1, 4, 1, 5]])
    sin(idx)  # the first block sees wte * sqrt(n_embd) + table (Vaswani et al., 3.4 and 3.5)
    expected = sin.transformer.wte.weight[idx] * 4.0 + sinusoid_table(8, 16)[:5]
    assert torch.allclose(seen["x"], expected, atol=1e-6)
    sin.crop_block_size(4)
    assert sin(torch.zeros(1, 4, dtype=torch.long)).shape == (1, 4, 30)
    with pytest.raises(MiniGPT2Error, match="pos_embedding='rotary'; use learned or sinusoidal"):
        GPTConfig(pos_embedding="rotary")


def test_batched_greedy_generation_equals_transformers_and_each_alone(hf_dir):
    transformers = pytest.importorskip("transformers")
    from minigpt2.decode.generate import Generator, SamplingConfig

    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    prompts = sequences()
    ref = hf_greedy(hf, prompts, 12)
    gen = Generator(GPT.from_pretrained(hf_dir))
    cfg = SamplingConfig(max_new_tokens=12, greedy=True)
    batched = gen.generate(prompts, cfg)
    assert batched == ref
    assert batched == [gen.generate([p], cfg)[0] for p in prompts]
    assert batched == gen.generate(prompts, cfg, use_cache=False)
    assert len({tuple(r) for r in batched}) == len(prompts)


def test_batched_generation_past_the_context_slides_each_row_like_alone(hf_dir):
    from minigpt2.decode.generate import Generator, SamplingConfig

    gen = Generator(GPT.from_pretrained(hf_dir))  # 32 positions; 11 + 30 runs past them
    prompts = sequences()
    cfg = SamplingConfig(max_new_tokens=30, greedy=True)
    batched = gen.generate(prompts, cfg)
    assert batched == [gen.generate([p], cfg)[0] for p in prompts]
    sampled = SamplingConfig(max_new_tokens=30, top_k=20, seed=4, repetition_penalty=1.3)
    rows = gen.generate(prompts, sampled)
    for i, p in enumerate(prompts):  # row i draws with seed + i, as alone with that seed
        alone = SamplingConfig(max_new_tokens=30, top_k=20, seed=4 + i, repetition_penalty=1.3)
        assert rows[i] == gen.generate([p], alone)[0]


def test_each_row_stops_on_its_own():
    from minigpt2.decode.generate import GenerationStats, Generator, SamplingConfig

    torch.manual_seed(12)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=20, block_size=32))
    gen = Generator(model)
    prompts = [[1, 2, 5], [3], [4, 9, 9, 3], [8, 8]]
    greedy = SamplingConfig(max_new_tokens=6, greedy=True, stop_at_eot=True, eot_id=0)
    stats = GenerationStats()
    rows = gen.generate(prompts, greedy, stats=stats)
    assert rows == [gen.generate([p], greedy)[0] for p in prompts]
    # with this seed the last row says 0 (end-of-text here) on its third step, the rest never
    assert [len(r) for r in rows] == [6, 6, 6, 3] and rows[3][-1] == 0
    assert stats.finish == ["length", "length", "length", "eot"]


def test_sample_batch_file_equals_transformers_left_padded_generate(hf_dir, tmp_path):
    import json

    from conftest import ROOT, in_process

    transformers = pytest.importorskip("transformers")
    prompts = ["Hello there, how", "ab", "The quick brown fox"]  # 16, 2 and 19 bytes
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    result = in_process(
        [
            str(ROOT / "sample.py"),
            "--model",
            str(hf_dir),
            "--tokenizer",
            "byte",
            "--batch-file",
            str(tmp_path / "p.jsonl"),
            "--greedy",
            "--max-new-tokens",
            "12",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    got = [json.loads(line)["token_ids"] for line in result.stdout.splitlines()]
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()
    encoded = [list(p.encode()) for p in prompts]
    assert got == hf_greedy(hf, encoded, 12)
    assert got == [hf_greedy(hf, [e], 12)[0] for e in encoded]


def test_prefill_never_reads_unwritten_cache_memory(hf_dir):
    from minigpt2.decode.generate import Generator

    gen = Generator(GPT.from_pretrained(hf_dir))
    prompts = sequences()
    ids, mask = pad(prompts, "left")
    cache = KVCache(gen.model.config, len(prompts), 32, "cpu", torch.float32)
    cache.kv.fill_(float("nan"))  # what fresh memory may hold
    with torch.inference_mode():
        first = gen.prefill(ids, mask.bool(), cache)
        nxt = gen.logits(first.argmax(-1)[:, None], cache)
        alone = [gen.model(torch.tensor([p]))[0, -1] for p in prompts]
    assert torch.isfinite(nxt).all()
    assert torch.allclose(first, torch.stack(alone), atol=1e-5, rtol=0)
