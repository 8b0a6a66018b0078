"""Progress bars that stay readable in a terminal and in a log file."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
             enabled: bool = True, initial: int = 0) -> Iterator[T]:
    """A tqdm bar; redrawn at most every 10 s when stderr is not a terminal, so a log of a
    long background run keeps a few lines with the ETA instead of thousands."""
    interactive = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not enabled,
                initial=initial, mininterval=0.1 if interactive else 10.0, dynamic_ncols=True)


def progress_bar(desc: str, total: int | None = None, unit: str = "it", enabled: bool = True,
                 initial: int = 0) -> tqdm:
    """A bar advanced by hand (`update`, `set_postfix`), for loops that run elsewhere (a
    trainer's callbacks), redrawn like `progress`."""
    return progress((), desc, total=total, unit=unit, enabled=enabled, initial=initial)  # type: ignore[return-value]
