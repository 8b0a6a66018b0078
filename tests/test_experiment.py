"""The library API (`starrec.experiment`, reachable as `starrec.*`) and the quick start
example that runs on it."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

import starrec
from starrec import experiment
from starrec.config import CSTConfig, StarConfig
from starrec.data.splits import task_interactions
from tests.conftest import write_dataset_folder

ROOT = Path(__file__).resolve().parents[1]
CONFIG = StarConfig(cst=CSTConfig(content=False))  # no MiniLM in tests


@pytest.fixture
def shop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("STAR_HOME", str(tmp_path / "home"))
    folder = tmp_path / "shop"
    write_dataset_folder(folder, n_users=30, n_items=60, per_user=10)
    return folder


def test_import_starrec_stays_light_and_offers_the_api() -> None:
    code = ("import sys, starrec; heavy = {'pandas', 'torch', 'transformers'} & set(sys.modules); "
            "assert not heavy, heavy; assert callable(starrec.make_system); "
            "assert 'starrec.experiment' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    for name in ("prepare_tasks", "load_task_set", "evidence_store", "make_system", "evaluate"):
        assert getattr(starrec, name) is getattr(experiment, name)
    with pytest.raises(AttributeError):
        starrec.no_such_thing  # noqa: B018


def test_task_sets_stores_systems_and_evaluation_from_python(shop: Path) -> None:
    folder = starrec.prepare_tasks(str(shop), CONFIG)
    assert (folder / "manifest.json").exists()
    tasks = starrec.load_task_set(str(shop), CONFIG, users="eval-200", limit=9)
    assert len(tasks) == 9 and tasks.split == "test" and tasks.path == folder / "eval-200.jsonl"
    store = starrec.evidence_store(tasks, CONFIG)
    # the store holds what the tasks may see: no target of theirs
    allowed = task_interactions(tasks.dataset, tasks.tasks, "test")
    assert store.meta["n_interactions"] == len(allowed)
    pop = starrec.evaluate("pop", tasks, CONFIG)
    assert pop.result["n_tasks"] == 9 and 0 <= pop.metrics["AvgHR"] <= 100
    cst = starrec.make_system("cst", tasks, CONFIG, store=store)
    assert starrec.evaluate(cst, tasks, CONFIG).result["system"] == "cst"
    # a system made by name answers as the one `star eval` fits
    made = starrec.evaluate(starrec.make_system("pop", tasks, CONFIG), tasks, CONFIG)
    assert made.metrics["AvgHR"] == pop.metrics["AvgHR"]


def test_bad_names_and_contradictions_are_value_errors(shop: Path) -> None:
    with pytest.raises(ValueError, match="contradicts --split test"):
        starrec.load_task_set(str(shop), CONFIG, split="test", users="valid-200")
    tasks = starrec.load_task_set(str(shop), CONFIG, limit=3)
    with pytest.raises(ValueError, match="unknown system 'nope'"):
        starrec.make_system("nope", tasks, CONFIG)
    with pytest.raises(ValueError, match="star needs --model"):
        starrec.evaluate("star", tasks, CONFIG)


def test_one_fit_serves_all_users_and_a_subset(shop: Path) -> None:
    everyone = starrec.load_task_set(str(shop), CONFIG)
    first = experiment.TaskSet(everyone.dataset, everyone.tasks[:7], everyone.spec,
                               users="eval-200")
    whole, part = starrec.evaluate_with_subset("itemknn", everyone, first, CONFIG)
    assert whole.result["n_tasks"] == 30 and part.result["n_tasks"] == 7
    assert [r.task_id for r in part.records] == [t.task_id for t in first.tasks]
    # the subset's rows are the whole run's rows, not a second run
    by_id = {r.task_id: r for r in whole.records}
    assert all(r is by_id[r.task_id] for r in part.records)
    assert part.result["config"]["users"] == "eval-200" and whole.result["config"]["users"] == "all"
    stranger = experiment.TaskSet(everyone.dataset, [starrec.load_task_set(
        str(shop), CONFIG, split="valid").tasks[0]], everyone.spec)
    with pytest.raises(ValueError, match="not tasks of the set"):
        starrec.evaluate_with_subset("pop", everyone, stranger, CONFIG)
    with pytest.raises(ValueError, match="star needs --model"):
        starrec.evaluate_with_subset("star", everyone, first, CONFIG)


def test_an_llm_system_runs_once_for_all_users_and_a_subset(shop: Path, tmp_path: Path) -> None:
    from tests.test_api import student_model

    everyone = starrec.load_task_set(str(shop), CONFIG, limit=6)
    first = experiment.TaskSet(everyone.dataset, everyone.tasks[:2], everyone.spec,
                               users="eval-200")
    model = student_model()
    records = tmp_path / "star.records.jsonl"
    whole, part = starrec.evaluate_with_subset("star", everyone, first, CONFIG,
                                               chat_model=model, records=records)
    assert whole.result["n_tasks"] == 6 and part.result["n_tasks"] == 2
    assert all(r.ranking[0] == t.candidates[1] for r, t in zip(whole.records, everyone.tasks))
    assert part.result["config"]["users"] == "eval-200"
    # the records resume the whole run: a second call asks the model nothing
    calls = len(model.calls)
    again, _ = starrec.evaluate_with_subset("star", everyone, first, CONFIG,
                                            chat_model=model, records=records)
    assert len(model.calls) == calls and again.metrics == whole.metrics


def load_quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", ROOT / "examples" / "quickstart.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_quickstart_example_runs_on_tiny_data(shop: Path, capsys) -> None:
    quickstart = load_quickstart()
    assert quickstart.main(["--dataset", str(shop), "--sasrec-epochs", "1",
                            "--set", "cst.content=false", "--set", "baselines.sasrec.hidden=16"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[0].startswith("| system |")
    assert [row.split(" | ")[0][2:] for row in rows[1:]] == ["pop", "sasrec", "cst"]
