"""Exports other tools load whole: tokenizer files that encode as tiktoken does, a pipeline that
continues a prompt with our greedy text, and GGUF files that read back as the model."""

import json

import numpy as np
import pytest
import torch
from conftest import GPT2_TIKTOKEN, in_process

from minigpt2 import GPT, GPTConfig
from minigpt2.data.tokenizer import get_tokenizer
from minigpt2.decode.generate import Generator, SamplingConfig
from minigpt2.errors import MiniGPT2Error

needs_bpe = pytest.mark.skipif(
    not GPT2_TIKTOKEN.is_file(), reason=f"GPT-2's BPE file is not at {GPT2_TIKTOKEN}"
)
# unicode, whitespace runs, contractions, digits, tabs, emoji, a non-breaking space
VARIED = [
    "Hello, my dog",
    "It's  the   end\n\n\n  of 12345 days's ünïcödé 日本語 🤖\t\ttabs   ",
    "'s'S'll 's 've  'RE I'M we'd\u00a0non-breaking 3.14159 1,000,000",
    "    leading spaces\r\n\r\nand trailing   ",
    "x",
]


def wide_model(seed: int = 0, **cfg) -> GPT:
    """A small GPT-2-vocabulary model with weights far from uniform (no greedy near-ties)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64, **cfg}))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def bpe():
    if not GPT2_TIKTOKEN.is_file():
        pytest.skip(f"GPT-2's BPE file is not at {GPT2_TIKTOKEN}")
    return get_tokenizer(str(GPT2_TIKTOKEN))


@pytest.fixture(scope="module")
def export(tmp_path_factory, bpe):
    """A wide model exported with GPT-2's tokenizer."""
    out = tmp_path_factory.mktemp("export")
    model = wide_model()
    written = model.save_pretrained(out, bpe)
    assert {"vocab.json", "merges.txt", "tokenizer.json", "generation_config.json"} <= set(written)
    return model, out


def test_tokenizer_files_encode_exactly_as_tiktoken(export, bpe):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    _, out = export
    fast = transformers.AutoTokenizer.from_pretrained(out)
    raw = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in VARIED:
        ids = bpe.encode(text)
        assert fast.encode(text) == ids, text
        assert raw.encode(text).ids == ids, text
        assert fast.decode(ids) == text
    assert fast.convert_tokens_to_ids("<|endoftext|>") == 50256
    assert fast.eos_token_id == fast.bos_token_id == 50256
    vocab = json.loads((out / "vocab.json").read_text(encoding="utf-8"))
    merges = (out / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 50257 and vocab["<|endoftext|>"] == 50256
    assert len(merges) == 1 + 50000 and merges[1] == "Ġ t"  # GPT-2's first merge


def test_pipeline_continues_a_prompt_with_our_greedy_text(export, bpe):
    transformers = pytest.importorskip("transformers")
    model, out = export
    prompt = "The meaning of life is"
    ids = bpe.encode(prompt)
    ours = Generator(model).generate([ids], SamplingConfig(max_new_tokens=24, greedy=True))[0]
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    text = pipe(prompt, do_sample=False, max_new_tokens=24)[0]["generated_text"]
    assert text == bpe.decode(ids + ours)


def test_byte_model_exports_a_faithful_tokenizer(tmp_path):
    transformers = pytest.importorskip("transformers")
    byte = get_tokenizer("byte")
    model = wide_model(vocab_size=257)
    written = model.save_pretrained(tmp_path, byte)
    assert "tokenizer.json" in written and "vocab.json" not in written
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in VARIED:
        assert hf.encode(text) == byte.encode(text)
        assert hf.decode(byte.encode(text)) == text
    assert hf.eos_token_id == 256


def read_gguf(path):
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(path)
    return gguf, reader, {t.name: t for t in reader.tensors}


def expected_tensors(model: GPT) -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names, (out, in) as nn.Linear holds them."""
    from minigpt2.formats.gguf import gguf_name

    state = model.state_dict()
    names = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
    return {gguf_name(k): v.numpy() for k, v in names.items()}


def test_gguf_f32_reads_back_as_the_model_with_llama_cpp_metadata(tmp_path, export, bpe):
    from minigpt2.formats.gguf import write_gguf

    model, _ = export
    write_gguf(model, tmp_path / "m.gguf", bpe, "f32")
    gguf, reader, tensors = read_gguf(tmp_path / "m.gguf")
    expected = expected_tensors(model)
    assert set(tensors) == set(expected) and len(tensors) == 4 + 12 * model.config.n_layer
    for name, value in expected.items():
        got = np.asarray(tensors[name].data).reshape(value.shape)
        np.testing.assert_array_equal(got, value, err_msg=name)
    fields = reader.fields

    def scalar(key):
        return fields[key].contents()

    assert scalar("general.architecture") == "gpt2" and scalar("general.file_type") == 0
    assert scalar("tokenizer.ggml.model") == "gpt2" and scalar("tokenizer.ggml.pre") == "gpt-2"
    assert scalar("gpt2.context_length") == 64 and scalar("gpt2.block_count") == 2
    assert scalar("gpt2.embedding_length") == 32 and scalar("gpt2.feed_forward_length") == 128
    assert scalar("gpt2.attention.head_count") == 2
    assert abs(scalar("gpt2.attention.layer_norm_epsilon") - 1e-5) < 1e-9
    assert scalar("tokenizer.ggml.eos_token_id") == scalar("tokenizer.ggml.bos_token_id") == 50256
    tokens = fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == 50257 and tokens[50256] == "<|endoftext|>" and tokens[220] == "Ġ"
    assert len(fields["tokenizer.ggml.merges"].contents()) == 50000


@pytest.mark.parametrize("outtype", ["q8_0", "bf16", "f16"])
def test_gguf_lower_precision_within_its_rounding(tmp_path, export, bpe, outtype):
    from minigpt2.formats.gguf import write_gguf

    model, _ = export
    write_gguf(model, tmp_path / "m.gguf", bpe, outtype)
    gguf, _, tensors = read_gguf(tmp_path / "m.gguf")
    for name, value in expected_tensors(model).items():
        t = tensors[name]
        if value.ndim == 1 or name.startswith("position_embd"):
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
            continue
        assert t.tensor_type.name == outtype.upper(), name
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(value.shape)
        if outtype == "q8_0":
            # blocks of 32 share a scale d = max|w|/127, stored as float16: error at most half
            # a step plus the scale's rounding over 127 steps
            d = np.abs(value).reshape(-1, 32).max(axis=1, keepdims=True) / 127
            bound = np.repeat(d * (0.5 + 127 * 2.0**-11) + 1e-7, 32, axis=1).reshape(value.shape)
            assert np.all(np.abs(got - value) <= bound), name
        else:
            rel = 2.0**-8 if outtype == "bf16" else 2.0**-11  # half an ulp of the mantissa
            assert np.all(np.abs(got - value) <= np.abs(value) * rel + 1e-7), name


def test_gguf_bad_input_is_one_line_and_writes_nothing(tmp_path, bpe):
    from minigpt2.formats.gguf import write_gguf

    with pytest.raises(MiniGPT2Error, match="unknown outtype 'q4_k'"):
        write_gguf(wide_model(), tmp_path / "a.gguf", bpe, "q4_k")
    with pytest.raises(MiniGPT2Error, match="pos_embedding=sinusoidal"):
        write_gguf(wide_model(pos_embedding="sinusoidal"), tmp_path / "b.gguf", bpe, "f32")
    with pytest.raises(MiniGPT2Error, match="needs BPE merges"):
        write_gguf(wide_model(vocab_size=257), tmp_path / "c.gguf", get_tokenizer("byte"), "f32")
    assert list(tmp_path.iterdir()) == []


def run_export(*args, cwd):
    return in_process(["-m", "minigpt2", "export", *args], cwd)


def test_export_command_errors(tmp_path, export):
    _, out = export
    bad = run_export(out, tmp_path / "m.gguf", "--outtype", "q4_k", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "error: unknown outtype 'q4_k'; use one of: f32, f16, bf16, q8_0"
    ]
    bad = run_export(out, tmp_path / "dir", "--outtype", "f16", cwd=tmp_path)
    assert bad.returncode == 2 and "--outtype applies to a .gguf DEST" in bad.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@needs_bpe
def test_export_command_writes_gguf_from_a_released_directory(tmp_path, export, capsys):
    from minigpt2.cli import main

    _, out = export
    args = ["export", str(out), str(tmp_path / "m.gguf"), "--outtype", "q8_0", "--tokenizer"]
    assert main([*args, str(GPT2_TIKTOKEN)]) == 0
    assert "wrote" in capsys.readouterr().out
    _, reader, _ = read_gguf(tmp_path / "m.gguf")
    assert reader.fields["general.file_type"].contents() == 7


def test_export_refuses_an_existing_directory_and_replaces_it_whole(tmp_path, capsys):
    from minigpt2.cli import main

    source = tmp_path / "source"
    wide_model(vocab_size=257).save_pretrained(source)
    dest = tmp_path / "dest"
    dest.mkdir()
    old = {"model.safetensors": b"x" * 1000, "vocab.json": b"{}", "merges.txt": b"#"}
    for name, data in old.items():
        (dest / name).write_bytes(data)
    assert main(["export", str(source), str(dest), "--no-tokenizer"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: {dest} already exists; pass --overwrite to replace it whole, "
        "or choose another destination"
    ]
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == old  # untouched
    assert main(["export", str(source), str(dest), "--no-tokenizer", "--overwrite"]) == 0
    # the old tokenizer files do not survive beside weights they do not belong to
    assert sorted(p.name for p in dest.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
    ]
    assert GPT.from_pretrained(dest).num_params() == wide_model(vocab_size=257).num_params()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no leftovers
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty directory holds nothing to lose
    assert main(["export", str(source), str(empty), "--no-tokenizer"]) == 0


@needs_bpe
def test_export_refuses_an_existing_gguf(tmp_path, export, capsys):
    pytest.importorskip("gguf")
    from minigpt2.cli import main

    _, out = export
    dest = tmp_path / "m.gguf"
    dest.write_bytes(b"an earlier model")
    args = ["export", str(out), str(dest), "--tokenizer", str(GPT2_TIKTOKEN)]
    assert main(args) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert dest.read_bytes() == b"an earlier model"
    assert main([*args, "--overwrite"]) == 0
    assert read_gguf(dest)[1].fields["general.architecture"].contents() == "gpt2"


def test_export_to_an_unwritable_place_is_one_line(tmp_path, capsys):
    from minigpt2.cli import main

    source = tmp_path / "source"
    wide_model(vocab_size=257).save_pretrained(source)
    assert main(["export", str(source), "/proc/minigpt2-nope/dest", "--no-tokenizer"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write /proc/minigpt2-nope/dest" in err[0], err
