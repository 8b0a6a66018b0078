"""Task sets keyed by the data, the leak guard, and bad input at the data and cst commands
(issue 12: stale task files, cuts by position, one-line errors)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from starrec.cli.main import app
from starrec import experiment
from starrec.config import StarConfig
from starrec.data.errors import DataError, LeakError
from starrec.data.generic import load_generic
from starrec.data.prepared import load_task_set, prepared_tasks
from starrec.data.schema import Dataset
from starrec.data.splits import check_no_leak, fit_interactions, task_interactions
from starrec.data.tasks import build_split_tasks, load_tasks
from tests.conftest import write_dataset_folder

runner = CliRunner()
NO_CONTENT = ["--set", "cst.content=false"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("STAR_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def shop(tmp_path):
    write_dataset_folder(tmp_path / "shop", n_users=30, n_items=50)
    return tmp_path / "shop"


def load(folder):
    return load_generic(folder / "interactions.csv", folder / "items.csv", name=folder.name)


def append_newer_interaction(folder, user: str = "u3") -> str:
    """A newer interaction of `user` with an item it never had; returns the item."""
    frame = pd.read_csv(folder / "interactions.csv", dtype=str)
    seen = set(frame.loc[frame["user"] == user, "item"])
    item = next(i for i in pd.read_csv(folder / "items.csv", dtype=str)["item"] if i not in seen)
    late = int(frame["timestamp"].astype(int).max()) + 100
    frame.loc[len(frame)] = [user, item, str(late), "4.0"]
    frame.to_csv(folder / "interactions.csv", index=False)
    return item


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# --- task sets keyed by the data --------------------------------------------------------


def test_a_newer_interaction_gives_new_tasks_not_the_stale_file(home, shop):
    cfg = StarConfig()
    before = {t.user_id: t for t in experiment.load_task_set(str(shop), cfg)}
    item = append_newer_interaction(shop)
    after = {t.user_id: t for t in experiment.load_task_set(str(shop), cfg)}
    assert after["u3"].target == item and before["u3"].target in after["u3"].history
    # the stale file would have put its target into the fit data: the guard says so
    data = load(shop)
    with pytest.raises(LeakError, match="task test-u3 .*only the 7 before the target"):
        check_no_leak([before["u3"]], fit_interactions(data, "test"), "fit data of pop")
    check_no_leak(list(after.values()), fit_interactions(data, "test"), "fit data of pop")


def test_the_default_folder_is_keyed_by_fingerprint_and_protocol(home, shop):
    data = load(shop)
    first = prepared_tasks(str(shop), seed=0, dataset=data)
    assert data.fingerprint() in first.name and "seed0" in first.name
    assert prepared_tasks(str(shop), seed=0, dataset=data) == first
    assert prepared_tasks(str(shop), seed=1, dataset=data) != first
    append_newer_interaction(shop)
    assert prepared_tasks(str(shop), seed=0) != first
    manifest = json.loads((first / "manifest.json").read_text())
    assert manifest["data_fingerprint"] == data.fingerprint() and manifest["n_candidates"] == 20


def test_an_edited_default_folder_is_prepared_again(home, shop):
    data = load(shop)
    folder = prepared_tasks(str(shop), dataset=data)
    original = (folder / "test.jsonl").read_bytes()
    (folder / "test.jsonl").write_text("")
    assert prepared_tasks(str(shop), dataset=data) == folder
    assert (folder / "test.jsonl").read_bytes() == original


def test_an_explicit_folder_of_other_data_stops_with_what_differs(home, shop, tmp_path):
    out = tmp_path / "tasks"
    data = load(shop)
    assert prepared_tasks(str(shop), out=out, dataset=data) == out
    append_newer_interaction(shop)
    with pytest.raises(DataError, match=r"tasks: .*data_fingerprint .* \(the data now: "):
        prepared_tasks(str(shop), out=out)
    with pytest.raises(DataError, match=r"seed 0 \(wanted: 3\)"):
        prepared_tasks(str(shop), seed=3, out=out, dataset=data)


def test_a_stale_task_file_given_explicitly_is_refused(home, shop, tmp_path):
    out = tmp_path / "tasks"
    prepared_tasks(str(shop), out=out)
    append_newer_interaction(shop)
    with pytest.raises(DataError, match=r"test\.jsonl: line 24: task test-u3: .*prepared from other"):
        load_task_set(out / "test.jsonl", load(shop))
    result = runner.invoke(app, ["eval", "--system", "pop", "--dataset", str(shop), "--tasks",
                                 str(out / "test.jsonl"), "--out", str(tmp_path / "r.json")])
    assert "prepared from other data" in one_error_line(result)


def test_unknown_users_and_items_are_refused_not_scored(home, shop, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "test-x", "user_id": "nobody", "scenario": "classic",
                               "history": [], "candidates": ["zz1", "zz2"], "target": "zz1"}) + "\n")
    result = runner.invoke(app, ["eval", "--system", "pop", "--dataset", str(shop), "--tasks",
                                 str(bad), "--out", str(tmp_path / "r.json")])
    assert "bad.jsonl: line 1: task test-x: unknown user 'nobody'" in one_error_line(result)
    assert not (tmp_path / "r.json").exists()


def test_users_sets_imply_their_split(home, shop):
    cfg = StarConfig()
    valid = experiment.load_task_set(str(shop), cfg, users="valid-200")
    test = experiment.load_task_set(str(shop), cfg, users="eval-200")
    assert {t.split for t in valid} == {"valid"} and {t.split for t in test} == {"test"}
    assert {t.user_id for t in valid} == {t.user_id for t in test}
    short = experiment.load_task_set(str(shop), cfg, split="valid", users="valid-200", scenario="short_term")
    assert {(t.split, t.scenario) for t in short} == {("valid", "short_term")}
    with pytest.raises(ValueError, match="--users valid-200 is a set of valid tasks; it "
                                         "contradicts --split test"):
        experiment.load_task_set(str(shop), cfg, split="test", users="valid-200")


# --- the leak guard ---------------------------------------------------------------------


def test_check_no_leak_names_the_target_and_later_rows():
    rows = [("r", item, t, 4.0) for t, item in enumerate("abcd", start=1)]
    rows += [("o", f"x{k}", k, 4.0) for k in range(25)]
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp", "rating"])
    items = pd.DataFrame({"title": list("abcd") + [f"x{k}" for k in range(25)]},
                         index=pd.Index(list("abcd") + [f"x{k}" for k in range(25)], name="item"))
    dataset = Dataset("d", frame.sort_values("timestamp", kind="stable"), items)
    (task,) = [t for t in build_split_tasks(dataset, "valid") if t.user_id == "r"]
    check_no_leak([task], task_interactions(dataset, [task], "valid"), "store")
    with pytest.raises(LeakError, match="store: task valid-r .* 4 of the user's interactions"):
        check_no_leak([task], dataset.interactions, "store")
    later_row = frame[~((frame["user"] == "r") & frame["item"].isin(["a", "c"]))]  # b, d
    with pytest.raises(LeakError, match="1 interaction\\(s\\) after the target's time 3"):
        check_no_leak([task], later_row, "store")
    target_only = frame[(frame["user"] != "r") | frame["item"].isin(["a", "c"])]
    target_only = target_only.assign(timestamp=target_only["timestamp"].where(
        target_only["user"] != "r", 1))
    with pytest.raises(LeakError, match="the data holds its target 'c'"):
        check_no_leak([task], target_only, "store")


def test_store_for_runs_the_guard_before_building(home, shop, monkeypatch):
    cfg = StarConfig()
    data = load(shop)
    tasks = experiment.load_task_set(data, cfg, spec=str(shop))
    monkeypatch.setattr("starrec.data.splits.task_interactions",
                        lambda dataset, task_list, split: dataset.interactions)
    built = []
    monkeypatch.setattr("starrec.cst.store.ensure_store", lambda *a, **k: built.append(a))
    with pytest.raises(LeakError, match="evidence store of the test tasks"):
        experiment.evidence_store_path(tasks, cfg)
    assert not built


# --- bad input at `star data prepare`, `star cst build`, `star cst show` -----------------


def test_data_prepare_unknown_dataset(home, tmp_path):
    line = one_error_line(runner.invoke(app, ["data", "prepare", "--dataset",
                                              str(tmp_path / "nowhere")]))
    assert "unknown dataset" in line


def test_cst_build_bad_inputs(home, shop, tmp_path):
    missing = one_error_line(runner.invoke(app, ["cst", "build", "--dataset", str(shop), "--tasks",
                                                 str(tmp_path / "missing.jsonl"), *NO_CONTENT]))
    assert "missing.jsonl: task file not found" in missing
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"task_id": "t", "user_id": "u1", "scenario": "classic",
                               "history": [], "candidates": ["i1", "i2"], "target": "i1",
                               "split": "tset"}) + "\n")
    line = one_error_line(runner.invoke(app, ["cst", "build", "--dataset", str(shop), "--tasks",
                                              str(bad), *NO_CONTENT]))
    assert "bad.jsonl: line 1: unknown split 'tset'" in line
    line = one_error_line(runner.invoke(app, ["cst", "build", "--dataset", str(tmp_path / "no"),
                                              *NO_CONTENT]))
    assert "unknown dataset" in line
    refused = runner.invoke(app, ["cst", "build", "--dataset", str(shop), "--split", "tset"])
    assert refused.exit_code == 2 and "tset" in refused.output


def test_cst_show_bad_inputs(home, shop, tmp_path):
    for task, message in (("test-nobody", "no task 'test-nobody'"),
                          ("bogus", "task id 'bogus': expected SPLIT-USER"),
                          ("tset-u1", "task id 'tset-u1'")):
        line = one_error_line(runner.invoke(app, ["cst", "show", "--task", task, "--dataset",
                                                  str(shop), *NO_CONTENT]))
        assert message in line
    line = one_error_line(runner.invoke(app, ["cst", "show", "--task", "test-u1", "--dataset",
                                              str(tmp_path / "nowhere"), *NO_CONTENT]))
    assert "unknown dataset" in line


def test_cst_show_reads_user_ids_with_dashes(home, tmp_path):
    folder = tmp_path / "dashes"
    write_dataset_folder(folder, n_users=12, n_items=40)
    frame = pd.read_csv(folder / "interactions.csv", dtype=str)
    frame["user"] = frame["user"].str.replace("u", "user-", regex=False)
    frame.to_csv(folder / "interactions.csv", index=False)
    for task in ("test-user-3", "test-short_term-user-3", "valid-user-3"):
        result = runner.invoke(app, ["cst", "show", "--task", task, "--dataset", str(folder),
                                     *NO_CONTENT])
        assert result.exit_code == 0, result.output
        assert f"task {task}  user user-3" in result.output


def test_eval_contradicting_users_and_split_is_one_line(home, shop, tmp_path):
    line = one_error_line(runner.invoke(app, [
        "eval", "--system", "pop", "--dataset", str(shop), "--users", "valid-200", "--split",
        "test", "--out", str(tmp_path / "r.json")]))
    assert "--users valid-200 is a set of valid tasks" in line
    refused = runner.invoke(app, ["eval", "--system", "pop", "--dataset", str(shop), "--users",
                                  "eval-300", "--out", str(tmp_path / "r.json")])
    assert refused.exit_code == 2 and "eval-300" in refused.output
