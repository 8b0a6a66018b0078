"""Several server processes on one listening socket: `star serve --processes N`.

One Python process answers a ranker's requests on little more than one core: the HTTP
work and much of a ranker's own run under the GIL. With N processes accepting from the
same socket (the kernel hands each new connection to one of them), a ranker uses every
core. The service is loaded once, in the parent, and the workers are forked from it: they
share its memory pages (copy on write) and answer with the very same fitted models. Each
worker builds its own app after the fork (threads, queue, batcher, its own SQLite
connections: `EvidenceStore` reopens them in a forked child), so `max_queue` and
`workers` are per process. `/metrics`, from whichever process answers, reports all of
them (`Metrics.share`).

The parent only supervises: SIGTERM or SIGINT stops every worker gracefully (each
finishes its requests in flight); a worker that dies otherwise is replaced, unless
workers keep dying at start, which stops the service with an error.

LLM systems are not served this way: a process per model would hold the model N times
and the cores are the engine's already.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

log = logging.getLogger(__name__)

# a worker that exits within this many seconds of its start counts as failing to start
EARLY_EXIT_S = 10.0
MAX_EARLY_EXITS = 3


def serve_processes(make_app: Callable[[], Any], sock: socket.socket, processes: int, *,
                    log_level: str = "info") -> int:
    """Run `processes` workers, each `starrec.api.app.serve(make_app(), sock=sock)` in a
    forked child, until SIGTERM / SIGINT; returns the exit status (0 after a requested
    stop, 1 when workers kept failing at start). `make_app` runs in each child, after the
    fork."""
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    context = multiprocessing.get_context("fork")
    metrics_dir = tempfile.mkdtemp(prefix="star-metrics-")
    stopping = False
    early_exits = 0
    workers: list[Any] = []
    signalled: set[int] = set()  # workers already sent SIGTERM

    def terminate_all() -> None:
        for worker in workers:
            if worker.is_alive() and worker.pid not in signalled:
                signalled.add(worker.pid)
                os.kill(worker.pid, signal.SIGTERM)

    def start() -> Any:
        worker = context.Process(target=_worker, args=(make_app, sock, log_level, metrics_dir),
                                 name="star-serve-worker", daemon=False)
        worker.start()
        worker.started_at = time.monotonic()  # type: ignore[attr-defined]
        return worker

    def stop(signum: int, _frame: Any) -> None:
        nonlocal stopping
        if not stopping:
            log.info("stopping %d workers (signal %d)", len(workers), signum)
        stopping = True
        terminate_all()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    status = 0
    try:
        for _ in range(processes):
            if not stopping:
                workers.append(start())
        while True:
            alive = [w for w in workers if w.is_alive()]
            if stopping and not alive:
                break
            if stopping:  # one started while the signal was being handled
                terminate_all()
            if alive:
                wait([w.sentinel for w in alive], timeout=1.0)
            if stopping:
                continue
            for i, worker in enumerate(workers):
                if worker.is_alive():
                    continue
                worker.join()
                lived = time.monotonic() - worker.started_at
                early_exits = early_exits + 1 if lived < EARLY_EXIT_S else 0
                if early_exits >= MAX_EARLY_EXITS:
                    log.error("workers keep exiting at start (last status %s); stopping",
                              worker.exitcode)
                    status = 1
                    stop(signal.SIGTERM, None)
                    break
                log.warning("worker %d exited with status %s after %.0f s; starting another",
                            worker.pid, worker.exitcode, lived)
                workers[i] = start()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for worker in workers:
            worker.join()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return status


def _die_with_parent() -> None:
    """On Linux, have the kernel send SIGTERM to this worker when the parent dies (a
    supervisor killed with SIGKILL must not leave workers holding the port)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _worker(make_app: Callable[[], Any], sock: socket.socket, log_level: str,
            metrics_dir: str) -> None:
    from starrec.api.app import serve

    # the parent's handlers were inherited: the server installs its own, and until then
    # the defaults apply; a process group of its own keeps a terminal's Ctrl-C (sent to
    # the whole foreground group) to the parent, which passes on one SIGTERM, as a second
    # signal would make the server drop its requests in flight
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)
    os.setpgid(0, 0)
    _die_with_parent()
    app = make_app()
    app.state.metrics.share(metrics_dir)
    serve(app, sock=sock, log_level=log_level)
