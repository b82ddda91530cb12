"""uvicorn's server for the app, beside the engine: the engine's loop in the main thread,
HTTP in a thread of its own; SIGINT and SIGTERM end both cleanly."""

from __future__ import annotations

import signal
import socket
import threading

import uvicorn

from ..errors import MiniGPT2Error
from .engine import SIGNAL_CHECK, Engine


class Server(uvicorn.Server):
    """uvicorn's server, stopped by stop() rather than by signals of its own (it runs outside
    the main thread, where Python delivers signals)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                print(f"minigpt2 serve: listening on http://{host}:{port}", flush=True)
        self.ready.set()


def _bound(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (uvicorn listens on it), or the one-line error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise MiniGPT2Error(
            f"could not listen on {host}:{port}: {e.strerror}; choose another --host or --port"
        ) from None
    return sock


def serve(config: uvicorn.Config, engine: Engine) -> None:
    """Serve until SIGINT or SIGTERM: then take no more requests, end the running ones (each
    stream gets its last chunk, finish_reason "abort") so that their connections close, and
    return (exit 0, where uvicorn alone would raise the signal again)."""
    server = Server(config)
    sock = _bound(config.host, config.port)  # before any thread starts: a taken port is one line

    def http_side() -> None:
        try:
            server.run(sockets=[sock])
        finally:  # ended (stopped, or never started): the engine ends with it
            engine.shutdown(wait=False)

    http = threading.Thread(target=http_side, name="minigpt2-http", daemon=True)

    def stop(sig: int, frame) -> None:
        engine.shutdown(wait=False)
        if server.should_exit and sig == signal.SIGINT:
            server.force_exit = True  # a second Ctrl-C: stop now
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        http.start()
        engine.run()  # until stop(), or until the HTTP side ends
        while http.is_alive():  # with a timeout: a second Ctrl-C must still reach stop()
            http.join(SIGNAL_CHECK)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.ready.is_set():
        raise MiniGPT2Error(f"the HTTP server on {config.host}:{config.port} did not start")
