"""How the service runs admitted requests: admission control (503), a per-request
timeout (504), and worker threads, either one request per job (`BoundedRunner`) or
requests gathered into batches (`BatchRunner`, micro-batching).

Both count a request from its admission until its worker is done with it, also after
its request timed out (a thread cannot be stopped): the bound is on work really in the
system, so a stream of timeouts cannot pile up unbounded work behind the worker. A
request still waiting when it times out is cancelled and frees its slot at once.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")
I = TypeVar("I")  # noqa: E741 - an item of a batch
R = TypeVar("R")


class ApiError(Exception):
    """An error answered as an `ErrorResponse` with this status."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


class Overloaded(ApiError):
    def __init__(self, in_flight: int, retry_after: int) -> None:
        super().__init__(503, "overloaded",
                         f"the service is at capacity ({in_flight} requests in flight); retry "
                         f"after {retry_after} s", {"Retry-After": str(retry_after)})


class TimedOut(ApiError):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(504, "timeout", f"no answer within {timeout_s:g} s")


class ShuttingDown(ApiError):
    def __init__(self) -> None:
        super().__init__(503, "shutting_down", "the service is shutting down", {"Retry-After": "1"})


class _Slots:
    """Admission: at most `max_queue` requests in flight (running or waiting)."""

    def __init__(self, workers: int, max_queue: int, timeout_s: float) -> None:
        self.workers = workers
        self.max_queue = max_queue
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self.admitted = 0
        self.running = 0
        self._mean_s: float | None = None  # moving average of one request's run time

    @property
    def queue_depth(self) -> int:
        """Admitted requests waiting for a worker (not those being answered)."""
        with self._lock:
            return max(0, self.admitted - self.running)

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: the waiting work over the workers."""
        mean = self._mean_s if self._mean_s is not None else 1.0
        return max(1, min(3600, math.ceil(mean * (self.admitted + 1) / self.workers)))

    def _admit(self) -> None:
        with self._lock:
            if self.admitted >= self.max_queue:
                raise Overloaded(self.admitted, self.retry_after())
            self.admitted += 1

    def _release(self, _: Future | None = None) -> None:
        with self._lock:
            self.admitted -= 1

    def _started(self, n: int) -> None:
        with self._lock:
            self.running += n

    def _finished(self, n: int, seconds_each: float) -> None:
        with self._lock:
            self.running -= n
            previous = self._mean_s
            self._mean_s = (seconds_each if previous is None
                            else 0.8 * previous + 0.2 * seconds_each)

    async def _wait(self, future: Future[T]) -> T:
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except asyncio.TimeoutError:
            future.cancel()  # only takes effect if it is still waiting
            raise TimedOut(self.timeout_s) from None


class BoundedRunner(_Slots):
    """Runs one job per request in `workers` threads, with admission control and a
    timeout."""

    def __init__(self, workers: int, max_queue: int, timeout_s: float) -> None:
        super().__init__(workers, max_queue, timeout_s)
        self.executor = ThreadPoolExecutor(workers, thread_name_prefix="star-worker")

    async def run(self, job: Callable[[], T]) -> tuple[T, float]:
        """(job's result, seconds it waited for a worker); Overloaded or TimedOut."""
        self._admit()
        submitted = time.perf_counter()
        waited: list[float] = []

        def work() -> T:
            started = time.perf_counter()
            waited.append(started - submitted)
            self._started(1)
            try:
                return job()
            finally:
                self._finished(1, time.perf_counter() - started)

        try:
            future = self.executor.submit(work)
        except RuntimeError:  # shut down: the server is stopping
            self._release()
            raise ShuttingDown() from None
        future.add_done_callback(self._release)
        result = await self._wait(future)
        return result, (waited[0] if waited else 0.0)

    def shutdown(self) -> None:
        """Cancel waiting jobs, wait for the running ones."""
        self.executor.shutdown(wait=True, cancel_futures=True)


@dataclass
class _Pending(Generic[I, R]):
    item: I
    submitted: float
    future: Future[R] = field(default_factory=Future)
    waited: float = 0.0


@dataclass(frozen=True)
class Batch:
    """What a batch handler is told about the batch it answers."""

    size: int
    waited_s: tuple[float, ...]  # each item's wait for the batch to start


class BatchRunner(_Slots, Generic[I, R]):
    """Micro-batching: admitted requests wait in one queue; a worker thread takes the
    first, gathers more while they come (up to `max_batch_size`, for at most `max_wait_s`
    after the first arrived), and answers them in one call of `handle`, which returns
    each item's result or exception in order. Each request still gets its own answer,
    error and timeout.

    A worker waits for more only while `arriving()` says requests are on their way in
    (received, not yet admitted): a request alone is answered at once, and under load
    batches also form without waiting, from the requests that queued while the
    previous batch ran. `workers` threads gather and answer batches side by side (one
    for an engine that is not thread-safe)."""

    def __init__(self, handle: Callable[[list[I], Batch], Sequence[R | BaseException]], *,
                 max_queue: int, timeout_s: float, max_batch_size: int, max_wait_s: float,
                 workers: int = 1, arriving: Callable[[], int] | None = None,
                 on_batch: Callable[[int], None] | None = None) -> None:
        super().__init__(workers, max_queue, timeout_s)
        if max_batch_size < 1 or max_wait_s < 0 or workers < 1:
            raise ValueError("max_batch_size and workers must be >= 1, max_wait_s >= 0")
        self.handle = handle
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.arriving = arriving or (lambda: 0)
        self.on_batch = on_batch
        self._queue: deque[_Pending[I, R]] = deque()
        mutex = threading.Lock()
        self._ready = threading.Condition(mutex)  # a request waits for an idle worker
        self._full = threading.Condition(mutex)  # a batch being gathered is full
        self._closed = False
        self.batches = 0
        self.batched_items = 0
        self.largest_batch = 0
        self._threads: list[threading.Thread] = []  # started by the first request

    def _start(self) -> None:
        # under self._ready
        if not self._threads:
            self._threads = [threading.Thread(target=self._loop, name=f"star-batcher-{i}",
                                              daemon=True) for i in range(self.workers)]
            for thread in self._threads:
                thread.start()

    async def run(self, item: I) -> tuple[R, float]:
        """(item's result, seconds it waited for its batch to start); Overloaded,
        TimedOut, or the exception `handle` gave for this item."""
        self._admit()
        pending: _Pending[I, R] = _Pending(item, time.perf_counter())
        pending.future.add_done_callback(self._release)
        with self._ready:
            if self._closed:
                pending.future.cancel()
                raise ShuttingDown()
            self._start()
            self._queue.append(pending)
            self._ready.notify()
            if len(self._queue) >= self.max_batch_size - 1:
                self._full.notify_all()
        result = await self._wait(pending.future)
        return result, pending.waited

    def _gather(self) -> list[_Pending[I, R]] | None:
        """The next batch (None: closed). The worker takes the first waiting request,
        then sleeps until the batch is full or the wait is over: one wake-up per batch,
        not one per request (each costs the worker a turn at the GIL)."""
        with self._ready:
            while not self._queue and not self._closed:
                self._ready.wait()
            if self._closed:
                return None
            first = self._queue.popleft()
            deadline = first.submitted + self.max_wait_s
            while (len(self._queue) < self.max_batch_size - 1 and not self._closed
                   and self.arriving() > 0):
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                self._full.wait(remaining)
            taken = min(len(self._queue), self.max_batch_size - 1)
            return [first, *(self._queue.popleft() for _ in range(taken))]

    def _loop(self) -> None:
        while True:
            batch = self._gather()
            if batch is None:
                return
            live = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if not live:
                continue
            started = time.perf_counter()
            for p in live:
                p.waited = started - p.submitted
            self._started(len(live))
            try:
                results = list(self.handle([p.item for p in live],
                                           Batch(len(live), tuple(p.waited for p in live))))
                if len(results) != len(live):
                    raise RuntimeError(f"a batch of {len(live)} got {len(results)} results")
            except BaseException as error:  # noqa: BLE001 - every request of it gets the error
                results = [error] * len(live)
            finally:
                self._finished(len(live), (time.perf_counter() - started) / len(live))
            with self._lock:
                self.batches += 1
                self.batched_items += len(live)
                self.largest_batch = max(self.largest_batch, len(live))
            if self.on_batch is not None:
                self.on_batch(len(live))
            for p, result in zip(live, results):
                if isinstance(result, BaseException):
                    p.future.set_exception(result)
                else:
                    p.future.set_result(result)

    def shutdown(self) -> None:
        """Cancel waiting requests, let the running batch finish."""
        with self._ready:
            self._closed = True
            waiting = list(self._queue)
            self._queue.clear()
            self._ready.notify_all()
            self._full.notify_all()
        for p in waiting:
            p.future.cancel()
        for thread in self._threads:
            thread.join()
