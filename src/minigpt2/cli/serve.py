"""`minigpt2 serve --model M`: the model kept loaded behind OpenAI's HTTP API, with continuous
batching, streaming and a chat page at /."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from ..errors import MiniGPT2Error
from .options import add_model_options, load_for_generation

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def parser() -> argparse.ArgumentParser:
    """The command's options."""
    p = argparse.ArgumentParser(
        prog="minigpt2 serve",
        description="Serve a GPT-2 over OpenAI's HTTP API (completions, chat), with a chat page.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_model_options(p, "out/quickstart")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="sequences that may wait (then 503)")
    p.add_argument("--max-body", type=int, default=1 << 20, help="bytes a request body may hold")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1")
    p.add_argument("--name", default=None, help="the model's id in replies (default: --model)")
    return p


def _need_serve_extra() -> None:
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise MiniGPT2Error(
            f"minigpt2 serve needs {' and '.join(missing)}: pip install 'minigpt2[serve]'"
        )


def serve_main(argv: list[str]) -> int:
    """Load the model, start the engine, serve until SIGINT or SIGTERM; exit 0."""
    args = parser().parse_args(argv)
    _need_serve_extra()
    for name in ("max_batch", "max_queue", "max_body"):
        if getattr(args, name) < 1:
            raise MiniGPT2Error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if not 0 <= args.port < 65536:
        raise MiniGPT2Error(f"--port={args.port} is no port; use 0 to 65535")
    # imported here: fastapi and uvicorn are an optional extra, checked above
    import uvicorn

    from ..serve.app import Served, create_app
    from ..serve.engine import Engine
    from ..serve.server import serve

    model, header, tok = load_for_generation(args, sequences=1)
    engine = Engine(model, tok.vocab_size, args.max_batch, args.max_queue, own_thread=False)
    name = args.name or Path(args.model).name or args.model
    fmt = (header or {}).get("data_format", "text")
    served = Served(engine, tok, fmt, name, args.api_key, args.max_body)
    if args.host not in LOCAL_HOSTS and not args.api_key:
        print(
            f"warning: listening on {args.host} without --api-key: anyone who can reach it "
            "can use the model",
            file=sys.stderr,
        )
    config = uvicorn.Config(
        create_app(served), host=args.host, port=args.port, log_level="warning",
        timeout_graceful_shutdown=10,
    )  # fmt: skip
    serve(config, engine)
    return 0
