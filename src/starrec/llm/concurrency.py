"""Run many independent LLM requests at once, results in input order."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TypeVar

from starrec.progress import progress

T = TypeVar("T")
R = TypeVar("R")


def model_concurrency(model: object) -> int:
    """How many requests a backend serves usefully at once: a server says so in its
    config; an in-process model computes one generation at a time."""
    return max(1, int(getattr(model, "concurrency", 1)))


def map_concurrent(fn: Callable[[T], R], items: Iterable[T], concurrency: int,
                   desc: str | None = None) -> list[R]:
    """`[fn(x) for x in items]` on `concurrency` threads (requests wait on the network, not
    the GIL). The first exception is raised after the others finished, so nothing already
    paid for is lost by the caller's own bookkeeping in `fn`."""
    items = list(items)
    if concurrency <= 1:
        return [fn(x) for x in progress(items, desc or "requests", enabled=desc is not None)]
    results: list[R | None] = [None] * len(items)
    error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = {pool.submit(fn, x): i for i, x in enumerate(items)}
        for future in progress(as_completed(futures), desc or "requests", total=len(items),
                               enabled=desc is not None):
            try:
                results[futures[future]] = future.result()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, once all are done
                error = error or exc
    if error is not None:
        raise error
    return results  # type: ignore[return-value]
