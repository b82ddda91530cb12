"""Shared fixtures: released-layout checkpoints written by transformers, and shared data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MINIGPT2_SHARED", ROOT.parent / "shared"))
GPT2_TIKTOKEN = Path(os.environ.get("MINIGPT2_GPT2_TIKTOKEN", SHARED / "tokenizers/gpt2.tiktoken"))
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"


def write_hf_checkpoint(directory: Path, published: bool = False, seed: int = 0, **cfg) -> Path:
    """Save a random GPT2LMHeadModel with transformers; published=True rewrites the keys the way
    the openai-community/gpt2 file spells them (no prefix, with causal-mask buffers)."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    torch.manual_seed(seed)
    config = transformers.GPT2Config(**cfg)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.save_pretrained(directory)
    if published:
        path = directory / "model.safetensors"
        tensors = {k.removeprefix("transformer."): v for k, v in load_file(path).items()}
        n = config.n_positions
        mask = torch.tril(torch.ones(n, n, dtype=torch.uint8)).view(1, 1, n, n)
        for i in range(config.n_layer):
            tensors[f"h.{i}.attn.bias"] = mask.clone()
            tensors[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        save_file(tensors, path, metadata={"format": "pt"})
    return directory


@pytest.fixture
def hf_tiny(tmp_path: Path) -> Path:
    """A tiny released-layout checkpoint (transformers' own spelling)."""
    return write_hf_checkpoint(
        tmp_path / "hf-tiny", n_layer=2, n_head=2, n_embd=64, vocab_size=300, n_positions=64
    )


def write_wide_byte_checkpoint(directory: Path, n_positions: int, **extra) -> Path:
    """Random released-layout weights for the byte tokenizer (257 ids). The wide init (0.3)
    makes logits far from uniform, so a wrong mask, position or score shows."""
    return write_hf_checkpoint(
        directory,
        n_layer=2,
        n_head=4,
        n_embd=64,
        vocab_size=257,
        n_positions=n_positions,
        initializer_range=0.3,
        **extra,
    )


@pytest.fixture
def hf_folder(tmp_path: Path, monkeypatch) -> Path:
    """An empty folder to hold a local Hugging Face dataset (`hf:FOLDER`), the Hub offline."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    folder = tmp_path / "ds"
    folder.mkdir()
    return folder
