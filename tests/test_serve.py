"""`minigpt2 serve`: OpenAI's API through the official client, against `minigpt2 sample`'s tokens;
continuous batching, stop strings, disconnects, bad input, the API key, SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import write_slow_endless_checkpoint, write_wide_byte_checkpoint

from minigpt2.cli import main

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

KEY = "test-key"
POSITIONS = 1024


def start_server(model: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`minigpt2 serve` on a free port; (process, base URL) once it listens."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "minigpt2", "serve", "--model", str(model), "--tokenizer"]
    cmd += ["byte", "--port", "0", "--threads", "1", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()  # "minigpt2 serve: listening on http://HOST:PORT"
    if "listening on" not in line:
        proc.kill()
        pytest.fail(f"the server did not start: {line} {proc.stderr.read()}")
    return proc, line.split("listening on ")[1].strip()


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_wide_byte_checkpoint(tmp_path_factory.mktemp("serve") / "m", POSITIONS)


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory) -> Path:
    """For requests that must still run when the test acts (a disconnect, a full queue,
    SIGTERM): the 64-wide model makes 1,000 tokens in 0.07 s, before a client can act."""
    return write_slow_endless_checkpoint(tmp_path_factory.mktemp("slow") / "m", POSITIONS)


@pytest.fixture(scope="module")
def server(model_dir):
    proc, url = start_server(model_dir, "--api-key", KEY, "--max-batch", "8")
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def sample(model_dir: Path, capsys, prompt: str, n: int, *knobs: str, whole: bool = False):
    """`minigpt2 sample`'s text for prompt, n new tokens, stopping at end-of-text (whole: its
    JSON object)."""
    capsys.readouterr()
    args = ["sample", "--model", str(model_dir), "--tokenizer", "byte", "--prompt", prompt]
    args += ["--max-new-tokens", str(n), "--stop-at-eot", "--json", "--threads", "1", *knobs]
    assert main(args) == 0
    record = json.loads(capsys.readouterr().out.splitlines()[-1])
    return record if whole else record["text"]


def test_completions_equal_sample_whole_and_streamed(client, model_dir, capsys):
    record = sample(model_dir, capsys, "The cat", 40, "--greedy", whole=True)
    alone, ids = record["text"], record["token_ids"]
    reply = client.completions.create(model="m", prompt="The cat", max_tokens=40, temperature=0)
    assert reply.choices[0].text == alone
    assert reply.choices[0].finish_reason == ("stop" if 256 in ids else "length")
    assert reply.usage.prompt_tokens == len(b"The cat")
    assert reply.usage.completion_tokens == len(ids) - (256 in ids)  # end-of-text not counted
    chunks = client.completions.create(
        model="m", prompt="The cat", max_tokens=40, temperature=0, stream=True
    )
    pieces = list(chunks)
    assert "".join(c.choices[0].text for c in pieces) == alone
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_whole_and_streamed(client, model_dir, capsys):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    reply = client.chat.completions.create(
        model="m", messages=messages, max_tokens=30, temperature=0
    )
    text = reply.choices[0].message.content
    assert reply.choices[0].message.role == "assistant" and reply.object == "chat.completion"
    # a plain model gets the chat template: the same prompt through sample gives the same text
    prompt = "### System:\nBe brief.\n\n### User:\nHi\n\n### Assistant:\n"
    assert text == sample(model_dir, capsys, prompt, 30, "--greedy")
    stream = client.chat.completions.create(
        model="m", messages=messages, max_tokens=30, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_concurrent_requests_each_equal_their_alone_result(server, client, model_dir, capsys):
    """8 greedy requests of different prompts and lengths at once, then 8 seeded samples: each
    gets what `minigpt2 sample` gives it alone."""
    prompts = [f"{'abcdefgh'[i]} prompt of {i * 7} chars " + "x" * (i * 7) for i in range(8)]
    lengths = [20 + 9 * i for i in range(8)]
    greedy = [
        sample(model_dir, capsys, p, n, "--greedy") for p, n in zip(prompts, lengths, strict=True)
    ]
    seeded = [
        sample(model_dir, capsys, p, n, "--seed", str(100 + i), "--temperature", "0.9")
        for i, (p, n) in enumerate(zip(prompts, lengths, strict=True))
    ]

    def ask(i: int, seed: int | None) -> str:
        knobs = {"temperature": 0} if seed is None else {"temperature": 0.9, "seed": seed}
        reply = client.completions.create(
            model="m", prompt=prompts[i], max_tokens=lengths[i], **knobs
        )
        return reply.choices[0].text

    with ThreadPoolExecutor(8) as pool:
        assert list(pool.map(ask, range(8), [None] * 8)) == greedy
        assert list(pool.map(ask, range(8), [100 + i for i in range(8)])) == seeded
    assert httpx.get(server + "/health").json()["peak"] >= 4  # they did run as one batch


@pytest.mark.parametrize("knob", [["--dtype", "bfloat16"], ["--quantize", "int8"]])
def test_bfloat16_and_int8_requests_at_once_equal_sample_alone(slow_model_dir, capsys, knob):
    """bfloat16 and int8 weights: 8 greedy requests at once each get `minigpt2 sample`'s text
    alone. Before, a batch of more than 4 rows ran torch's products, which round activations to
    bfloat16, and int8 prompts another kernel than sample's: the texts differed. The slow model
    keeps the first requests running while the last arrive."""
    model_dir = slow_model_dir
    prompts = [f"{'abcdefgh'[i]} prompt of {i * 7} chars " + "x" * (i * 7) for i in range(8)]
    lengths = [20 + 9 * i for i in range(8)]
    alone = [
        sample(model_dir, capsys, p, n, "--greedy", *knob)
        for p, n in zip(prompts, lengths, strict=True)
    ]
    proc, url = start_server(model_dir, "--max-batch", "8", *knob)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)

        def ask(i: int) -> str:
            reply = client.completions.create(
                model="m", prompt=prompts[i], max_tokens=lengths[i], temperature=0
            )
            return reply.choices[0].text

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(ask, range(8))) == alone
        assert httpx.get(url + "/health").json()["peak"] >= 5  # past the float32 native rows
    finally:
        stop_server(proc)


def test_stop_strings_cut_exactly(client):
    knobs = dict(model="m", prompt="Once", max_tokens=60, temperature=0)
    knobs["extra_body"] = {"ignore_eos": True}  # 60 tokens whatever comes
    text = client.completions.create(**knobs).choices[0].text
    stop = text[10:13]  # three characters from the middle
    cut = text[: text.find(stop)]
    reply = client.completions.create(**knobs, stop=[stop, "\x00never"])
    assert reply.choices[0].text == cut and reply.choices[0].finish_reason == "stop"
    stream = client.completions.create(**knobs, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in stream) == cut


def test_a_disconnect_frees_its_row(slow_model_dir):
    proc, url = start_server(slow_model_dir)
    body = {"prompt": "a", "max_tokens": POSITIONS - 1, "stream": True}
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            before = http.get("/health").json()
            with http.stream("POST", "/v1/completions", json=body) as response:
                lines = response.iter_lines()
                for _ in range(3):
                    next(lines)
            deadline = time.time() + 10
            while http.get("/health").json()["running"] and time.time() < deadline:
                time.sleep(0.02)
            health = http.get("/health").json()
    finally:
        stop_server(proc)
    assert health["running"] == 0  # freed at a step, before the tokens it asked for ran out
    assert health["cancelled"] == before["cancelled"] + 1


BAD = [
    (b"{not json", None),
    (b"[1, 2]", None),
    (json.dumps({"max_tokens": 5}).encode(), "prompt"),
    (json.dumps({"prompt": "a", "max_tokens": "5"}).encode(), "max_tokens"),
    (json.dumps({"prompt": "a", "max_tokens": True}).encode(), "max_tokens"),
    (json.dumps({"prompt": "a", "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"prompt": "a", "max_tokens": POSITIONS}).encode(), "prompt"),
    (json.dumps({"prompt": "a", "temperature": -0.5}).encode(), "temperature"),
    (json.dumps({"prompt": "a", "top_p": 0}).encode(), "top_p"),
    (json.dumps({"prompt": "a", "top_p": 1.5}).encode(), "top_p"),
    (json.dumps({"prompt": "a", "stop": 5}).encode(), "stop"),
]
BAD_CHAT = [
    (json.dumps({"messages": []}).encode(), "messages"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), "messages"),
    (json.dumps({"messages": [{"role": "user", "content": 3}]}).encode(), "messages"),
    (json.dumps({"messages": "hi"}).encode(), "messages"),
]


def test_bad_input_gets_400_and_the_server_keeps_serving(server, client):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    with httpx.Client(base_url=server, headers=headers, timeout=30) as http:
        for path, cases in (("/v1/completions", BAD), ("/v1/chat/completions", BAD_CHAT)):
            for body, param in cases:
                response = http.post(path, content=body)
                assert response.status_code == 400, (body, response.text)
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}
                assert error["param"] == param and error["type"] == "invalid_request_error"
        too_long = http.post("/v1/completions", json={"prompt": "ab", "max_tokens": POSITIONS})
        assert "2 too many" in too_long.json()["error"]["message"]  # 2 + 256 - 256
        huge = http.post("/v1/completions", content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}')
        assert huge.status_code == 413
    reply = client.completions.create(model="m", prompt="still", max_tokens=3, temperature=0)
    assert len(reply.choices[0].text) <= 3


def test_the_api_key(server):
    with httpx.Client(base_url=server, timeout=30) as http:
        assert http.get("/v1/models").status_code == 401
        wrong = http.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        right = http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert right.status_code == 200 and right.json()["data"][0]["object"] == "model"
        assert http.get("/health").status_code == 200  # health needs no key


def test_full_queue_503_and_sigterm_ends_streams_cleanly(slow_model_dir):
    """One row and room for one waiting: a third request gets 503 with Retry-After; SIGTERM
    then ends the running stream with a last chunk and [DONE], and the server exits 0."""
    knobs = ("--max-batch", "1", "--max-queue", "1", "--host", "0.0.0.0")
    proc, url = start_server(slow_model_dir, *knobs)
    body = {"prompt": "a", "max_tokens": POSITIONS - 2, "stream": True, "ignore_eos": True}
    try:
        with (
            httpx.Client(base_url=url, timeout=30) as http,
            http.stream("POST", "/v1/completions", json=body) as running,
        ):
            lines = running.iter_lines()
            assert next(lines).startswith("data: ")
            waiting = threading.Thread(
                target=http.post,
                args=("/v1/completions",),
                kwargs={"json": body | {"stream": False}},
            )
            waiting.start()
            deadline = time.time() + 10
            while http.get("/health").json()["queued"] == 0 and time.time() < deadline:
                time.sleep(0.02)
            full = http.post("/v1/completions", json=body)
            assert full.status_code == 503 and full.headers["retry-after"] == "1"
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
            waiting.join(30)
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "abort"
        assert proc.wait(30) == 0
        assert "without --api-key" in proc.stderr.read()  # it listened beyond localhost
    finally:
        if proc.poll() is None:
            proc.kill()


def test_chat_in_the_terminal(model_dir, capsys, monkeypatch):
    """Two turns, /reset, one more, /exit: each reply is what sample gives for the
    conversation in the chat template (the second turn's prompt holds the first exchange)."""
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nAnd you?\n/reset\nHi\n/exit\nnever\n"))
    args = ["chat", "--model", str(model_dir), "--tokenizer", "byte", "--temperature", "0"]
    assert main(args + ["--max-new-tokens", "20", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 3
    first = "### User:\nHi\n\n### Assistant:\n"
    expected = "model> " + sample(model_dir, capsys, first, 20, "--greedy") + "\n"
    assert out.startswith(expected) and out.count(expected) == 2  # /reset forgot the turns


def test_chat_drops_the_oldest_turns_past_the_context(tmp_path, capsys, monkeypatch):
    import io

    small = write_wide_byte_checkpoint(tmp_path / "small", 96)
    lines = "".join(f"message number {i} " + "y" * 20 + "\n" for i in range(4))
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    args = ["chat", "--model", str(small), "--tokenizer", "byte", "--temperature", "0"]
    assert main(args + ["--max-new-tokens", "16", "--threads", "1"]) == 0
    assert "oldest turns: past the context" in capsys.readouterr().err


def test_choices_echo_and_logprobs(client, model_dir, capsys):
    """n choices draw with seed, seed + 1, ... as sample's samples do; echo puts the prompt
    first; logprobs give each token's log-probability and the likeliest alternatives."""
    reply = client.completions.create(
        model="m", prompt="Hey", max_tokens=12, temperature=0.9, seed=7, n=2, echo=True,
        logprobs=3,
    )  # fmt: skip
    for i, choice in enumerate(reply.choices):
        alone = sample(model_dir, capsys, "Hey", 12, "--seed", str(7 + i), "--temperature", "0.9")
        assert choice.index == i and choice.text == "Hey" + alone
        lp = choice.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
        assert all(v <= 0 for v in lp.token_logprobs) and all(len(t) <= 3 for t in lp.top_logprobs)
        greedy_top = [max(t.values()) for t in lp.top_logprobs]
        assert all(v <= top + 1e-6 for v, top in zip(lp.token_logprobs, greedy_top, strict=True))


def test_without_the_serve_extra_one_line_says_what_to_install(monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a)
    )
    assert main(["serve", "--model", "nowhere"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'minigpt2[serve]'" in err


def test_the_engine_in_bfloat16_batches_and_survives_a_fault(model_dir):
    """Three bfloat16 sequences at once each make their tokens (the slot cache is float32
    there); a fault in a step ends the running rows with "error" and the next job runs."""
    import torch

    from minigpt2.decode.generate import SamplingConfig
    from minigpt2.formats.loading import load_any
    from minigpt2.serve.engine import Engine, Job

    model, _ = load_any(str(model_dir))
    engine = Engine(model.eval().to(torch.bfloat16), 257, slots=4, max_queue=8)
    got: dict[int, list] = {i: [] for i in range(4)}
    ended = threading.Event()

    def job(i: int, n: int) -> Job:
        def emit(event):
            got[i].append(event)
            if event.finish is not None and i == 3:
                ended.set()

        cfg = SamplingConfig(max_new_tokens=n, greedy=True)
        return Job([1 + i, 2, 3], cfg, emit)

    try:
        engine.submit([job(0, 30), job(1, 20), job(2, 25)])
        deadline = time.time() + 60
        while sum(e.finish is not None for i in range(3) for e in got[i]) < 3:
            assert time.time() < deadline
            time.sleep(0.01)
        for i, n in enumerate((30, 20, 25)):
            assert [e.finish for e in got[i]] == [None] * n + ["length"]
        original = engine._step
        engine._step = lambda: (_ for _ in ()).throw(RuntimeError("a fault"))
        engine.submit([job(3, 5)])
        assert ended.wait(30) and got[3][-1].finish == "error"
        assert "a fault" in engine.load.last_error
        engine._step = original
        got[3].clear()
        ended.clear()
        engine.submit([job(3, 5)])
        assert ended.wait(30) and got[3][-1].finish == "length"
    finally:
        engine.shutdown()


@pytest.mark.parametrize(
    "argv, says",
    [
        (["serve", "--max-batch", "0"], "--max-batch=0 must be >= 1"),
        (["serve", "--max-queue", "-1"], "--max-queue=-1 must be >= 1"),
        (["serve", "--port", "70000"], "--port=70000 is no port"),
        (["serve", "--model", "no/such/run"], "no/such/run"),
        (["chat", "--max-new-tokens", "0"], "--max-new-tokens=0 must be >= 1"),
        (["chat", "--model", "no/such/run"], "no/such/run"),
    ],
)
def test_bad_serve_and_chat_options_are_one_line(argv, says, capsys, tmp_path, monkeypatch):
    """Refused before anything starts: one line, exit 2, nothing written."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_port_in_use_is_one_line(model_dir, server):
    port = server.rsplit(":", 1)[1]
    args = [sys.executable, "-m", "minigpt2", "serve", "--model", str(model_dir)]
    args += ["--tokenizer", "byte", "--port", port, "--threads", "1"]
    child = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert child.returncode == 2
    err = child.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: could not listen on"), err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="tgkill and /proc are Linux's")
def test_sigterm_caught_by_another_thread_still_ends_the_server(model_dir):
    """The kernel may hand a process's SIGTERM to any of its threads; Python then runs the
    handler only when the main thread next runs Python code. The idle engine's wait must
    come back to let it (a server once slept through a SIGTERM that way)."""
    import ctypes

    proc, url = start_server(model_dir, "--max-batch", "1")
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            assert http.post("/v1/completions", json={"prompt": "a", "max_tokens": 4}).is_success
        others = [int(t) for t in os.listdir(f"/proc/{proc.pid}/task") if int(t) != proc.pid]
        libc = ctypes.CDLL(None, use_errno=True)
        tgkill = 234 if os.uname().machine == "x86_64" else 131  # the syscall's number
        assert libc.syscall(tgkill, proc.pid, others[0], signal.SIGTERM) == 0
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
