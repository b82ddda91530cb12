"""Serving throughput and time to first token: `minigpt2 serve` against llama.cpp's
`llama-server`, side by side, same weights, same prompts, N concurrent clients.

    python benchmarks/bench_serve.py --llama-cpp BIN_DIR --tokenizer PATH/gpt2.tiktoken \
        [--clients 1,4,8,16] [--precisions float32,bfloat16,int8] [--new-tokens 128]

The full gpt2 shape with random weights saved by transformers; llama-server reads them as GGUF
files this project writes (`minigpt2 export ... .gguf`: f32, bf16, q8_0 for int8). Each
client sends its prompts (16 to 128 random token ids, as token lists, the same for both
servers) one after another through /v1/completions, streamed, greedy, `ignore_eos`, and
times its first token and its end. Both servers run at once, idle but for their turns: the
prompts go in up to 4 rounds, the servers taking turns (A B, B A, ...), so the machine's
drift (20-25% within minutes) reaches both alike. Per N: aggregate generated tokens per
second (all tokens over the rounds' wall time), median and 95th-percentile time to first
token, a request's rate after its first token. llama-server runs -np N slots (continuous
batching, its default) of 256 tokens each, both servers 2 threads. At N = 1 each decoder
alone is timed once a round as well: `minigpt2 sample` (a Generator on the same model, the
same way laid out, a 64-token prompt) and llama-bench (tg, when it is beside llama-server);
a request's rate is set against its own decoder's.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import httpx
import torch

PRECISIONS = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0"}
JSON_HEADERS = {"Content-Type": "application/json"}
ROUNDS = 4  # turns each server takes at an N (at most; each round at least one prompt a client)


def wait_ready(url: str, proc: subprocess.Popen, seconds: float = 300) -> None:
    """Until GET /health answers 200 (llama-server: once its model is loaded)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("the server did not start")


def one_request(url: str, prompt: list[int], n: int) -> tuple[float, float, int]:
    """(seconds to the first token, seconds to the end, tokens) of one streamed completion.
    Through the standard library's http.client, not httpx: the client shares the 2 cores with
    the server, and httpx took 0.26 ms of CPU a token against 0.08 (int8, one client), which
    the server's step lost to it."""
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True}
    body |= {"ignore_eos": True, "model": "m"}
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    start, first, pieces, finish = time.perf_counter(), None, 0, None
    connection.request("POST", "/v1/completions", json.dumps(body), JSON_HEADERS)
    response = connection.getresponse()
    if response.status != 200:
        raise SystemExit(f"the server answered {response.status}: {response.read()[:500]!r}")
    pending = b""
    while data := response.read1(1 << 16):  # server-sent events: "data: {...}\n\n"
        *events, pending = (pending + data).split(b"\n\n")
        for event in events:
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            choice = (json.loads(event[6:]).get("choices") or [{}])[0]
            if choice.get("text"):
                first = first or time.perf_counter()
                pieces += 1
            finish = choice.get("finish_reason") or finish
    connection.close()
    if finish != "length":  # every request must make its n tokens, or the rates mean nothing
        raise SystemExit(f"a request ended with finish_reason {finish!r}, not length")
    return first - start, time.perf_counter() - start, pieces


def load(url: str, clients: int, prompts: list[list[int]], n: int) -> dict:
    """clients threads, each sending its share of prompts in turn: each request's time to its
    first token and from there to its end, the wall time, the tokens made."""
    firsts: list[float] = []
    spans: list[float] = []
    shares = [prompts[i::clients] for i in range(clients)]

    def client(share: list[list[int]]) -> None:
        for prompt in share:
            ttft, total, _ = one_request(url, prompt, n)
            firsts.append(ttft)
            spans.append(total - ttft)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(s,)) for s in shares]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"firsts": firsts, "spans": spans, "wall": wall, "tokens": len(prompts) * n}


def summary(parts: list[dict], n: int) -> dict:
    """One server's figures over its rounds: aggregate tok/s (all tokens over the rounds' wall
    time), TTFT median and 95th percentile, a request's rate after its first token (median)."""
    firsts = sorted(f for part in parts for f in part["firsts"])
    spans = [s for part in parts for s in part["spans"]]
    return {
        "tok_s": sum(p["tokens"] for p in parts) / sum(p["wall"] for p in parts),
        "ttft_median": statistics.median(firsts),
        "ttft_p95": firsts[min(len(firsts) - 1, int(0.95 * len(firsts)))],
        "per_request": (n - 1) / statistics.median(spans),
    }


def start_ours(model: Path, tokenizer: str, precision: str, slots: int, port: int):
    knobs = {"float32": [], "bfloat16": ["--dtype", "bfloat16"], "int8": ["--quantize", "int8"]}
    cmd = [sys.executable, "-m", "minigpt2", "serve", "--model", str(model), "--tokenizer"]
    cmd += [tokenizer, "--port", str(port), "--threads", "2", "--max-batch", str(slots)]
    return subprocess.Popen(
        cmd + knobs[precision], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def start_llama(binary: Path, gguf: Path, slots: int, port: int):
    cmd = [str(binary), "-m", str(gguf), "-np", str(slots), "-c", str(256 * slots), "-t", "2"]
    cmd += ["-tb", "2", "--port", str(port), "--host", "127.0.0.1", "--log-disable"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def sample_timer(model_dir: Path, precision: str, prompt: list[int], n: int):
    """A function timing `minigpt2 sample`'s decoding rate once (tok/s after the first token)
    on the same model, loaded once here."""
    from minigpt2.decode.generate import Generator, SamplingConfig
    from minigpt2.decode.kernels import layout_for_inference
    from minigpt2.decode.quantize import quantize_for_decoding
    from minigpt2.formats.loading import load_any

    model, _ = load_any(str(model_dir))
    model.eval()
    if precision == "int8":
        model = quantize_for_decoding(model, "int8")
    else:
        model = layout_for_inference(model.to(getattr(torch, precision)), sequences=1)
    gen = Generator(model)
    cfg = SamplingConfig(max_new_tokens=n, greedy=True)
    gen.generate([prompt], SamplingConfig(max_new_tokens=4, greedy=True))

    def rate() -> float:
        steps = gen.stream([prompt], cfg)
        next(steps)
        t = time.perf_counter()
        count = sum(1 for _ in steps)
        return count / (time.perf_counter() - t)

    return rate


def llama_bench_timer(bin_dir: Path, gguf: Path, n: int):
    """A function timing llama.cpp's own one-sequence decoding rate once (llama-bench tg n, 2
    threads) on gguf: what llama-server's requests at N = 1 are set against, as ours are
    against sample's; None without llama-bench."""
    binary = bin_dir / "llama-bench"
    if not binary.exists():
        return None
    cmd = [str(binary), "-m", str(gguf), "-t", "2", "-p", "0", "-n", str(n), "-r", "1"]

    def rate() -> float:
        out = subprocess.run([*cmd, "-o", "json"], capture_output=True, text=True, check=True)
        return float(json.loads(out.stdout)[0]["avg_ts"])

    return rate


def side_by_side(
    args, model_dir: Path, gguf: Path, precision: str, clients: int, prompts, alone: dict
) -> str:
    """One N: both servers started and warmed up, then the prompts in rounds, the servers
    taking turns (A B, B A, A B, ...: the machine's drift reaches both alike); at N = 1 each
    decoder alone (alone: name -> timer) once a round too. A line of figures."""
    n = args.new_tokens
    engines = {"minigpt2": start_ours(model_dir, args.tokenizer, precision, clients, args.port)}
    if args.llama_cpp:
        binary = Path(args.llama_cpp) / "llama-server"
        engines["llama-server"] = start_llama(binary, gguf, clients, args.port + 1)
    urls = {name: f"http://127.0.0.1:{args.port + k}" for k, name in enumerate(engines)}
    rounds = max(1, min(ROUNDS, len(prompts) // clients))
    size = len(prompts) // rounds
    parts: dict[str, list] = {name: [] for name in engines}
    rates: dict[str, list] = {name: [] for name in alone} if clients == 1 else {}
    try:
        for name, proc in engines.items():
            wait_ready(urls[name], proc)
            one_request(urls[name], prompts[0][:16], 8)  # warm-up
        for r in range(rounds):
            group = prompts[r * size : (r + 1) * size]
            for name in list(engines) if r % 2 == 0 else list(engines)[::-1]:
                parts[name].append(load(urls[name], clients, group, n))
            for name in rates:
                rates[name].append(alone[name]())
    finally:
        for proc in engines.values():
            proc.terminate()
            proc.wait(60)
    results = {name: summary(p, n) for name, p in parts.items()}
    line = f"  N={clients:<2} ({len(prompts)} requests, {rounds} rounds)"
    for name, r in results.items():
        line += f" | {name} {r['tok_s']:6.1f} tok/s, TTFT median {r['ttft_median']:.3f} s, "
        line += f"p95 {r['ttft_p95']:.3f} s, per request {r['per_request']:.1f} tok/s"
    if len(results) == 2:
        ratio = results["minigpt2"]["tok_s"] / results["llama-server"]["tok_s"]
        line += f" | throughput {ratio:.2f}x"
    if rates:  # a request against its own decoder alone, in the same rounds
        shares = []
        for name, values in rates.items():
            rate = statistics.median(values)
            shares.append(f"{name} {results[name]['per_request'] / rate:.2f}x of {rate:.1f}")
        line += " | a request against its decoder alone (tok/s): " + ", ".join(shares)
    return line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--llama-cpp", default=None, help="directory holding llama-server")
    p.add_argument("--tokenizer", required=True, help="gpt2.tiktoken")
    p.add_argument("--clients", default="1,4,8,16")
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--port", type=int, default=8765)
    args = p.parse_args()
    import transformers

    from minigpt2 import GPT
    from minigpt2.data.tokenizer import get_tokenizer
    from minigpt2.formats.gguf import write_gguf

    torch.manual_seed(0)
    tmp = tempfile.TemporaryDirectory()
    model_dir = Path(tmp.name) / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(model_dir)
    rng = random.Random(0)
    counts = [int(c) for c in args.clients.split(",")]
    n = args.new_tokens
    print(f"gpt2 shape, random weights; prompts of 16-128 token ids, {n} new greedy tokens; "
          f"2 threads each; torch {torch.__version__}; {os.cpu_count()} CPUs")  # fmt: skip
    for precision in args.precisions.split(","):
        gguf = Path(tmp.name) / f"gpt2-{PRECISIONS[precision]}.gguf"
        if args.llama_cpp:
            source = GPT.from_pretrained(str(model_dir))
            write_gguf(source, gguf, get_tokenizer(args.tokenizer), PRECISIONS[precision])
        probe = [rng.randrange(50257) for _ in range(64)]
        alone = {"minigpt2": sample_timer(model_dir, precision, probe, n)}
        if args.llama_cpp and (timer := llama_bench_timer(Path(args.llama_cpp), gguf, n)):
            alone["llama-server"] = timer
        print(f"\n{precision}:")
        for clients in counts:
            total = max(8, 2 * clients)
            lengths = [rng.randint(16, 128) for _ in range(total)]
            prompts = [[rng.randrange(50257) for _ in range(m)] for m in lengths]
            line = side_by_side(args, model_dir, gguf, precision, clients, prompts, alone)
            print(line, flush=True)
        del alone  # the sample model's memory
    tmp.cleanup()


if __name__ == "__main__":
    main()
