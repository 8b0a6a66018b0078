"""Run many independent LLM requests or tasks at once.

`map_concurrent` answers a list and keeps its order; `as_finished` runs tasks on worker
threads, each with its own worker object (a teacher, a system: their evidence store
connection is per thread), and hands each result back as soon as it exists, so that a
caller can write it to disk before the slowest task of the batch is done.
`task_concurrency` decides how many tasks a model may serve at once: a server many, an
in-process engine one.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import TypeVar

from starrec.progress import progress

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
W = TypeVar("W")


def model_concurrency(model: object) -> int:
    """How many requests a backend serves usefully at once: a server says so in its
    config; an in-process model computes one generation at a time."""
    return max(1, int(getattr(model, "concurrency", 1)))


def serves_concurrently(model: object) -> bool:
    """Whether threads can keep several requests to `model` in flight: true of a server
    client; an in-process engine computes one generation at a time, and sharing it
    between threads is not safe."""
    return bool(getattr(model, "serves_concurrently", False))


def task_concurrency(model: object, requested: int) -> int:
    """Tasks to run at once on `model`: `requested` for a served model, else 1, with a
    log line saying why when more were asked for."""
    if requested > 1 and not serves_concurrently(model):
        log.info("concurrency %d asked for, but %s runs in process (one generation at a "
                 "time): running tasks one by one", requested, getattr(model, "name", model))
        return 1
    pool = getattr(model, "pool", None)
    endpoints = len(getattr(pool, "endpoints", ())) or 1
    if getattr(model, "guided", None) == "llamacpp" and requested > endpoints:
        log.warning("concurrency %d over %d llama.cpp endpoint(s): a llama.cpp server answers "
                    "one request at a time with one prompt cache, so tasks beyond one per "
                    "endpoint evict each other's prompts and every task runs slower (measured "
                    "4x slower at 2 tasks on one server: docs/llm-backends.md)",
                    requested, endpoints)
    return max(1, requested)


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


_DONE = object()  # a worker thread's last message


def as_finished(work: Callable[[W, T], R], make_worker: Callable[[], W], items: Sequence[T],
                concurrency: int) -> Iterator[tuple[T, R]]:
    """`(item, work(worker, item))` for every item, in the order they finish, computed on
    `concurrency` threads that each make their own worker with `make_worker` (on the
    thread that uses it).

    The first exception (from `work` or `make_worker`) stops the start of new items; the
    items in flight finish and are yielded, then it is raised, so nothing already paid
    for is lost. Leaving the loop early (Ctrl-C in the caller, `break`) also stops new
    items; the threads are daemons, so the items in flight are abandoned rather than
    waited for (minutes, for a teacher run), and their work is redone on resume."""
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    for item in items:
        jobs.put(item)
    results: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def run() -> None:
        try:
            worker = make_worker()
            while not stop.is_set():
                try:
                    item = jobs.get_nowait()
                except queue.Empty:
                    break
                try:
                    results.put((item, work(worker, item)))
                except BaseException as error:  # noqa: BLE001 - raised by the caller's thread
                    results.put(error)
                    break
        except BaseException as error:  # noqa: BLE001 - make_worker failed
            results.put(error)
        finally:
            results.put(_DONE)

    threads = min(concurrency, len(items))
    for number in range(threads):
        threading.Thread(target=run, daemon=True, name=f"task-{number}").start()
    error: BaseException | None = None
    running = threads
    try:
        while running:
            message = results.get()  # an untimed get still lets Ctrl-C through
            if message is _DONE:
                running -= 1
            elif isinstance(message, BaseException):
                stop.set()
                error = error or message
            else:
                yield message
    finally:
        stop.set()
    if error is not None:
        raise error
