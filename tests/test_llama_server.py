"""The teacher and the student against a real OpenAI-compatible server: llama-cpp-python's
(`python -m llama_cpp.server`, the `llamaserver` extra) on loopback, serving a tiny random
Llama exported to GGUF, with two tasks in flight at once.

What a fake server cannot show: the real client, the real server's grammars (guided
decoding `llamacpp`), two endpoints sharing one run (one of them killed mid-run: the run
goes on on the other), and the only server killed mid-run with SIGKILL: the run stops
cleanly, the tasks in flight are not recorded as fallbacks, and after a restart the same
call resumes and loses nothing (every task once, what was written before the kill kept as
it was).

The model's answers are nonsense (random weights), so nothing here asserts what it ranks.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import starrec
from starrec.config import CSTConfig, LLMConfig, MarsConfig, MarsTokens, StarConfig, StudentConfig
from starrec.evaluation import runner
from starrec.evaluation.runner import IDENTITY_KEY
from starrec.llm.base import ServerUnavailable
from starrec.llm.local_server import LlamaServer, missing_server_packages
from tests.conftest import write_dataset_folder

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_server_packages()), reason="the llama.cpp server needs "
                       f"{', '.join(missing_server_packages())} (pip install -e .[llamaserver])"),
]

ALIAS = "tiny"
TASKS = 6
# small prompts and few calls per teacher run: a test pays for every prefill
MARS = MarsConfig(analysts=["recent"], reflection_rounds=0, history_items=3, evidence_budget=60,
                  max_tokens=MarsTokens(analyst=16))


@pytest.fixture(scope="module")
def gguf(tiny_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from starrec.llm.gguf_export import export_gguf
    from tiny_lm import make_tiny_base_gguf

    root = tmp_path_factory.mktemp("served")
    return export_gguf(tiny_lm_dir, root / "tiny.gguf",
                       make_tiny_base_gguf(tiny_lm_dir, root / "base.gguf"), "f16")


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory):
    """A small dataset, its first test tasks, and STAR_HOME for the module (the evidence
    store is built once)."""
    root = tmp_path_factory.mktemp("shop")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STAR_HOME", str(root / "home"))
        write_dataset_folder(root / "data", n_users=12, n_items=40)
        tasks = starrec.load_task_set(str(root / "data"), _config([]), limit=TASKS)
        starrec.evidence_store(tasks, _config([]), progress=False)
        yield tasks


@pytest.fixture(scope="module")
def student(tiny_lm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's folder as a student: its card gives the format and plan choices;
    its tokenizer renders the prompt the server completes."""
    from starrec.llm.card import ModelCard, write_model_card

    folder = tmp_path_factory.mktemp("student") / "model"
    shutil.copytree(tiny_lm_dir, folder)
    write_model_card(folder, ModelCard(stage="sft", base_model="tiny",
                                       base_model_path=str(tiny_lm_dir),
                                       plan_choices=["recent: the last items", "long_term: x"],
                                       max_reflection_tokens=8))
    return folder


def _config(urls: list[str]) -> StarConfig:
    llm = LLMConfig(backend="openai", base_url=urls or None, model=ALIAS, served_model=ALIAS,
                    guided="llamacpp", concurrency=2, timeout_s=120, max_retries=2,
                    backoff_s=0.2, endpoint_cooldown_s=1.0)
    return StarConfig(
        cst=CSTConfig(content=False, token_budget=200), mars=MARS.model_copy(update={"llm": llm}),
        student=StudentConfig(max_new_tokens=48, llm=llm))


def _server(gguf: Path, tmp_path: Path, name: str) -> LlamaServer:
    return LlamaServer(gguf, alias=ALIAS, threads=1, n_ctx=8192,
                       log_path=tmp_path / f"{name}.log", startup_timeout_s=180)


def _evaluate(system: str, tasks, cfg: StarConfig, student: Path, records: Path):
    model = str(student) if system == "star" else ALIAS
    return starrec.evaluate(system, tasks, cfg, model=model, records=records)


def _records(path: Path) -> list[dict]:
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    return [line for line in lines if IDENTITY_KEY not in line]


def _answered_by_the_model(system: str, record: dict) -> bool:
    """No backend error in the record: the task was answered, not replaced by a fallback
    because the server was gone."""
    details = record["details"]
    return details.get("status") == "ok" if system == "mars" else details.get("error") is None


def test_teacher_and_student_with_two_tasks_in_flight_over_two_servers(gguf, shop, student,
                                                                       tmp_path, monkeypatch):
    """Both servers serve the teacher's run (each thread keeps to one); then one of them
    is killed in the middle of the student's run, and the run goes on on the other:
    nothing stops, no task falls back."""
    servers = [_server(gguf, tmp_path, f"server{i}") for i in range(2)]
    try:
        for server in servers:
            server.start()
        cfg = _config([s.url for s in servers])
        for system in ("mars", "star"):
            if system == "star":
                monkeypatch.setattr(runner, "_flush", _killing(servers[1], after=2))
            records = tmp_path / f"{system}.records.jsonl"
            evaluation = _evaluate(system, shop, cfg, student, records)
            assert evaluation.result["n_tasks"] == TASKS
            rows = _records(records)
            assert sorted(r["task_id"] for r in rows) == sorted(t.task_id for t in shop)
            assert all(_answered_by_the_model(system, r) for r in rows), rows
            assert [r.task_id for r in evaluation.records] == [t.task_id for t in shop]
            if system == "mars":  # each thread kept to its own server: both served the run
                assert all(s.log_tail(10**6).count("POST /v1/") > TASKS for s in servers)
        assert not servers[1].running and servers[0].running
    finally:
        for server in servers:
            server.stop()


def _killing(server: LlamaServer, after: int):
    """`runner._flush` that kills `server` (SIGKILL) right after the `after`-th record
    reaches the disk, while the next tasks are in flight: deterministic, where a timer
    would race the run."""
    flush, written = runner._flush, []

    def flush_and_kill(handle) -> None:
        flush(handle)
        written.append(1)
        if len(written) == after + 1:  # the identity line comes first
            server.kill()

    return flush_and_kill


@pytest.mark.parametrize("system", ["mars", "star"])
def test_a_server_killed_mid_run_stops_it_and_a_rerun_loses_nothing(system, gguf, shop, student,
                                                                    tmp_path, monkeypatch):
    server = _server(gguf, tmp_path, "server")
    records = tmp_path / f"{system}.records.jsonl"
    try:
        server.start()
        cfg = _config([server.url])
        with monkeypatch.context() as patch:
            patch.setattr(runner, "_flush", _killing(server, after=2))
            with pytest.raises(ServerUnavailable, match="no answer after 3 attempts"):
                _evaluate(system, shop, cfg, student, records)
        before = _records(records)
        # the two records and the tasks in flight when it died, finished before the kill
        # or not recorded at all: none of them a fallback for want of a server
        assert 2 <= len(before) < TASKS
        assert all(_answered_by_the_model(system, r) for r in before), before

        server.start()  # the same port: the run's configuration is unchanged
        evaluation = _evaluate(system, shop, cfg, student, records)
        after = _records(records)
        assert after[:len(before)] == before  # kept as written
        assert sorted(r["task_id"] for r in after) == sorted(t.task_id for t in shop)
        assert len(after) == TASKS  # no task twice
        assert all(_answered_by_the_model(system, r) for r in after)
        assert evaluation.result["n_tasks"] == TASKS
        assert [r.task_id for r in evaluation.records] == [t.task_id for t in shop]
    finally:
        server.stop()


def test_the_concurrency_benchmark_runs_and_resumes(gguf, shop, tmp_path, capsys):
    """benchmarks/llm_concurrency.py at its smallest: two levels on two tasks, the table
    and the JSON; a rerun keeps the levels measured."""
    import importlib.util

    path = Path(__file__).parents[1] / "benchmarks" / "llm_concurrency.py"
    spec = importlib.util.spec_from_file_location("llm_concurrency", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    args = ["--model", str(gguf), "--dataset", shop.spec, "--users", "all", "--tasks", "2",
            "--levels", "1", "2", "--threads", "1", "--out", str(out),
            "--set", "cst.content=false", "--set", "cst.token_budget=200",
            "--set", "mars.analysts=[recent]", "--set", "mars.reflection_rounds=0",
            "--set", "mars.history_items=3", "--set", "mars.evidence_budget=60",
            "--set", "mars.max_tokens.analyst=16"]
    assert bench.main(args) == 0
    result = json.loads(out.read_text())
    assert [r["concurrency"] for r in result["levels"]] == [1, 2]
    assert all(r["tasks"] == 2 and r["tasks_per_s"] > 0 for r in result["levels"])
    assert result["levels"][0]["speedup"] == 1.0
    assert "| 2 | 2 |" in capsys.readouterr().out
    assert bench.main(args) == 0  # nothing left to measure: no server is started
    assert "kept from" in capsys.readouterr().out
