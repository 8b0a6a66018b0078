"""Tasks in flight at once: records written as tasks finish, complete and unique after a
crash and its resume, results in task order whatever the order of finishing; served
models answer concurrently, in-process ones one task at a time; a server that is gone
stops a run instead of turning its tasks into fallbacks.

The real server (llama.cpp) is in tests/test_llama_server.py; these use scripted
systems and models, so that the order of finishing is chosen, not left to chance."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import starrec
from starrec.config import CSTConfig, LLMConfig, MarsConfig, StarConfig
from starrec.core import Recommendation, Task
from starrec.evaluation.runner import IDENTITY_KEY, results_json, run_tasks
from starrec.llm.base import LLMError, ServerUnavailable
from starrec.llm.concurrency import as_finished, task_concurrency
from tests.conftest import write_dataset_folder
from tests.fakes import ScriptedModel, permutation

CANDIDATES = [f"i{k}" for k in range(20)]
TASKS = [Task(f"test-{i}", f"u{i}", "classic", ["h"], CANDIDATES, CANDIDATES[i % 20], split="test")
         for i in range(10)]


class SlowSystem:
    """Answers after `delays[task_id]` seconds (the first tasks slowest, so they finish
    last), ranking the target at `1 + i % 5`; `fail_on` raises `ServerUnavailable`."""

    name = "slow"

    def __init__(self, delays: dict[str, float] | None = None, fail_on: set[str] = frozenset(),
                 answered: list | None = None) -> None:
        self.delays = delays or {}
        self.fail_on = fail_on
        self.answered = answered if answered is not None else []

    def recommend(self, task: Task) -> Recommendation:
        time.sleep(self.delays.get(task.task_id, 0.0))
        if task.task_id in self.fail_on:
            raise ServerUnavailable("no server answered")
        position = int(task.task_id.split("-")[1]) % 5
        others = [c for c in task.candidates if c != task.target]
        self.answered.append((task.task_id, threading.current_thread().name))
        return Recommendation(others[:position] + [task.target] + others[position:])


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _record_ids(path: Path) -> list[str]:
    return [line["task_id"] for line in _lines(path) if IDENTITY_KEY not in line]


def test_concurrent_records_are_complete_unique_and_results_in_task_order(tmp_path):
    delays = {t.task_id: 0.02 * (len(TASKS) - i) for i, t in enumerate(TASKS)}
    answered: list = []
    out = tmp_path / "slow.records.jsonl"
    made = []

    def make() -> SlowSystem:
        made.append(SlowSystem(delays, answered=answered))
        return made[-1]

    records = run_tasks(SlowSystem(delays, answered=answered), TASKS, progress=False,
                        checkpoint=out, concurrency=4, make_system=make)
    ids = _record_ids(out)
    assert sorted(ids) == sorted(t.task_id for t in TASKS) and len(ids) == len(set(ids))
    assert ids != [t.task_id for t in TASKS]  # written as they finished
    assert [r.task_id for r in records] == [t.task_id for t in TASKS]  # returned in task order
    assert len(made) == 3 and len({thread for _, thread in answered}) == 4
    sequential = run_tasks(SlowSystem(), TASKS, progress=False)
    assert [(r.task_id, r.rank, r.ranking) for r in records] == [
        (r.task_id, r.rank, r.ranking) for r in sequential]
    # everything computed from the records (bootstrap intervals included) is the same
    summary = results_json("slow", "d", "test", records, {}, n_resamples=50)
    assert summary["metrics"] == results_json("slow", "d", "test", sequential, {},
                                              n_resamples=50)["metrics"]
    assert summary["ci95"] == results_json("slow", "d", "test", sequential, {},
                                           n_resamples=50)["ci95"]
    # a rerun finds every task done and answers none
    again: list = []
    run_tasks(SlowSystem(answered=again), TASKS, progress=False, checkpoint=out, concurrency=4)
    assert again == [] and _record_ids(out) == ids


def test_a_crash_keeps_what_finished_and_the_rerun_completes_without_duplicates(tmp_path):
    out = tmp_path / "slow.records.jsonl"
    answered: list = []
    delays = {t.task_id: 0.03 for t in TASKS}
    with pytest.raises(ServerUnavailable):
        run_tasks(SlowSystem(delays, {"test-4"}, answered), TASKS, progress=False,
                  checkpoint=out, concurrency=3,
                  make_system=lambda: SlowSystem(delays, {"test-4"}, answered))
    first = _record_ids(out)
    # every answer computed before the stop was written, none twice, every line whole
    assert sorted(first) == sorted(task_id for task_id, _ in answered)
    assert len(first) == len(set(first)) and "test-4" not in first
    assert len(first) < len(TASKS)
    rerun: list = []
    records = run_tasks(SlowSystem(answered=rerun), TASKS, progress=False, checkpoint=out,
                        concurrency=3, make_system=lambda: SlowSystem(answered=rerun))
    assert sorted(task_id for task_id, _ in rerun) == sorted(
        t.task_id for t in TASKS if t.task_id not in first)
    final = _record_ids(out)
    assert sorted(final) == sorted(t.task_id for t in TASKS) and len(final) == len(set(final))
    assert [r.task_id for r in records] == [t.task_id for t in TASKS]
    assert sum(IDENTITY_KEY in line for line in _lines(out)) == 1


def test_as_finished_yields_in_finishing_order_and_raises_after_the_ones_in_flight():
    order = list(as_finished(lambda _, x: (time.sleep(0.02 * (3 - x)), x)[1], object,
                             [0, 1, 2, 3], 4))
    assert [x for x, _ in order] == [3, 2, 1, 0]
    seen = []

    def work(_, x):
        time.sleep(0.01 * x)
        if x == 1:
            raise RuntimeError("bug")
        return x

    with pytest.raises(RuntimeError, match="bug"):
        for item, _ in as_finished(work, object, list(range(4)), 4):
            seen.append(item)
    assert sorted(seen) == [0, 2, 3]  # started before the error: finished and handed back


def test_in_process_models_run_one_task_at_a_time_and_say_so(caplog):
    class Served:
        name, serves_concurrently = "served", True

    class InProcess:
        name = "in-process"

    with caplog.at_level(logging.INFO, logger="starrec.llm.concurrency"):
        assert task_concurrency(InProcess(), 4) == 1
        assert task_concurrency(Served(), 4) == 4 and task_concurrency(InProcess(), 1) == 1
    assert [r.getMessage() for r in caplog.records] == [
        "concurrency 4 asked for, but in-process runs in process (one generation at a time): "
        "running tasks one by one"]


# --- the teacher through the library and the CLI --------------------------------------

class ServedScript(ScriptedModel):
    """A scripted model that, like a server client, may be called from several threads."""

    serves_concurrently = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.threads: set[str] = set()

    def chat(self, messages, **kwargs):
        self.threads.add(threading.current_thread().name)
        time.sleep(0.01)  # let the threads overlap
        return super().chat(messages, **kwargs)


def _script(ranker=None) -> dict:
    return {"planner": "recent: x", "recent": "Fine.", "reflector": "ACCEPT",
            "ranker": ranker or permutation(20, [3])}


@pytest.fixture
def shop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("STAR_HOME", str(tmp_path / "home"))
    folder = tmp_path / "shop"
    write_dataset_folder(folder, n_users=12, n_items=40)
    return folder


def test_the_teacher_with_a_served_model_answers_tasks_concurrently(shop, tmp_path):
    cfg = StarConfig(cst=CSTConfig(content=False), mars=MarsConfig(llm=LLMConfig(concurrency=3)))
    tasks = starrec.load_task_set(str(shop), cfg, limit=8)
    model = ServedScript(_script())
    runs = tmp_path / "runs.jsonl"
    concurrent = starrec.evaluate("mars", tasks, cfg, records=tmp_path / "c.jsonl",
                                  trajectories=runs, chat_model=model)
    assert len(model.threads) == 3
    ids = _record_ids(tmp_path / "c.jsonl")
    assert sorted(ids) == sorted(t.task_id for t in tasks) and len(set(ids)) == len(ids)
    assert sorted(json.loads(line)["task_id"] for line in runs.read_text().splitlines()) == sorted(ids)
    sequential = starrec.evaluate("mars", tasks, cfg.model_copy(update={"mars": MarsConfig()}),
                                  records=tmp_path / "s.jsonl", chat_model=ServedScript(_script()))
    assert concurrent.result["metrics"] == sequential.result["metrics"]
    assert [r.task_id for r in concurrent.records] == [t.task_id for t in tasks]


def test_a_server_gone_stops_the_teacher_instead_of_recording_fallbacks(world):
    from starrec.agents.mars import MarsTeacher

    store, tasks = world
    with pytest.raises(ServerUnavailable):
        MarsTeacher(ScriptedModel(_script(ServerUnavailable("gone"))), store).run(tasks[0])
    # one request failing (an LLMError) stays that task's recorded fallback
    run = MarsTeacher(ScriptedModel(_script(LLMError("HTTP 400"))), store).run(tasks[0])
    assert run.status == "error" and run.fallback is not None


class GoneAfter:
    """A ranker answer that raises `ServerUnavailable` from its `n`-th call on, while
    `down`."""

    def __init__(self, n: int) -> None:
        self.n, self.calls, self.down, self.lock = n, 0, True, threading.Lock()

    def __call__(self, messages) -> str:
        with self.lock:
            self.calls += 1
            if self.down and self.calls >= self.n:
                raise ServerUnavailable("no answer after 4 attempts from http://gpu:8000/v1")
        return permutation(20, [3])


def test_eval_concurrency_option_and_a_resume_after_the_server_went_away(shop, tmp_path,
                                                                          monkeypatch):
    from starrec.cli.main import app
    from starrec.llm import models

    ranker = GoneAfter(4)
    loaded: list[ServedScript] = []

    def load(spec, cfg):
        loaded.append(ServedScript(_script(ranker), name=spec))
        return loaded[-1]

    monkeypatch.setattr(models, "load_chat_model", load)
    out = tmp_path / "mars.json"
    args = ["eval", "--system", "mars", "--model", "served", "--dataset", str(shop), "--limit",
            "8", "--out", str(out), "--concurrency", "2", "--set", "cst.content=false",
            "--set", "eval.bootstrap_resamples=20"]
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "error: no answer after 4 attempts" in result.output
    assert "Traceback" not in result.output
    records = out.with_suffix(".records.jsonl")
    first = _record_ids(records)
    assert 3 <= len(first) < 8 and len(first) == len(set(first))
    ranker.down = False
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    final = _record_ids(records)
    assert final[:len(first)] == first and len(final) == len(set(final)) == 8
    assert json.loads(out.read_text())["n_tasks"] == 8
    assert len(loaded[-1].threads) == 2
    bad = runner.invoke(app, [*args[:-4], "--concurrency", "0"])
    assert bad.exit_code == 2


def test_teach_with_concurrency_stops_when_the_server_is_gone_and_resumes(shop, tmp_path,
                                                                           monkeypatch):
    from starrec.cli import teach as teach_cli
    from starrec.cli.main import app

    ranker = GoneAfter(4)
    monkeypatch.setattr(teach_cli, "_load_model",
                        lambda spec, cfg: ServedScript(_script(ranker), name="served"))
    out = tmp_path / "runs.jsonl"
    args = ["teach", "--dataset", str(shop), "--limit", "6", "--out", str(out),
            "--concurrency", "2", "--set", "cst.content=false"]
    runner = CliRunner()
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "error: no answer after 4 attempts" in result.output
    first = [json.loads(line)["task_id"] for line in out.read_text().splitlines()]
    assert 3 <= len(first) < 6 and len(first) == len(set(first))
    assert not out.with_name("runs.jsonl.lock").exists()
    ranker.down = False
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    runs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(runs) == len({r["task_id"] for r in runs}) == 6
    assert all(r["status"] == "ok" for r in runs)


def test_how_requests_are_sent_is_not_part_of_a_runs_identity():
    """A run may resume with another concurrency, other endpoints, other retries; and a
    records file written before these settings existed still resumes (its hash is the
    same). Whether the model is served, and under which name, stays in it."""
    from starrec.evaluation.identity import config_hash

    llm = LLMConfig().model_dump()
    before = {k: v for k, v in llm.items()
              if k not in ("served_model", "backoff_s", "endpoint_cooldown_s")}
    before["concurrency"] = 8  # the default then
    params = {"params": {"max_turns": 4}, "model": "smollm2"}
    same = config_hash({**params, "llm": llm})
    assert config_hash({**params, "llm": before}) == same
    served = {**llm, "base_url": ["http://a/v1"]}
    for change in ({"concurrency": 16}, {"backoff_s": 2.0}, {"endpoint_cooldown_s": 1.0},
                   {"max_retries": 9}, {"timeout_s": 5.0}):
        assert config_hash({**params, "llm": {**llm, **change}}) == same, change
    assert config_hash({**params, "llm": served}) != same  # served, not in process
    assert config_hash({**params, "llm": {**served, "base_url": ["http://b/v1", "http://c/v1"]}}) \
        == config_hash({**params, "llm": served})
    assert config_hash({**params, "llm": {**llm, "served_model": "student"}}) != same


def test_more_tasks_than_llamacpp_endpoints_is_warned_about(caplog):
    """A llama.cpp server keeps one prompt cache: tasks beyond one per endpoint evict each
    other's prompts. The run goes ahead as asked, with a warning that says so."""
    from starrec.llm.openai_backend import OpenAIChatModel

    two = OpenAIChatModel("http://127.0.0.1:9/v1,http://127.0.0.1:10/v1", "m", guided="llamacpp")
    vllm = OpenAIChatModel("http://127.0.0.1:9/v1", "m", guided="vllm")
    with caplog.at_level(logging.WARNING, logger="starrec.llm.concurrency"):
        assert task_concurrency(two, 2) == 2 and task_concurrency(vllm, 8) == 8
        assert not caplog.records
        assert task_concurrency(two, 3) == 3
    (record,) = caplog.records
    assert "concurrency 3 over 2 llama.cpp endpoint(s)" in record.getMessage()
