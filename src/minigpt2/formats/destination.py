"""Where an export goes: nothing there is replaced unless asked, and a directory is replaced
whole (written beside it, then renamed into place), so no file of the old one survives."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ..errors import MiniGPT2Error
from .checkpoint import usual_mode

T = TypeVar("T")


def check_destination(dest: Path, overwrite: bool, directory: bool) -> None:
    """Refuse dest when something is there (an empty directory loses nothing) and overwrite is
    off, or when it is a file where a directory goes, or the other way round."""
    dest = Path(dest)
    if not dest.exists() and not dest.is_symlink():
        return
    if directory and dest.is_dir() and not any(dest.iterdir()):
        return
    if directory != dest.is_dir():
        want, found = ("a directory", "a file") if directory else ("a file", "a directory")
        raise MiniGPT2Error(f"{dest} is {found} and this export writes {want}; choose another")
    if not overwrite:
        raise MiniGPT2Error(
            f"{dest} already exists; pass --overwrite to replace it whole, or choose another "
            "destination"
        )


def replace_dir(dest: Path, write: Callable[[Path], T]) -> T:
    """write(folder) fills a new folder beside dest, which then takes dest's place; on any
    failure (a full disk, say) dest is left as it was and the new folder removed."""
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        new = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".new"))
    except OSError as e:
        raise MiniGPT2Error(
            f"cannot write {dest} ({e.strerror or e}); choose a writable destination"
        ) from None
    try:
        result = write(new)
        os.chmod(new, usual_mode(0o777))  # mkdtemp makes 0700
        _swap_in(new, dest)
        return result
    except MiniGPT2Error as e:  # write_atomic's message names the file in the new folder
        raise MiniGPT2Error(str(e).replace(str(new), str(dest))) from None
    except OSError as e:
        raise MiniGPT2Error(
            f"could not write {dest} ({e.strerror or e}); what was there is unchanged"
        ) from None
    finally:
        shutil.rmtree(new, ignore_errors=True)


def _swap_in(new: Path, dest: Path) -> None:
    """Rename new to dest; an existing dest is moved aside first and removed after."""
    if not dest.exists():
        os.rename(new, dest)
        return
    old = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".old"))
    os.rmdir(old)  # a free name beside dest
    os.rename(dest, old)
    try:
        os.rename(new, dest)
    except OSError:
        with contextlib.suppress(OSError):
            os.rename(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)
