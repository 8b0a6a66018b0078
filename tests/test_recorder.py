"""The trajectory recorder: durable appends, resume after a crash, the lock, threads,
Ctrl-C, retrying errors."""

from __future__ import annotations

import json
import threading
import time

import pytest

import starrec.trajectories.recorder as recorder
from starrec.data.tasks import Task
from starrec.trajectories.recorder import (
    TrajectoryFileError,
    TrajectoryWriter,
    read_runs,
    run_teacher,
)
from starrec.trajectories.schema import Step, TeacherRun

TASKS = [Task(f"t{i}", f"u{i}", "classic", ["a"], ["a", "b", "c"], "b") for i in range(6)]


class FakeTeacher:
    """Records which tasks it ran; `fail_on` makes the run of that task id behave badly."""

    def __init__(self, log: list, fail_on: dict | None = None, delay: float = 0.0) -> None:
        self.log = log
        self.fail_on = fail_on or {}
        self.delay = delay

    def run(self, task: Task, sample: int = 0, seed: int | None = None) -> TeacherRun:
        time.sleep(self.delay)
        self.log.append((task.task_id, sample, threading.current_thread().name))
        behaviour = self.fail_on.get(task.task_id)
        if isinstance(behaviour, BaseException):
            raise behaviour
        run = TeacherRun(task.task_id, {"task_id": task.task_id}, "fake", {}, sample=sample,
                         steps=[Step("message", "ranker", output="[1, 0, 2]", parsed=[1, 0, 2])],
                         ranking=["b", "a", "c"], ranking_indices=[1, 0, 2])
        if behaviour == "error":
            run.status, run.error, run.fallback = "error", "backend error: timeout", "fallback"
        return run


def keys(path):
    return [f'{r["task_id"]}#{r["sample"]}' for r in map(json.loads, path.read_text().splitlines())]


def test_runs_are_written_once_and_resume_skips_them(tmp_path):
    out = tmp_path / "runs.jsonl"
    log: list = []
    summary = run_teacher(lambda: FakeTeacher(log), TASKS[:3], out, samples=2, progress=False)
    assert (summary.written, summary.done_before, summary.total) == (6, 0, 6)
    assert keys(out) == ["t0#0", "t0#1", "t1#0", "t1#1", "t2#0", "t2#1"]
    summary = run_teacher(lambda: FakeTeacher(log), TASKS, out, samples=2, progress=False)
    assert (summary.written, summary.done_before) == (6, 6)
    assert sorted(keys(out)) == sorted(f"t{i}#{s}" for i in range(6) for s in range(2))
    assert len(log) == 12
    runs = read_runs(out)
    assert runs[0].steps[0] == Step("message", "ranker", output="[1, 0, 2]", parsed=[1, 0, 2])


def test_resume_after_a_crash_mid_write(tmp_path, caplog):
    out = tmp_path / "runs.jsonl"
    log: list = []
    run_teacher(lambda: FakeTeacher(log), TASKS[:3], out, progress=False)
    # a crash while writing t3: half a line, no line end
    line = FakeTeacher([]).run(TASKS[3]).to_json()
    with out.open("a") as handle:
        handle.write(line[: len(line) // 2])
    log.clear()
    summary = run_teacher(lambda: FakeTeacher(log), TASKS, out, progress=False)
    assert "damaged last line" in caplog.text
    assert [entry[0] for entry in log] == ["t3", "t4", "t5"]  # t3 redone, t0-t2 not
    assert keys(out) == ["t0#0", "t1#0", "t2#0", "t3#0", "t4#0", "t5#0"]
    assert summary.done_before == 3 and summary.written == 3


def test_a_complete_but_unterminated_last_line_is_also_redone(tmp_path):
    out = tmp_path / "runs.jsonl"
    out.write_text(FakeTeacher([]).run(TASKS[0]).to_json())  # json ok, no "\n": not durable
    log: list = []
    run_teacher(lambda: FakeTeacher(log), TASKS[:2], out, progress=False)
    assert [entry[0] for entry in log] == ["t0", "t1"] and keys(out) == ["t0#0", "t1#0"]


def test_a_damaged_line_before_the_end_is_refused(tmp_path):
    out = tmp_path / "runs.jsonl"
    good = FakeTeacher([]).run(TASKS[0]).to_json()
    out.write_text(good + "\n{not json\n" + good + "\n")
    with pytest.raises(TrajectoryFileError, match="runs.jsonl:2: not a trajectory record"):
        run_teacher(lambda: FakeTeacher([]), TASKS, out, progress=False)
    assert out.read_text().count("\n") == 3  # untouched


def test_the_lock_keeps_a_second_writer_out(tmp_path):
    out = tmp_path / "runs.jsonl"
    with TrajectoryWriter(out):
        with pytest.raises(TrajectoryFileError, match="another process"):
            TrajectoryWriter(out).open()
        with pytest.raises(TrajectoryFileError, match="another process"):
            run_teacher(lambda: FakeTeacher([]), TASKS, out, progress=False)
    assert not out.with_name("runs.jsonl.lock").exists()
    with TrajectoryWriter(out) as writer:  # free again
        writer.append(FakeTeacher([]).run(TASKS[0]))
        assert writer.done == {"t0#0": "ok"}


def test_concurrency_writes_each_task_once(tmp_path):
    out = tmp_path / "runs.jsonl"
    log: list = []
    summary = run_teacher(lambda: FakeTeacher(log, delay=0.02), TASKS, out, samples=2,
                          concurrency=3, progress=False)
    assert summary.written == 12
    assert sorted(keys(out)) == sorted(f"t{i}#{s}" for i in range(6) for s in range(2))
    assert len({thread for _, _, thread in log}) > 1
    assert run_teacher(lambda: FakeTeacher(log), TASKS, out, samples=2, concurrency=3,
                       progress=False).written == 0


@pytest.mark.parametrize("concurrency", [1, 2])
def test_ctrl_c_stops_cleanly_and_the_rest_runs_next_time(tmp_path, concurrency):
    out = tmp_path / "runs.jsonl"
    log: list = []
    summary = run_teacher(lambda: FakeTeacher(log, {"t3": KeyboardInterrupt()}), TASKS, out,
                          concurrency=concurrency, progress=False)
    assert summary.interrupted
    written = keys(out)
    assert "t3#0" not in written and len(written) == len(set(written)) == summary.written
    assert not out.with_name("runs.jsonl.lock").exists()
    run_teacher(lambda: FakeTeacher(log), TASKS, out, progress=False)
    assert sorted(keys(out)) == [f"t{i}#0" for i in range(6)]


def test_errors_are_kept_and_retried_on_request(tmp_path):
    out = tmp_path / "runs.jsonl"
    summary = run_teacher(lambda: FakeTeacher([], {"t1": "error"}), TASKS[:3], out, progress=False)
    assert (summary.errors, summary.fallbacks) == (1, 1)
    log: list = []
    run_teacher(lambda: FakeTeacher(log), TASKS[:3], out, progress=False)
    assert log == []  # an error is a result: not retried by default
    run_teacher(lambda: FakeTeacher(log), TASKS[:3], out, retry_errors=True, progress=False)
    assert [entry[0] for entry in log] == ["t1"]
    assert keys(out) == ["t0#0", "t1#0", "t2#0", "t1#0"]  # append-only: the last line wins
    assert [(r.task_id, r.status) for r in read_runs(out)] == [("t0", "ok"), ("t1", "ok"), ("t2", "ok")]


def test_a_teacher_that_raises_stops_the_batch_after_what_it_finished(tmp_path):
    out = tmp_path / "runs.jsonl"
    with pytest.raises(RuntimeError, match="bug"):
        run_teacher(lambda: FakeTeacher([], {"t2": RuntimeError("bug")}), TASKS, out, progress=False)
    assert keys(out) == ["t0#0", "t1#0"]


def test_progress_bar_starts_at_the_done_count(tmp_path, monkeypatch):
    out = tmp_path / "runs.jsonl"
    run_teacher(lambda: FakeTeacher([]), TASKS[:2], out, progress=False)
    seen = {}

    def bar(iterable, desc, total=None, unit="it", enabled=True, initial=0):
        seen.update(desc=desc, total=total, initial=initial)
        return iterable

    monkeypatch.setattr(recorder, "progress_bar", bar)
    run_teacher(lambda: FakeTeacher([]), TASKS, out)
    assert seen == {"desc": "teach", "total": 6, "initial": 2}


def test_bad_arguments_are_refused(tmp_path):
    with pytest.raises(ValueError, match="samples and concurrency"):
        run_teacher(lambda: FakeTeacher([]), TASKS, tmp_path / "x.jsonl", samples=0)
