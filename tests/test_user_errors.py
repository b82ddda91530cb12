"""What a new user hits: Ctrl-C, full and unwritable disks, wrong hints, a tokenizer that is not
the model's, and logs that are no terminal. Each is one line and a non-zero exit, or it works."""

import json
import os
import resource
import signal
import subprocess
import sys

import pytest
from conftest import GPT2_TIKTOKEN, ROOT, in_process, write_hf_checkpoint
from safetensors.torch import load_file
from test_train import settings

from minigpt2 import MiniGPT2Error
from minigpt2.cli import main
from minigpt2.cli.train import train_main

INVALID_UTF8 = b"valid text, then \xff\xfe bytes that are not UTF-8\n" * 40


def one_error_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory):
    """A tiny trained out_dir with the byte tokenizer."""
    tmp = tmp_path_factory.mktemp("run")
    assert train_main(settings(tmp, max_iters=3, dropout=0.0)) == 0
    return tmp / "out"


def interrupt(monkeypatch, target: str) -> None:
    """Make target (module:attribute) raise KeyboardInterrupt, as Ctrl-C does mid-command."""
    module, name = target.split(":")

    def pressed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(f"minigpt2.{module}.{name}", pressed)


def test_ctrl_c_in_prepare_leaves_no_partial_cache(tmp_path, monkeypatch, capsys):
    (tmp_path / "a.txt").write_text("some text to tokenize\n" * 100)
    interrupt(monkeypatch, "data.corpus:_encode_pieces")
    args = ["prepare", str(tmp_path / "a.txt"), "--tokenizer", "byte"]
    assert main([*args, "--out-dir", str(tmp_path / "cache")]) == 130
    assert capsys.readouterr().err.strip().splitlines() == [
        "interrupted (Ctrl-C); nothing was left half written"
    ]
    assert list((tmp_path / "cache").iterdir()) == []


def test_ctrl_c_in_export_leaves_the_destination_as_it_was(tmp_path, byte_run, monkeypatch, capsys):
    interrupt(monkeypatch, "formats.released:hf_config")
    assert main(["export", str(byte_run), str(tmp_path / "exported")]) == 130
    assert "interrupted (Ctrl-C)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no folder, no hidden leftover


def test_ctrl_c_in_eval(tmp_path, byte_run, monkeypatch, capsys):
    (tmp_path / "t.txt").write_text("the cat sat on the mat\n" * 20)
    interrupt(monkeypatch, "cli.eval:perplexity")
    args = ["eval", "--model", str(byte_run), "--task", "perplexity", "--data", "t.txt"]
    monkeypatch.chdir(tmp_path)
    assert main([*args, "--data-cache", str(tmp_path / "c")]) == 130
    assert capsys.readouterr().err.strip().endswith("nothing was left half written")


def default_sigint() -> None:
    """In the child: SIGINT as a terminal gives it. A test run started in the background of a
    non-interactive shell ignores SIGINT, its children inherit that, and Python then installs
    no KeyboardInterrupt handler: the Ctrl-C tests would wait for nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def streaming_sample(tmp_path, byte_run) -> subprocess.Popen:
    """`minigpt2 sample` on 2 threads with a long way to go, once it prints."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "minigpt2", "sample", "--model", str(byte_run)]
        + ["--max-new-tokens", "1000000", "--prompt", "the", "--threads", "2"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=default_sigint,
    )
    assert proc.stdout.read(20)  # it is generating
    return proc


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tgkill and /proc are Linux's")
def test_ctrl_c_caught_by_another_thread_while_sampling(tmp_path, byte_run):
    """The kernel may hand a process's SIGINT to any of its threads, here one the decoder's
    OpenMP pool: `minigpt2 sample` still stops, exit 130."""
    import ctypes

    proc = streaming_sample(tmp_path, byte_run)
    try:
        others = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid]
        libc = ctypes.CDLL(None, use_errno=True)
        tgkill = 234 if os.uname().machine == "x86_64" else 131  # the syscall's number
        assert libc.syscall(tgkill, proc.pid, others[0], signal.SIGINT) == 0
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130, err


def test_ctrl_c_while_sampling_a_real_signal(tmp_path, byte_run):
    """SIGINT to a streaming `minigpt2 sample`: exit 130 and one line, no traceback."""
    proc = streaming_sample(tmp_path, byte_run)
    try:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.decode().strip().splitlines() == [
        "interrupted (Ctrl-C); nothing was left half written"
    ]


def run_train(args, cwd, preexec_fn=None):
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=preexec_fn,
    )


def small_file_limit():
    """In the child: files may not grow past 20 kB, as on a disk that is full."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails (EFBIG), not the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last(tmp_path):
    out = tmp_path / "out"
    assert train_main(settings(tmp_path, max_iters=3)) == 0
    before = load_file(out / "ckpt.safetensors")
    resume = [f"--out_dir={out}", "--init_from=resume", "--max_iters=6"]
    result = run_train(resume, tmp_path, preexec_fn=small_file_limit)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]  # after the run's own lines
    assert (
        line.startswith("error: ")
        and f"could not write {out}/" in line
        and "previous file there is intact" in line
    )
    after = load_file(out / "ckpt.safetensors")  # still whole, still step 3's
    assert all((after[k] == v).all() for k, v in before.items())
    assert [p.name for p in out.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.parametrize("command", ["train", "eval"])
def test_invalid_utf8_hint_names_an_option_the_command_takes(tmp_path, byte_run, command):
    (tmp_path / "bad.txt").write_bytes(INVALID_UTF8)
    cache = tmp_path / "cache"
    if command == "train":
        common = settings(tmp_path, data=str(tmp_path / "bad.txt"), max_iters=1)
    else:
        common = ["eval", "--model", str(byte_run), "--task", "perplexity"]
        common += ["--data", str(tmp_path / "bad.txt"), "--data-cache", str(cache)]
    script = [str(ROOT / "train.py")] if command == "train" else ["-m", "minigpt2"]
    run = [sys.executable, *script, *common]
    bad = subprocess.run(run, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert "not valid UTF-8" in one_error_line(bad.stderr)
    assert "pass --decode-errors=replace" in bad.stderr
    good = subprocess.run(
        [*run, "--decode-errors=replace"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert good.returncode == 0, good.stderr  # the hint works as written


def test_a_negative_learning_rate_is_named(tmp_path):
    with pytest.raises(MiniGPT2Error, match=r"^learning_rate=-1.0 must be above 0$"):
        train_main(settings(tmp_path, learning_rate=-1))


def sample(*args, cwd):
    return in_process(["-m", "minigpt2", "sample", *args], cwd)


@pytest.mark.parametrize("count", ["0", "-3"])
def test_max_new_tokens_below_one_is_refused(byte_run, tmp_path, count):
    result = sample("--model", byte_run, "--max-new-tokens", count, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert f"--max-new-tokens={count} must be >= 1" in one_error_line(result.stderr)


def test_sampled_text_ends_with_a_newline(byte_run, tmp_path):
    result = sample("--model", byte_run, "--max-new-tokens", "5", "--seed", "1", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.endswith("\n")
    result = sample(
        "--model", byte_run, "--max-new-tokens", "5", "--num-samples", "2", cwd=tmp_path
    )
    assert result.returncode == 0 and result.stdout.endswith("\n")


def test_byte_tokenizer_on_gpt2s_vocabulary_is_refused(tmp_path):
    pytest.importorskip("transformers")
    directory = write_hf_checkpoint(tmp_path / "hf", n_layer=1, n_head=2, n_embd=32, n_positions=32)
    result = sample("--model", directory, "--tokenizer", "byte", "--prompt", "hi", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    line = one_error_line(result.stderr)
    assert "--tokenizer byte has 257 ids and the model 50,257" in line


def test_a_non_terminal_log_gets_plain_lines_not_bar_frames(tmp_path):
    args = settings(tmp_path, max_iters=4, log_interval=2, eval_interval=4, progress="true")
    result = run_train(args, tmp_path)  # stderr is a pipe, as under torchrun or a batch job
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stderr
    steps = [ln for ln in result.stderr.splitlines() if ln.startswith("step ") and "loss" in ln]
    assert [s.split(":")[0] for s in steps] == ["step 2/4", "step 4/4"]
    assert f"minigpt2 sample --model {tmp_path / 'out'}" in result.stderr  # what to run next


def test_lm_eval_offline_says_to_use_a_local_task(tmp_path):
    pytest.importorskip("lm_eval")
    from minigpt2 import GPT, GPTConfig

    GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=32, vocab_size=257)).save_pretrained(
        tmp_path / "m"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["HF_HOME"] = str(tmp_path / "hf")
    result = subprocess.run(
        [sys.executable, "-m", "minigpt2", "lm-eval", "--model_args"]
        + ["pretrained=m,tokenizer=byte", "--tasks", "lambada_openai", "--limit", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "run a local task: --include_path DIR" in errors[0]


def test_export_is_read_back_offline_with_its_own_tokenizer(tmp_path):
    """A directory with vocab.json + merges.txt (or only tokenizer.json) needs no --tokenizer,
    and reads as the same tiktoken encoding as GPT-2's file."""
    if not GPT2_TIKTOKEN.is_file():
        pytest.skip(f"GPT-2's BPE file is not at {GPT2_TIKTOKEN}")
    import torch

    from minigpt2 import GPT, GPTConfig
    from minigpt2.data.tokenizer import get_tokenizer
    from minigpt2.formats.loading import tokenizer_for

    bpe = get_tokenizer(str(GPT2_TIKTOKEN))
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32))
    model.save_pretrained(tmp_path / "exported", bpe)
    text = "Hello, my dog's 12345 ünïcödé   spaces\n"
    for drop in ([], ["vocab.json", "merges.txt"]):
        for name in drop:
            (tmp_path / "exported" / name).unlink()
        tok = tokenizer_for(None, None, str(tmp_path / "exported"), 50257)
        assert tok.fingerprint == bpe.fingerprint and tok.encode(text) == bpe.encode(text)
    result = sample("--model", tmp_path / "exported", "--prompt", "Hello", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[0])["prompt"] == "Hello"


def test_a_vocabulary_that_is_not_gpt2s_is_refused(tmp_path):
    from minigpt2.formats.loading import tokenizer_for

    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "vocab.json").write_text(json.dumps({"a": 0, "b": 1, "ab": 2}))
    with pytest.raises(MiniGPT2Error, match="holds a vocabulary that is not GPT-2's"):
        tokenizer_for(None, None, str(directory), 3)


def test_auto_threads_leave_busy_cores_alone(monkeypatch):
    """threads=0 counts the cores idle now: with every core busy elsewhere, one thread."""
    import time

    import torch

    from minigpt2.device import idle_cores, set_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    busy = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(os.cpu_count() or 1)
    ]
    try:
        time.sleep(0.5)  # every busy process running
        assert idle_cores() < 0.5
        assert set_threads(0) == 1 and torch.get_num_threads() == 1
        assert set_threads(3) == 3  # a count given is taken as it is
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user chose: torch's count stays
        assert set_threads(0) == 3
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
        torch.set_num_threads(before)
    with pytest.raises(MiniGPT2Error, match="threads=-1 must be 0"):
        set_threads(-1)


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_a_negative_thread_count_is_one_line(byte_run, tmp_path, command, capsys):
    args = [command, "--model", str(byte_run), "--threads", "-1"]
    if command == "eval":
        args += ["--task", "perplexity", "--data", str(tmp_path / "t.txt")]
    assert main(args) == 2
    assert "threads=-1 must be 0 (one per idle core) or more" in one_error_line(
        capsys.readouterr().err
    )


def test_export_of_a_directory_onto_a_file_is_one_line(byte_run, tmp_path, capsys):
    dest = tmp_path / "taken"
    dest.write_text("someone's file")
    assert main(["export", str(byte_run), str(dest), "--overwrite"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{dest} is a file and this export writes a directory" in line
    assert dest.read_text() == "someone's file"
