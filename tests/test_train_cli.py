"""train.py as users run it: config errors, SIGINT, fine-tuning and export."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import GPT2_TIKTOKEN, ROOT, in_process, write_hf_checkpoint
from test_train import CORPUS, settings

from minigpt2.train.config import parse_args


def run(args, cwd):
    return in_process(args, cwd)


def resume(out_dir, max_iters: int, cwd):
    """train.py --init_from=resume on out_dir up to max_iters."""
    return run(
        [
            str(ROOT / "train.py"),
            f"--out_dir={out_dir}",
            "--init_from=resume",
            f"--max_iters={max_iters}",
        ],
        cwd=cwd,
    )


@pytest.mark.parametrize(
    "toml, args, message",
    [
        ("", ["--lerning_rate=1"], "command line: unknown key 'lerning_rate'; valid keys: out_dir"),
        ("", ["--max_iters=ten"], "command line: max_iters='ten' is not a valid int"),
        ("", ["--compile=maybe"], "compile='maybe' is not a valid bool"),
        ("", ["--dtype=fp8"], "dtype='fp8'; use one of float32, bfloat16, float16"),
        ("", ["--batch_size=0"], "batch_size=0 must be at least 1"),
        ("", ["--max_iters"], "--max_iters has no value; write --max_iters=VALUE"),
        ("", ["stray"], "unexpected argument 'stray'"),
        ("max_iters = 'ten'\n", [], "max_iters must be int, got str 'ten'"),
        ("learning_rate = true\n", [], "learning_rate must be float, got bool"),
        ("warmup = 10\n", [], "unknown key 'warmup'; valid keys:"),
        ("max_iters = \n", [], "not valid TOML"),
    ],
)
def test_config_errors_are_one_line(tmp_path, toml, args, message):
    cfg = tmp_path / "run.toml"
    cfg.write_text(toml)
    result = run([str(ROOT / "train.py"), str(cfg), *args], cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists()  # nothing written


def test_missing_config_file(tmp_path):
    result = run([str(ROOT / "train.py"), "nope.toml"], cwd=tmp_path)
    assert result.returncode == 2 and "config file nope.toml not found" in result.stderr


def test_dashes_and_underscores_and_ints_for_floats(tmp_path):
    cfg = parse_args(["--max-iters=5", "--learning_rate", "1", "--compile=no", "--min-lr=0"])
    assert cfg.max_iters == 5 and cfg.learning_rate == 1.0 and cfg.compile is False


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*.toml")):
        assert parse_args([str(path)]).max_iters > 0, path


def test_sigint_saves_a_checkpoint_and_resume_continues(tmp_path):
    args = settings(
        tmp_path, max_iters=100000, checkpoint_interval=100000, eval_interval=100000, dropout=0.0
    )
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "out" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (
        not metrics.exists() or len(metrics.read_text().splitlines()) < 3
    ):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "SIGINT: checkpoint saved at step" in err and "Traceback" not in err
    step = json.loads(out.strip().splitlines()[-1])["iter"]
    assert step >= 3
    resumed = resume(tmp_path / "out", step + 2, tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout.strip().splitlines()[-1])["iter"] == step + 2


@pytest.mark.skipif(not GPT2_TIKTOKEN.is_file(), reason=f"no GPT-2 BPE at {GPT2_TIKTOKEN}")
def test_finetune_released_checkpoint_lowers_loss_and_exports(tmp_path):
    transformers = pytest.importorskip("transformers")
    released = write_hf_checkpoint(
        tmp_path / "released", published=True, n_layer=2, n_head=2, n_embd=32, n_positions=64
    )
    (tmp_path / "corpus.txt").write_text(CORPUS)
    common = settings(
        tmp_path,
        init_from=str(released),
        tokenizer=str(GPT2_TIKTOKEN),
        block_size=32,
        learning_rate=3e-3,
        max_iters=15,
        eval_interval=15,
        eval_iters=4,
        dropout=0.0,
        min_lr=1e-5,
    )
    before = run([str(ROOT / "train.py"), *common, "--eval_only=true"], cwd=tmp_path)
    assert before.returncode == 0, before.stderr
    start = json.loads(before.stdout.strip().splitlines()[-1])["val_loss"]
    tuned = run([str(ROOT / "train.py"), *common], cwd=tmp_path)
    assert tuned.returncode == 0, tuned.stderr
    end = json.loads(tuned.stdout.strip().splitlines()[-1])["val_loss"]
    assert end < start - 0.5, (start, end)
    exported = run(
        ["-m", "minigpt2", "export", str(tmp_path / "out"), str(tmp_path / "export")],
        cwd=tmp_path,
    )
    assert exported.returncode == 0, exported.stderr
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    assert hf.config.n_positions == 32  # the cropped context travels with the export
    from minigpt2.formats.loading import load_any

    ours, _ = load_any(str(tmp_path / "out"))
    idx = torch.randint(0, 50257, (2, 32))
    with torch.no_grad():
        assert (hf(idx).logits - ours.eval()(idx)).abs().max().item() < 1e-4


def test_export_errors(tmp_path):
    result = run(["-m", "minigpt2", "export", str(tmp_path), str(tmp_path / "x")], cwd=tmp_path)
    assert result.returncode == 2
    assert "holds no checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_sigkill_at_any_moment_leaves_a_good_checkpoint(tmp_path):
    from minigpt2.formats.checkpoint import load_checkpoint

    args = settings(
        tmp_path, max_iters=100000, checkpoint_interval=1, eval_interval=100000, log_interval=1000
    )
    ckpt = tmp_path / "out" / "ckpt.safetensors"
    for delay in (0.05, 0.13, 0.29):  # kill at different points of the write cycle
        proc = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "train.py"),
                *args,
                *(["--init_from=resume"] if ckpt.exists() else []),
            ],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 60
        while not ckpt.exists() and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        _, header = load_checkpoint(ckpt)  # readable, digest intact
        assert header["iter"] >= 1
    finished = resume(tmp_path / "out", header["iter"] + 1, tmp_path)
    assert finished.returncode == 0, finished.stderr
    assert not list((tmp_path / "out").glob(".*.tmp"))  # a killed writer's leftovers are gone
