"""A run's out_dir: one run at a time (a lock file naming its holder), and a finished run never
replaced by a fresh one unless asked (overwrite)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from ..errors import MiniGPT2Error
from ..formats.checkpoint import BEST, LATEST
from .config import TrainConfig
from .distributed import DistContext, all_gathered

LOCK = ".lock"
# What a run leaves in its out_dir; overwrite=true removes these before a fresh run starts, so no
# file of the old run (a best checkpoint, a loss plot) survives beside the new one's.
RUN_FILES = (LATEST, BEST, "config.toml", "metrics.jsonl", "loss.png")


def check_fresh(out_dir: Path, overwrite: bool) -> None:
    """Refuse a fresh run into out_dir when a run's checkpoint is already there."""
    found = [name for name in (LATEST, BEST) if (out_dir / name).is_file()]
    if found and not overwrite:
        raise MiniGPT2Error(
            f"{out_dir} already holds a run ({', '.join(found)}); continue it with "
            f"--init_from=resume, choose another --out_dir, or replace it with --overwrite=true"
        )


def clear_run(out_dir: Path) -> None:
    """Remove the files of an earlier run (overwrite=true), leaving anything else alone."""
    for name in RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            (out_dir / name).unlink()


def _describe(holder: dict) -> str:
    started = holder.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if started else "?"
    return f"process {holder.get('pid', '?')} on {holder.get('host', '?')} (since {when})"


class RunLock:
    """Exclusive use of out_dir by this process, held through an flock on out_dir/.lock: the
    kernel releases it when the holder dies, however it dies, so a PID that was reused since
    cannot fake a live holder. The file names the holder (host, PID, start) for the message a
    second run gets, and release removes it: a file found with a name in it is a dead run's."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK
        self.fd: int | None = None
        self.created_dir = False
        self.took_over: dict | None = None  # the stale holder's description, if any

    def acquire(self) -> RunLock:
        """Take the lock, or raise a one-line error naming the run that holds it."""
        try:
            self.created_dir = not self.out_dir.exists()
            self.out_dir.mkdir(parents=True, exist_ok=True)
            while self.fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as e:
                    os.close(fd)
                    if e.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    raise MiniGPT2Error(
                        f"{self.out_dir} is in use by another run ({_describe(self._holder())})"
                        f"; wait for it to finish or stop it, or choose another --out_dir"
                    ) from None
                # The holder before us may have removed the file between our open and our
                # lock: then we hold a lock on a name nobody sees. Try again on the new file.
                if os.path.exists(self.path) and os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    self.fd = fd
                else:
                    os.close(fd)
            self._claim()
        except OSError as e:
            self.release()
            raise MiniGPT2Error(
                f"cannot use {self.out_dir} as out_dir ({e.strerror or e}); choose a "
                "writable --out_dir"
            ) from None
        return self

    def _holder(self) -> dict:
        """The description in the lock file ({} when empty or unreadable)."""
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _claim(self) -> None:
        """Write this process's description; a description already there was a dead run's."""
        previous = self._holder()
        if previous:
            self.took_over = previous
            print(
                f"note: {self.out_dir} was locked by {_describe(previous)}, which is no longer "
                "running; taking the lock over",
                file=sys.stderr,
            )
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(me).encode(), 0)
        os.fsync(self.fd)

    def release(self) -> None:
        """Give the lock up (idempotent); an out_dir made only for the lock goes too."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(self.fd)
            self.fd = None
        if self.created_dir:
            with contextlib.suppress(OSError):
                self.out_dir.rmdir()  # only when empty: a run that wrote nothing
            self.created_dir = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def claim_out_dir(cfg: TrainConfig, dist: DistContext) -> RunLock:
    """Rank 0 takes out_dir's lock and makes sure a fresh run replaces no run there unless told
    to (overwrite); every rank hears the outcome, so all stop together on a refusal. Other
    ranks get a lock that holds nothing."""
    lock, error = RunLock(Path(cfg.out_dir)), None
    if dist.is_main:
        try:
            lock.acquire()
            if cfg.init_from != "resume":
                check_fresh(lock.out_dir, cfg.overwrite)
        except MiniGPT2Error as e:
            lock.release()
            error = str(e)
    error = all_gathered(error, dist)[0]
    if error:
        raise MiniGPT2Error(error)
    return lock
