"""Shared fixtures: released-layout checkpoints written by transformers, and shared data paths."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MINIGPT2_SHARED", ROOT.parent / "shared"))
GPT2_TIKTOKEN = Path(os.environ.get("MINIGPT2_GPT2_TIKTOKEN", SHARED / "tokenizers/gpt2.tiktoken"))
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"


def in_process(
    args: list, cwd, stdin: str | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """What `python ARGS` reports (exit code, stdout, stderr) for the project's command line
    (ARGS: train.py, sample.py or -m minigpt2, then the command's), run in this process: the
    same entry point without the ~2 s a fresh interpreter spends importing torch. Tests of
    what only a process shows (signals, console scripts, torchrun, offline Hub settings read
    at import) keep subprocess.run. env: variables set for the run only."""
    from minigpt2.cli import main

    args = [str(a) for a in args]
    defaults = {}
    if args[:2] == ["-m", "minigpt2"]:
        argv = args[2:]
    elif Path(args[0]).name == "train.py":  # train.py: the quickstart when no config is given
        argv = ["train", *args[1:]]
        defaults["default_config"] = str(ROOT / "configs" / "quickstart.toml")
    elif Path(args[0]).name == "sample.py":
        argv = ["sample", *args[1:]]
    else:
        raise ValueError(f"in_process runs the project's command line, not {args[0]}")
    out, err = io.StringIO(), io.StringIO()
    here, threads, stdin_was = os.getcwd(), torch.get_num_threads(), sys.stdin
    sys.stdin = io.StringIO(stdin or "")
    os.chdir(cwd)
    env_was = dict(os.environ)  # a command may set some for its process (--no-native)
    os.environ.update(env or {})
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(argv, **defaults)
            except SystemExit as e:  # argparse's usage errors and --help
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        os.chdir(here)
        sys.stdin = stdin_was
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(env_was)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


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


def write_slow_endless_checkpoint(directory: Path, n_positions: int) -> Path:
    """Byte-tokenizer weights slow enough to stop mid-reply: 4 layers of 512, about 2 ms a token
    on 2 cores (1,000 tokens in 2 s, where the 64-wide model takes 0.07 s). The end-of-text row
    is zero, so its logit 0 never beats the likeliest of 256 wide-init ones: greedy replies run
    to max_tokens."""
    from safetensors.torch import load_file, save_file

    write_hf_checkpoint(
        directory, n_layer=4, n_head=4, n_embd=512, vocab_size=257, n_positions=n_positions,
        initializer_range=0.3,
    )  # fmt: skip
    tensors = load_file(directory / "model.safetensors")
    tensors["transformer.wte.weight"][256] = 0
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
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


def fill_slots(model, cache, seqs: dict, lengths: dict) -> None:
    """Run seqs[slot]'s first lengths[slot] tokens into each slot of a KVCache.slots cache."""
    with torch.inference_mode():
        for slot, n in lengths.items():
            alone = cache.row(slot)
            model.hidden_states(seqs[slot][:, :n], alone)
            cache.lengths[slot], cache.live[slot] = alone.pos, True


def slot_tokens(seqs: dict, lengths: dict, step: int, slots: int) -> torch.Tensor:
    """(slots, 1) ids of each filled slot's token at its step after the prompt (others 0)."""
    idx = torch.zeros(slots, 1, dtype=torch.long)
    for slot, n in lengths.items():
        idx[slot, 0] = seqs[slot][0, n + step]
    return idx
