"""Serving throughput and time to first token: `minigpt2 serve` against llama.cpp's
`llama-server`, side by side, same weights, same prompts, N concurrent clients.

    python benchmarks/bench_serve.py --llama-cpp BIN_DIR --tokenizer PATH/gpt2.tiktoken \
        [--clients 1,4,8,16] [--precisions float32,bfloat16,int8] [--new-tokens 128]

The full gpt2 shape with random weights saved by transformers; llama-server reads them as GGUF
files this project writes (`minigpt2 export ... .gguf`: f32, bf16, q8_0 for int8). Each
client sends its prompts (16 to 128 random token ids, as token lists, the same for both
servers) one after another through /v1/completions, streamed, greedy, `ignore_eos`, and
times its first token and its end. Per N: aggregate generated tokens per second (all tokens
over the wall time from the first request to the last end), median and 95th-percentile time
to first token. llama-server runs -np N slots (continuous batching, its default) of 256
tokens each, both servers 2 threads. Also each decoder alone for the N = 1 comparison:
`minigpt2 sample`'s rate (a Generator on the same model, the same way laid out, a 64-token
prompt) and llama-bench's (tg, when it is beside llama-server), and a request's rate at N = 1
against its own decoder's.
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
    """clients threads, each sending its share of prompts in turn; the figures of one N."""
    firsts: list[float] = []
    done: list[float] = []
    shares = [prompts[i::clients] for i in range(clients)]

    def client(share: list[list[int]]) -> None:
        for prompt in share:
            ttft, total, _ = one_request(url, prompt, n)
            firsts.append(ttft)
            done.append(total)

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(s,)) for s in shares]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    firsts.sort()
    return {
        "tok_s": len(prompts) * n / wall,
        "ttft_median": statistics.median(firsts),
        "ttft_p95": firsts[min(len(firsts) - 1, int(0.95 * len(firsts)))],
        "per_request": (n - 1)
        / statistics.median(d - f for d, f in zip(done, firsts, strict=True)),
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


def sample_rate(model_dir: Path, precision: str, prompt: list[int], n: int) -> float:
    """minigpt2 sample's decoding rate (tok/s after the first) on the same model."""
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
    rates = []
    for _ in range(2):
        steps = gen.stream([prompt], cfg)
        next(steps)
        t = time.perf_counter()
        count = sum(1 for _ in steps)
        rates.append(count / (time.perf_counter() - t))
    return max(rates)


def llama_bench_rate(bin_dir: Path, gguf: Path, n: int) -> float | None:
    """llama.cpp's own one-sequence decoding rate (llama-bench tg n, 2 threads) on gguf: what
    llama-server's requests at N = 1 are to be set against, as ours are against sample's."""
    binary = bin_dir / "llama-bench"
    if not binary.exists():
        return None
    cmd = [str(binary), "-m", str(gguf), "-t", "2", "-p", "0", "-n", str(n), "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(json.loads(out)[0]["avg_ts"])


def side_by_side(
    args, model_dir: Path, gguf: Path, precision: str, clients: int, prompts
) -> tuple[dict, str]:
    """One N: both servers started, warmed up and loaded in turn; their figures, and a line."""
    n = args.new_tokens
    engines = [("minigpt2", start_ours(model_dir, args.tokenizer, precision, clients, args.port))]
    if args.llama_cpp:
        binary = Path(args.llama_cpp) / "llama-server"
        engines.append(("llama-server", start_llama(binary, gguf, clients, args.port + 1)))
    results = {}
    try:
        for k, (_, proc) in enumerate(engines):
            url = f"http://127.0.0.1:{args.port + k}"
            wait_ready(url, proc)
            one_request(url, prompts[0][:16], 8)  # warm-up
        order = list(enumerate(engines))
        for k, (name, _) in order if clients % 2 else order[::-1]:  # alternate who starts
            results[name] = load(f"http://127.0.0.1:{args.port + k}", clients, prompts, n)
    finally:
        for _, proc in engines:
            proc.terminate()
            proc.wait(60)
    line = f"  N={clients:<2} ({len(prompts)} requests)"
    for name, r in results.items():
        line += f" | {name} {r['tok_s']:6.1f} tok/s, TTFT median {r['ttft_median']:.2f} s, "
        line += f"p95 {r['ttft_p95']:.2f} s, per request {r['per_request']:.1f} tok/s"
    if len(results) == 2:
        ratio = results["minigpt2"]["tok_s"] / results["llama-server"]["tok_s"]
        line += f" | throughput {ratio:.2f}x"
    return results, line


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
        alone = {"minigpt2": sample_rate(model_dir, precision, probe, n)}
        line = (
            f"\n{precision}: alone, minigpt2 sample {alone['minigpt2']:.1f} tok/s (64-token prompt)"
        )
        if args.llama_cpp and (rate := llama_bench_rate(Path(args.llama_cpp), gguf, n)):
            alone["llama-server"] = rate
            line += f", llama-bench tg{n} {rate:.1f} tok/s"
        print(line)
        for clients in counts:
            total = max(8, 2 * clients)
            lengths = [rng.randint(16, 128) for _ in range(total)]
            prompts = [[rng.randrange(50257) for _ in range(m)] for m in lengths]
            results, line = side_by_side(args, model_dir, gguf, precision, clients, prompts)
            if clients == 1:  # a request against its own decoder alone: what serving costs
                shares = [f"{k} {results[k]['per_request'] / v:.2f}x" for k, v in alone.items()]
                line += " | per request against alone: " + ", ".join(shares)
            print(line, flush=True)
    tmp.cleanup()


if __name__ == "__main__":
    main()
