"""Files only their owner may read (keys, passwords): created once, whole, mode 0600."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def create_once(path: Path, make: Callable[[], bytes]) -> bytes:
    """The file's content, creating it with `make()` when absent. Written whole to a temporary
    file (0600), synced, then linked into place: a concurrent reader sees no file or all of it,
    never an empty one; when two create it at once, the first link wins and both get its content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        return path.read_bytes()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(make())
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        else:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the new name survives a crash too
            finally:
                os.close(dir_fd)
    finally:
        os.unlink(tmp)
    return path.read_bytes()
