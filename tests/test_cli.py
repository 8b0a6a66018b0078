import json

import pytest
from typer.testing import CliRunner

from starrec.cli.main import app
from tests.conftest import write_dataset_folder

runner = CliRunner()
RESULT_KEYS = {"system", "dataset", "split", "n_tasks", "metrics", "ci95", "efficiency", "config",
               "warnings", "provenance"}
METRIC_KEYS = {"HR@1", "HR@3", "HR@5", "AvgHR", "NDCG@5", "NDCG@10", "MRR", "valid_rate"}
# what an LLM adds (DESIGN.md 3.4): beside the metrics, without intervals
LLM_METRIC_KEYS = {"shown_order_identity", "kendall_tau_shown", "well_formed_rate",
                   "repaired_rate", "constrained_rate", "fallback_rate"}
EFFICIENCY_KEYS = {"median_s", "p95_s", "llm_calls_per_task", "generation_requests_per_task",
                   "prompt_tokens_per_task", "completion_tokens_per_task"}


def write_tables(folder):
    write_dataset_folder(folder, n_users=30, n_items=50)
    return folder


def test_prepare_eval_report_on_a_folder_of_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("STAR_HOME", str(tmp_path / "home"))
    data = write_tables(tmp_path / "shop")
    out = tmp_path / "tasks"
    result = runner.invoke(app, ["data", "prepare", "--dataset", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "test.jsonl" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["files"]["test.jsonl"]["count"] == 30

    results = tmp_path / "pop.json"
    records = tmp_path / "pop.records.jsonl"
    result = runner.invoke(app, ["eval", "--system", "pop", "--dataset", str(data), "--tasks",
                                 str(out / "test.jsonl"), "--out", str(results), "--records",
                                 str(records), "--set", "eval.bootstrap_resamples=20"])
    assert result.exit_code == 0, result.output
    payload = json.loads(results.read_text())
    assert set(payload) == RESULT_KEYS
    assert set(payload["metrics"]) == METRIC_KEYS | LLM_METRIC_KEYS
    assert set(payload["ci95"]) == METRIC_KEYS
    assert set(payload["efficiency"]) == EFFICIENCY_KEYS
    assert payload["n_tasks"] == 30 and payload["split"] == "test"
    assert payload["metrics"]["valid_rate"] == 100.0
    assert len(records.read_text().splitlines()) == 30

    result = runner.invoke(app, ["report", str(results)])
    assert result.exit_code == 0 and "| pop | test all | 30 |" in result.output


def test_eval_limit_and_default_task_files(tmp_path, monkeypatch):
    monkeypatch.setenv("STAR_HOME", str(tmp_path / "home"))
    data = write_tables(tmp_path / "shop")
    results = tmp_path / "r.json"
    result = runner.invoke(app, ["eval", "--system", "random", "--dataset", str(data), "--users",
                                 "eval-200", "--limit", "7", "--out", str(results)])
    assert result.exit_code == 0, result.output
    assert json.loads(results.read_text())["n_tasks"] == 7
    # the default folder is named by the data's fingerprint and the protocol
    assert len(list((tmp_path / "home" / "data" / "shop").glob("*-seed0-*/manifest.json"))) == 1


def test_cst_show_numbers_candidates_as_the_teacher_sees_them(tmp_path, monkeypatch):
    from starrec.cst.ranker import CSTRanker
    from starrec.cst.store import EvidenceStore
    from starrec.data.tasks import load_tasks

    monkeypatch.setenv("STAR_HOME", str(tmp_path / "home"))
    data = write_tables(tmp_path / "shop")
    result = runner.invoke(app, ["cst", "show", "--task", "test-u3", "--dataset", str(data),
                                 "--set", "cst.content=false", "--set", "mars.candidate_order=cst"])
    assert result.exit_code == 0, result.output
    (store_path,) = (tmp_path / "home" / "cst").glob("*-test-*.sqlite")  # beside it: valid's
    store = EvidenceStore(store_path)
    (folder,) = (tmp_path / "home" / "data" / "shop").glob("*-seed0-*")
    (task,) = [t for t in load_tasks(folder / "test.jsonl") if t.task_id == "test-u3"]
    first = CSTRanker.on_store(store).rank(task)[0]
    assert first != task.candidates[0]  # else the check below could not tell the orders apart
    assert f"[A] {store.title(first)} (id {first}):" in result.output
    # in the default presentation, the task file's order (DESIGN.md 3.7)
    result = runner.invoke(app, ["cst", "show", "--task", "test-u3", "--dataset", str(data),
                                 "--set", "cst.content=false"])
    shown = task.candidates[0]
    assert f"[A] {store.title(shown)} (id {shown}):" in result.output


def test_bad_input_fails_with_the_file_and_line(tmp_path):
    data = write_tables(tmp_path / "shop")
    lines = (data / "interactions.csv").read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 2)[0] + ",yesterday-ish,4.0"
    (data / "interactions.csv").write_text("\n".join(lines) + "\n")
    result = runner.invoke(app, ["data", "prepare", "--dataset", str(data), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "interactions.csv" in result.output and "line 4" in result.output


def test_unknown_config_key_is_refused(tmp_path):
    result = runner.invoke(app, ["data", "prepare", "--set", "data.sed=3"])
    assert result.exit_code != 0
    assert "sed" in result.output


def test_every_command_has_help():
    for command in (["--help"], ["data", "prepare", "--help"], ["eval", "--help"],
                    ["report", "--help"], ["pipeline", "--help"]):
        result = runner.invoke(app, command)
        assert result.exit_code == 0 and "Usage" in result.output


def test_eval_writes_per_task_file_and_provenance_of_the_task_file(tmp_path, monkeypatch):
    import hashlib

    from starrec.data.registry import load_dataset

    monkeypatch.setenv("STAR_HOME", str(tmp_path / "home"))
    data = write_tables(tmp_path / "shop")
    results = tmp_path / "pop.json"
    result = runner.invoke(app, ["eval", "--system", "pop", "--dataset", str(data), "--users",
                                 "eval-200", "--limit", "5", "--out", str(results),
                                 "--set", "eval.bootstrap_resamples=20"])
    assert result.exit_code == 0, result.output
    payload = json.loads(results.read_text())
    rows = [json.loads(line) for line in (tmp_path / "pop.tasks.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and {"task_id", "target", "rank", "ranking", "valid", "well_formed",
                               "seconds"} <= set(rows[0])
    (prepared,) = (tmp_path / "home" / "data").rglob("eval-200.jsonl")
    provenance = payload["provenance"]
    assert provenance["tasks_sha256"] == hashlib.sha256(prepared.read_bytes()).hexdigest()
    assert provenance["dataset_fingerprint"] == load_dataset(str(data)).fingerprint()
    assert provenance["model_hash"] is None and payload["warnings"] == []


def test_eval_flags_a_run_that_mostly_fell_back_in_red(tmp_path, monkeypatch):
    from starrec.llm import models
    from tests.fakes import ScriptedModel

    monkeypatch.setenv("STAR_HOME", str(tmp_path / "home"))
    data = write_tables(tmp_path / "shop")
    monkeypatch.setattr(models, "load_chat_model", lambda spec, cfg: ScriptedModel(
        {"planner": "recent: x", "recent": "Fine.", "reflector": "ACCEPT",
         "ranker": "I like them all."}))
    results = tmp_path / "mars.json"
    result = runner.invoke(app, ["eval", "--system", "mars", "--model", "fake", "--dataset",
                                 str(data), "--limit", "2", "--out", str(results),
                                 "--set", "cst.content=false", "--set", "eval.bootstrap_resamples=20"],
                           color=True)
    assert result.exit_code == 0, result.output
    payload = json.loads(results.read_text())
    assert payload["metrics"]["fallback_rate"] == 100 and payload["metrics"]["valid_rate"] == 0
    assert payload["metrics"]["well_formed_rate"] == 0
    (warning,) = payload["warnings"]
    assert "fell back" in warning
    assert "\x1b[31m" in result.output and "warning: 2 of 2 tasks" in result.output

    result = runner.invoke(app, ["report", str(results)])
    assert result.exit_code == 0 and "shown-order identity" in result.output


@pytest.mark.parametrize("args, message", [
    (["--set", "nope.x=1"], "bad setting in --config/--set: nope: Extra inputs are not permitted"),
    (["--set", "mars.labels=roman"], "mars.labels: Input should be 'letters' or 'numbers'"),
    (["--set", "mars.labels"], "must look like section.key=value"),
    (["--config", "missing.yaml"], "No such file or directory"),
])
def test_bad_settings_are_one_line_and_exit_2(tmp_path, args, message):
    result = runner.invoke(app, ["eval", "--system", "random", "--out", str(tmp_path / "r.json"),
                                 *args])
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
