"""Append-only, resumable trajectory files: one `TeacherRun` per JSON line.

Each record is flushed and fsynced as it is written, so a crash loses at most the run
in flight. On open, the existing lines tell which (task_id, sample) keys are done; a
truncated last line (a crash mid-write) is cut off and its run redone. A lock file
keeps a second writer off the same file. A key may appear more than once (errors
retried with `retry_errors`, or `star eval --system mars` appending to a teach file):
the last line of a key is its current record (`read_runs`).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from starrec.core import Task
from starrec.llm.concurrency import as_finished
from starrec.progress import progress as progress_bar
from starrec.trajectories.schema import TeacherRun

log = logging.getLogger(__name__)


class TrajectoryFileError(RuntimeError):
    """A trajectory file that cannot be written: locked by another process, or corrupt."""


def _key(task_id: str, sample: int) -> str:
    return f"{task_id}#{sample}"


def _scan(path: Path) -> tuple[list[dict], int, bool]:
    """Records of a trajectory file, the byte length of its intact part, and whether a
    damaged last line was found. A damaged line elsewhere is corruption, not a crash."""
    records: list[dict] = []
    good = 0
    with path.open("rb") as handle:
        lines = handle.readlines()
    for number, raw in enumerate(lines, start=1):
        last = number == len(lines)
        if not raw.strip():
            good += len(raw)
            continue
        try:
            if not raw.endswith(b"\n"):
                raise ValueError("no line end")
            records.append(json.loads(raw))
        except ValueError as error:
            if last:
                return records, good, True
            raise TrajectoryFileError(f"{path}:{number}: not a trajectory record ({error}); "
                                      "only the last line may be damaged by a crash") from None
        good += len(raw)
    return records, good, False


def read_runs(path: str | Path) -> list[TeacherRun]:
    """The current record of every key, in first-seen order; a damaged last line is
    skipped (read-only: the file is not repaired)."""
    records, _, _ = _scan(Path(path))
    latest: dict[str, dict] = {}
    for record in records:
        latest[_key(record["task_id"], record.get("sample", 0))] = record
    return [TeacherRun.from_dict(r) for r in latest.values()]


class TrajectoryWriter:
    """Open with `with TrajectoryWriter(path) as writer:`; `done` maps each recorded key
    to its status ("ok" or "error")."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.done: dict[str, str] = {}
        self._handle = None
        self._lock_fd: int | None = None
        self._mutex = threading.Lock()

    def __enter__(self) -> TrajectoryWriter:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _acquire(self) -> None:
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise TrajectoryFileError(
                    f"{self.path} is being written by another process (pid {holder}; lock "
                    f"{self.lock_path}); wait for it or write to another file") from None
            # the previous holder may have removed the lock file between our open and
            # flock: then we hold a lock nobody else can see, so start over
            try:
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, str(os.getpid()).encode())
                self._lock_fd = fd
                return
            os.close(fd)

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._acquire()
        try:
            if self.path.exists():
                records, good, damaged = _scan(self.path)
                if damaged:
                    log.warning("%s: dropping a damaged last line (crash mid-write); its run "
                                "is redone", self.path)
                    os.truncate(self.path, good)
                for record in records:
                    self.done[_key(record["task_id"], record.get("sample", 0))] = record.get("status", "ok")
            self._handle = self.path.open("a", encoding="utf-8")
        except BaseException:
            self._release()
            raise

    def append(self, run: TeacherRun) -> None:
        """Write one run durably (thread-safe)."""
        line = run.to_json() + "\n"
        with self._mutex:
            if self._handle is None:
                raise TrajectoryFileError(f"{self.path} is not open for writing")
            self._handle.write(line)
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self.done[run.key] = run.status

    def _release(self) -> None:
        if self._lock_fd is not None:
            self.lock_path.unlink(missing_ok=True)
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    def close(self) -> None:
        with self._mutex:
            if self._handle is not None:
                self._handle.close()
                self._handle = None
            self._release()


class Teacher(Protocol):
    def run(self, task: Task, sample: int = 0, seed: int | None = None) -> TeacherRun: ...


@dataclass
class TeachSummary:
    total: int  # keys asked for (tasks x samples)
    done_before: int  # already in the file
    written: int  # written by this call
    errors: int  # written with status "error"
    fallbacks: int  # written with a fallback ranking
    interrupted: bool
    seconds: float
    model: str = ""  # the teacher model's name, set by the caller that loaded it


def _work(tasks: Sequence[Task], samples: int, done: dict[str, str],
          retry_errors: bool) -> tuple[list[tuple[Task, int]], int]:
    todo, finished, seen = [], 0, set()
    for task in tasks:
        for sample in range(samples):
            key = _key(task.task_id, sample)
            if key in seen:
                continue
            seen.add(key)
            status = done.get(key)
            if status is None or (retry_errors and status != "ok"):
                todo.append((task, sample))
            else:
                finished += 1
    return todo, finished


def run_teacher(
    teacher_factory: Callable[[], Teacher],
    tasks: Sequence[Task],
    out: str | Path,
    samples: int = 1,
    concurrency: int = 1,
    retry_errors: bool = False,
    progress: bool = True,
) -> TeachSummary:
    """Run every (task, sample) not yet in `out` and append its record. Ctrl-C stops
    cleanly: what was written stays, nothing is written twice, and the same call later
    resumes. `concurrency` > 1 runs that many teachers in threads (for HTTP backends); when
    one raises, the runs in flight are finished and written before the error is raised."""
    if samples < 1 or concurrency < 1:
        raise ValueError(f"samples and concurrency must be >= 1, got {samples} and {concurrency}")
    started = time.perf_counter()
    with TrajectoryWriter(out) as writer:
        todo, finished = _work(tasks, samples, writer.done, retry_errors)
        summary = TeachSummary(finished + len(todo), finished, 0, 0, 0, False, 0.0)
        finished_jobs = None
        if concurrency == 1:
            teacher = teacher_factory() if todo else None
            runs: Iterator[TeacherRun] = (teacher.run(task, sample=sample) for task, sample in todo)
        else:
            # one teacher per thread (its store connection); runs are written as they finish
            finished_jobs = as_finished(lambda teacher, job: teacher.run(job[0], sample=job[1]),
                                        teacher_factory, todo, concurrency)
            runs = (run for _, run in finished_jobs)
        try:
            for run in progress_bar(runs, "teach", total=summary.total, unit="run",
                                    enabled=progress, initial=finished):
                writer.append(run)
                summary.written += 1
                summary.errors += run.status != "ok"
                summary.fallbacks += run.fallback is not None
        except KeyboardInterrupt:
            summary.interrupted = True
            log.warning("interrupted: %d run(s) written to %s; run again to resume", summary.written, out)
        finally:
            if finished_jobs is not None:
                finished_jobs.close()  # idle workers take no new task; runs in flight are dropped
    summary.seconds = time.perf_counter() - started
    return summary
