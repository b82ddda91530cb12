"""Tokenizers: GPT-2's BPE from a local file, raw bytes, and their errors."""

import shutil

import pytest
from conftest import GPT2_TIKTOKEN

from minigpt2 import MiniGPT2Error
from minigpt2.data.tokenizer import get_tokenizer

needs_bpe = pytest.mark.skipif(
    not GPT2_TIKTOKEN.is_file(),
    reason=f"GPT-2 BPE file not found at {GPT2_TIKTOKEN} (set MINIGPT2_GPT2_TIKTOKEN)",
)
TEXTS = ["Hello, world", "naïve café — 東京 🤖 \U0001f600", "tabs\tand\n\nnewlines  ", ""]


@needs_bpe
def test_gpt2_from_local_file():
    tok = get_tokenizer(str(GPT2_TIKTOKEN))
    assert tok.name == "gpt2" and tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode("Hello, my dog") == [15496, 11, 616, 3290]
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


@needs_bpe
def test_literal_endoftext_is_plain_text():
    tok = get_tokenizer(str(GPT2_TIKTOKEN))
    ids = tok.encode("a <|endoftext|> b")
    assert 50256 not in ids
    assert tok.decode(ids) == "a <|endoftext|> b"


@needs_bpe
def test_tiktoken_cache_dir_is_honoured(tmp_path, monkeypatch):
    shutil.copy(GPT2_TIKTOKEN, tmp_path / "gpt2.tiktoken")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    assert get_tokenizer("gpt2").encode("Hello, my dog") == [15496, 11, 616, 3290]


def test_gpt2_offline_without_file_says_how(tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # empty: nothing cached
    try:
        get_tokenizer("gpt2")
    except MiniGPT2Error as e:
        assert "--tokenizer path/to/gpt2.tiktoken" in str(e)
    else:
        pytest.skip("this machine reached the internet and downloaded the BPE")


def test_tiktoken_file_with_wrong_hash(tmp_path):
    bad = tmp_path / "gpt2.tiktoken"
    bad.write_text("SGVsbG8= 0\n")
    with pytest.raises(MiniGPT2Error, match="is not GPT-2's BPE file"):
        get_tokenizer(str(bad))
    with pytest.raises(MiniGPT2Error, match="does not exist"):
        get_tokenizer(str(tmp_path / "missing.tiktoken"))


def test_byte_tokenizer_round_trip():
    tok = get_tokenizer("byte")
    assert tok.vocab_size == 257 and tok.eot_id == 256
    for text in TEXTS + ["<|endoftext|>"]:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode([104, 105, 256]) == "hi"


def test_unknown_tokenizer():
    with pytest.raises(MiniGPT2Error, match="unknown tokenizer 'sentencepiece'; use byte, gpt2"):
        get_tokenizer("sentencepiece")
