"""A run's out_dir is never lost: no fresh run over a finished one, one run at a time, and a
resume never records a shape it did not train."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import ROOT
from test_distributed import finish, launch, tiny
from test_train import settings
from test_train_cli import run

from minigpt2 import MiniGPT2Error
from minigpt2.cli.train import train_main
from minigpt2.train.rundir import LOCK, RunLock


def snapshot(out_dir) -> dict[str, bytes]:
    """Every file of out_dir and its bytes."""
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir()) if p.is_file()}


def test_fresh_run_into_a_finished_run_is_refused(tmp_path):
    out = tmp_path / "out"
    assert train_main(settings(tmp_path)) == 0
    before = snapshot(out)
    assert {"ckpt.safetensors", "best.safetensors", "metrics.jsonl"} <= before.keys()
    with pytest.raises(MiniGPT2Error) as e:
        train_main(settings(tmp_path, max_iters=2))
    message = str(e.value)
    assert "already holds a run" in message and "--init_from=resume" in message
    assert "--overwrite=true" in message and "\n" not in message
    assert snapshot(out) == before  # not a byte changed, no lock left behind


def test_overwrite_replaces_the_run_whole(tmp_path):
    out = tmp_path / "out"
    assert train_main(settings(tmp_path, max_iters=6)) == 0
    (out / "loss.png").write_bytes(b"an old plot")  # whether or not matplotlib is installed
    assert train_main(settings(tmp_path, max_iters=2, overwrite="true", eval_interval=5)) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in rows] == [1, 2]  # the old run's six lines are gone
    plot = out / "loss.png"
    assert (
        not plot.exists() or plot.read_bytes() != b"an old plot"
    )  # new, or none without matplotlib
    assert not (out / LOCK).exists()


def test_fine_tune_from_its_own_out_dir_with_overwrite(tmp_path):
    out = tmp_path / "out"
    assert train_main(settings(tmp_path, max_iters=3)) == 0
    args = settings(tmp_path, max_iters=2, overwrite="true", init_from=str(out))
    assert train_main(args) == 0  # the weights are read before the old run's files go
    assert (out / "ckpt.safetensors").is_file() and (out / "best.safetensors").is_file()


def test_a_second_run_is_kept_out_while_the_first_holds_the_lock(tmp_path):
    out = tmp_path / "out"
    with RunLock(out):
        holder = json.loads((out / LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(MiniGPT2Error, match=rf"in use by another run \(process {os.getpid()}"):
            train_main(settings(tmp_path))
        assert sorted(p.name for p in out.iterdir()) == [LOCK]
    assert not out.exists()  # made for the lock only, and empty: removed with it


def test_a_dead_runs_lock_is_taken_over_with_a_note(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    assert train_main(settings(tmp_path, max_iters=2)) == 0
    err = capsys.readouterr().err
    assert f"was locked by process {dead.pid} on {socket.gethostname()}" in err
    assert "no longer running; taking the lock over" in err
    assert not (out / LOCK).exists()


def run_train(args, cwd):
    return run([str(ROOT / "train.py"), *args], cwd)


def test_two_trainings_at_once_the_second_is_refused(tmp_path):
    """Two train.py processes into one out_dir: the second exits 2 naming the first."""
    args = settings(tmp_path, max_iters=100_000, eval_interval=100_000, threads=1)
    first = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lock = tmp_path / "out" / LOCK
        deadline = time.monotonic() + 60
        while not (lock.exists() and lock.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        second = run_train(args, tmp_path)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and f"in use by another run (process {first.pid}" in lines[0]
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=60)
    assert first.returncode == 130  # the first run checkpoints and stops as usual
    assert not lock.exists()


def test_a_signal_while_the_lock_is_taken_stops_the_run_and_frees_it(tmp_path, monkeypatch):
    """SIGINT as run() takes out_dir's lock: the run stops as usual (checkpointed, 130) and the
    lock file goes. Before, KeyboardInterrupt came out of the claim and left out/.lock."""
    import minigpt2.train.trainer as trainer

    real, calls = trainer.claim_out_dir, []

    def claim_then_signal(cfg, dist):
        lock = real(cfg, dist)
        calls.append(1)
        if len(calls) == 2:  # run()'s claim, not _prepare's check
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # Python runs the handler here
        return lock

    monkeypatch.setattr(trainer, "claim_out_dir", claim_then_signal)
    try:
        code = train_main(settings(tmp_path, max_iters=50))
    except KeyboardInterrupt:
        code = "KeyboardInterrupt"
    assert code == 130 and len(calls) == 2
    assert (tmp_path / "out" / "ckpt.safetensors").is_file()
    assert not (tmp_path / "out" / LOCK).exists()


def test_ranks_stop_together_on_a_locked_out_dir(tmp_path):
    """Under torchrun only rank 0 takes the lock; every rank hears the refusal and exits."""
    with RunLock(tmp_path / "busy"):
        results = finish(launch(2, tiny(tmp_path, "busy"), tmp_path), timeout=60)
    for code, _, err in results:
        assert code == 2 and "is in use by another run" in err, err


def test_an_unwritable_out_dir_is_one_line(tmp_path):
    result = run_train(settings(tmp_path, out_dir="/proc/minigpt2-nope"), tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot use /proc/minigpt2-nope as out_dir" in lines[0], lines


def test_resume_refuses_a_new_shape_and_keeps_config_true(tmp_path):
    out = tmp_path / "out"
    assert train_main(settings(tmp_path, max_iters=3)) == 0
    before = snapshot(out)
    resume = [f"--out_dir={out}", "--init_from=resume", "--max_iters=6"]
    with pytest.raises(MiniGPT2Error) as e:
        train_main([*resume, "--n_embd=64", "--n_layer=8"])
    message = str(e.value)
    assert "n_layer=8, n_embd=64 cannot change at resume" in message
    assert "has n_layer=2, n_embd=32" in message
    assert snapshot(out) == before
    # the saved values given again are fine, and what may change at resume is recorded
    assert train_main([*resume, "--n_embd=32", "--dropout=0.0", "--learning_rate=1e-3"]) == 0
    config = (out / "config.toml").read_text()
    assert "n_embd = 32" in config and "n_layer = 2" in config and "dropout = 0.0" in config
