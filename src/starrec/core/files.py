"""Files that several processes may write at once (two `star eval` runs, a server and a
benchmark, sharing one cache): each writer fills a temporary file of its own and moves it
into place, and a cached artefact is built under a lock, so the second process waits and
then reuses the first one's instead of colliding with it."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock, the private temporary files still keep writes apart
    fcntl = None  # type: ignore[assignment]


def private_temp(path: Path) -> Path:
    """A temporary name beside `path` that no other writer uses (this process, a random
    part for its threads); moving it onto `path` is atomic."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def write_text_atomic(path: Path, text: str) -> None:
    """`path` holds `text`, or what it held before: never a part of either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = private_temp(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def building(path: Path) -> Iterator[None]:
    """Held by one process at a time for `path` (an advisory lock on `.NAME.lock` beside
    it, released when the block ends or the process dies): check for the artefact and
    build it inside the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    lock = path.with_name(f".{path.name}.lock")
    with open(lock, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
