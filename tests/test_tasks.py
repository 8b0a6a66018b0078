import json

import numpy as np
import pandas as pd
import pytest

from starrec.data.errors import DataError
from starrec.data.schema import Dataset
from starrec.data.splits import fit_interactions, target_mask, task_interactions
from starrec.data.tasks import (
    EVAL_USERS,
    SCENARIOS,
    Task,
    build_split_tasks,
    eval_users,
    load_tasks,
    prepare,
    scenario_tasks,
    validate_tasks,
)
from tests.conftest import make_dataset


def sequences(dataset):
    return dataset.interactions.groupby("user", sort=False)["item"].agg(list)


def test_leave_one_out_targets_are_last_second_last_third_last(tiny):
    seqs = sequences(tiny)
    for split, offset in (("test", 1), ("valid", 2), ("train", 3)):
        for task in build_split_tasks(tiny, split):
            seq = seqs[task.user_id]
            assert task.target == seq[-offset]
            assert task.history == seq[: len(seq) - offset]
            assert task.split == split


def test_candidates_are_target_plus_unseen_distinct_items(tiny):
    seqs = sequences(tiny)
    for task in build_split_tasks(tiny, "test"):
        assert len(task.candidates) == 20 == len(set(task.candidates))
        assert task.target in task.candidates
        others = set(task.candidates) - {task.target}
        assert not others & set(seqs[task.user_id])


def test_candidates_are_seeded_and_shuffled(tiny):
    a = build_split_tasks(tiny, "test", seed=0)
    b = build_split_tasks(tiny, "test", seed=0)
    c = build_split_tasks(tiny, "test", seed=1)
    assert [t.candidates for t in a] == [t.candidates for t in b]
    assert [t.candidates for t in a] != [t.candidates for t in c]
    positions = [t.target_index for t in a]
    assert len(set(positions)) > 1, "the target must not sit at a fixed position"


def test_a_users_candidates_do_not_depend_on_other_users(tiny):
    fewer = make_dataset()
    fewer.interactions = fewer.interactions[fewer.interactions["user"] != "u3"].reset_index(drop=True)
    full = {t.user_id: t.candidates for t in build_split_tasks(tiny, "test")}
    part = {t.user_id: t.candidates for t in build_split_tasks(fewer, "test")}
    assert all(part[u] == full[u] for u in part)


def test_negatives_are_uniform_over_unseen_items():
    # negatives come from the items of the interaction log the user never touched
    dataset = make_dataset(n_users=30, n_items=41, per_user=3)
    universe = set(dataset.interactions["item"])
    seen = set(dataset.interactions.loc[dataset.interactions["user"] == "u0", "item"])
    counts = dict.fromkeys(universe - seen, 0)
    runs = 400
    for seed in range(runs):
        task = next(t for t in build_split_tasks(dataset, "test", seed=seed) if t.user_id == "u0")
        for item in task.candidates:
            if item != task.target:
                counts[item] += 1
    frequencies = np.array(list(counts.values())) / runs
    expected = 19 / len(counts)
    assert frequencies.mean() == pytest.approx(expected)
    assert frequencies.min() > expected - 0.12 and frequencies.max() < expected + 0.12


def test_users_with_too_few_interactions_get_no_task():
    dataset = make_dataset(n_users=3, per_user=2)
    assert build_split_tasks(dataset, "test") == []


def test_fit_interactions_exclude_targets_and_everything_after():
    dataset = make_dataset()
    for split in ("train", "valid", "test"):
        fit = fit_interactions(dataset, split)
        for task in build_split_tasks(dataset, split):
            rows = fit[fit["user"] == task.user_id]
            assert rows["item"].tolist() == task.history
        targets = dataset.interactions[target_mask(dataset, "test")]
        pairs = set(zip(fit["user"], fit["item"]))
        assert not pairs & set(zip(targets["user"], targets["item"]))


def test_scenarios(tiny):
    tasks = build_split_tasks(tiny, "test")
    fit = fit_interactions(tiny, "test")
    short = scenario_tasks(tasks, "short_term", fit)
    assert all(len(t.history) == 5 and t.history == o.history[-5:] for t, o in zip(short, tasks))
    assert all(t.candidates == o.candidates for t, o in zip(short, tasks))
    cold = scenario_tasks(tasks, "item_cold", fit)
    counts = fit["item"].value_counts()
    assert all(counts.get(t.target, 0) <= 5 for t in cold)
    assert len(cold) == sum(counts.get(t.target, 0) <= 5 for t in tasks)
    assert {t.scenario for t in scenario_tasks(tasks, "long_term", fit)} == {"long_term"}
    with pytest.raises(ValueError, match="unknown scenario"):
        scenario_tasks(tasks, "weekend", fit)


def test_eval_users_are_a_seeded_sample_of_sorted_ids():
    dataset = make_dataset(n_users=250, n_items=60, per_user=4)
    tasks = build_split_tasks(dataset, "test")
    chosen = eval_users(tasks)
    assert len(chosen) == EVAL_USERS
    assert chosen == eval_users(list(reversed(tasks))), "must not depend on file order"


def test_prepare_is_byte_identical_and_manifest_matches(tmp_path, tiny):
    first = prepare(tiny, tmp_path / "a")
    second = prepare(tiny, tmp_path / "b")
    assert first["files"] == second["files"]
    for name in first["files"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert {f"test-{s}.jsonl" for s in SCENARIOS if s != "classic"} <= set(first["files"])
    record = json.loads((tmp_path / "a" / "test.jsonl").read_text().splitlines()[0])
    assert list(record)[:6] == ["task_id", "user_id", "scenario", "history", "candidates", "target"]


def test_load_tasks_rejects_broken_records(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"task_id": "a", "user_id": "u", "scenario": "classic", "history": [], '
                    '"candidates": ["x", "y"], "target": "z"}\n')
    with pytest.raises(ValueError, match="line 1.*contain the target"):
        load_tasks(path)
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="line 1"):
        load_tasks(path)


@pytest.mark.slow
def test_ml100k_prepare_twice_meets_the_protocol(tmp_path, ml100k):
    first = prepare(ml100k, tmp_path / "a")
    second = prepare(ml100k, tmp_path / "b")
    assert first["files"] == second["files"]
    assert first["files"]["test.jsonl"]["count"] == 943
    assert first["files"]["eval-200.jsonl"]["count"] == 200
    seen = ml100k.interactions.groupby("user")["item"].agg(set)
    for task in load_tasks(tmp_path / "a" / "test.jsonl"):
        assert len(set(task.candidates)) == 20 and task.target in task.candidates
        assert not (set(task.candidates) - {task.target}) & seen[task.user_id]


# --- explicit cutoffs, validation on load, valid-200 ------------------------------------

def repeating_dataset() -> Dataset:
    """User "r" consumes a, b, c, then b again; others fill a catalogue of 30 items.

    Built directly, not through a loader, because loaders drop repeated pairs."""
    rows = [("r", item, t, 4.0) for t, item in enumerate(["a", "b", "c", "b"], start=1)]
    for u in range(6):
        rows += [(f"o{u}", f"x{(u * 5 + k) % 30}", 10 + k, 3.0) for k in range(6)]
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp", "rating"])
    frame = frame.sort_values("timestamp", kind="stable").reset_index(drop=True)
    ids = ["a", "b", "c", *(f"x{i}" for i in range(30))]
    items = pd.DataFrame({"title": [f"Item {i}" for i in ids]}, index=pd.Index(ids, name="item"))
    return Dataset("repeats", frame, items)


def test_tasks_carry_their_cutoff_position_and_time(tiny):
    for split, offset in (("test", 1), ("valid", 2), ("train", 3)):
        for task in build_split_tasks(tiny, split):
            rows = tiny.interactions[tiny.interactions["user"] == task.user_id]
            assert task.cutoff == len(rows) - offset == len(task.history)
            assert task.cutoff_time == float(rows["timestamp"].iloc[task.cutoff])
    fit = fit_interactions(tiny, "test")
    short = scenario_tasks(build_split_tasks(tiny, "test"), "short_term", fit)
    assert all(t.cutoff > len(t.history) == 5 for t in short)


def test_task_interactions_cut_by_position_not_by_a_repeated_item():
    dataset = repeating_dataset()
    (valid,) = [t for t in build_split_tasks(dataset, "valid") if t.user_id == "r"]
    assert (valid.history, valid.target, valid.cutoff) == (["a", "b"], "c", 2)
    for tasks in ([valid], scenario_tasks([valid], "short_term", dataset.interactions)):
        kept = task_interactions(dataset, tasks, "valid")
        assert kept.loc[kept["user"] == "r", "item"].tolist() == ["a", "b"]
    # a task file written before cutoffs existed: the cut is found by position too
    old = json.loads(valid.to_json())
    del old["cutoff"], old["cutoff_time"]
    kept = task_interactions(dataset, [Task(**{**old, "scenario": "short_term"})], "valid")
    assert kept.loc[kept["user"] == "r", "item"].tolist() == ["a", "b"]


def test_old_task_files_without_cutoffs_stay_readable(tmp_path):
    path = tmp_path / "old.jsonl"
    base = {"user_id": "u", "history": ["a", "b"], "candidates": ["c", "d"], "target": "c"}
    path.write_text(json.dumps({"task_id": "t1", "scenario": "classic", **base}) + "\n"
                    + json.dumps({"task_id": "t2", "scenario": "short_term", **base}) + "\n")
    classic, short = load_tasks(path)
    assert (classic.cutoff, classic.cutoff_time, classic.split) == (2, None, "test")
    assert short.cutoff is None
    assert json.loads(classic.to_json())["cutoff"] == 2


def task_line(**fields) -> str:
    record = {"task_id": "test-u", "user_id": "u", "scenario": "classic", "history": ["a"],
              "candidates": ["b", "c"], "target": "b", "split": "test"}
    record.update(fields)
    return json.dumps({k: v for k, v in record.items() if v is not None})


@pytest.mark.parametrize("fields, message", [
    ({"split": "tset"}, "unknown split 'tset'"),
    ({"scenario": "weekend"}, "unknown scenario 'weekend'"),
    ({"scenario": None}, r"missing field\(s\) \['scenario'\]"),
    ({"colour": "red"}, r"unknown field\(s\) \['colour'\]"),
    ({"candidates": ["b"]}, r"1 candidate\(s\); a ranking needs at least 2"),
    ({"candidates": ["b", "c", "b"]}, "candidates must be distinct"),
    ({"target": "z"}, "candidates must contain the target 'z'"),
    ({"history": "a"}, "history must be a list"),
    ({"cutoff": 0}, "cutoff must be"),
])
def test_load_names_file_and_line_of_a_bad_record(tmp_path, fields, message):
    path = tmp_path / "t.jsonl"
    path.write_text(task_line(task_id="test-ok") + "\n" + task_line(**fields) + "\n")
    with pytest.raises(DataError, match=rf"t\.jsonl: line 2: {message}"):
        load_tasks(path)


def test_load_refuses_repeated_task_ids(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(task_line() + "\n\n" + task_line() + "\n")
    with pytest.raises(DataError, match="line 3: task id 'test-u' repeats the task of line 1"):
        load_tasks(path)


def test_candidate_count_is_the_manifests(tmp_path, tiny):
    prepare(tiny, tmp_path)
    lines = (tmp_path / "test.jsonl").read_text().splitlines()
    record = json.loads(lines[1])
    record["candidates"] = [record["target"], next(c for c in record["candidates"]
                                                   if c != record["target"])]
    lines[1] = json.dumps(record)
    (tmp_path / "test.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match="line 2: 2 candidates; the manifest beside this file says 20"):
        load_tasks(tmp_path / "test.jsonl")


def test_validate_tasks_against_the_data(tmp_path, tiny):
    prepare(tiny, tmp_path)
    path = tmp_path / "test.jsonl"
    tasks = load_tasks(path)
    validate_tasks(tasks, tiny, path)
    first = tasks[0]
    other = next(i for i in tiny.items.index if i not in first.candidates)
    cases = [
        (Task("x", "ghost", "classic", [], ["i1", "i2"], "i1"), "unknown user 'ghost'"),
        (Task("x", first.user_id, "classic", first.history, ["zz", first.target], first.target),
         r"unknown item\(s\) \['zz'\]"),
        (Task("x", first.user_id, "classic", first.history[1:], first.candidates, first.target,
              cutoff=first.cutoff), "shows the whole history"),
        (Task("x", first.user_id, "short_term", first.history[:-1], first.candidates,
              first.target, cutoff=first.cutoff), "history is not the user's"),
        (Task("x", first.user_id, "classic", first.history, [first.target, other], other,
              cutoff=first.cutoff), "target 'i.*' is not the user's interaction at the cutoff"),
        (Task("x", first.user_id, "classic", first.history[:-1], first.candidates,
              first.history[-1], split="test"), "prepared from other data"),
    ]
    for task, message in cases:
        task._line = 7
        with pytest.raises(DataError, match=rf"test\.jsonl: line 7: task x: .*{message}"):
            validate_tasks([task], tiny, path)


def test_prepare_writes_valid_200_of_eval_200s_users_and_time_ties(tmp_path):
    dataset = make_dataset(n_users=230, n_items=60, per_user=4)
    stamps = dataset.interactions["timestamp"].to_numpy().copy()
    manifest = prepare(dataset, tmp_path)
    eval_tasks = load_tasks(tmp_path / "eval-200.jsonl")
    valid_tasks = load_tasks(tmp_path / "valid-200.jsonl")
    assert len(valid_tasks) == 200 == manifest["files"]["valid-200.jsonl"]["count"]
    assert {t.user_id for t in valid_tasks} == {t.user_id for t in eval_tasks}
    assert {t.split for t in valid_tasks} == {"valid"}
    assert "valid-200-short_term.jsonl" in manifest["files"]
    assert manifest["target_time_ties"] == {"train": 0.0, "valid": 0.0, "test": 0.0}
    assert (dataset.interactions["timestamp"].to_numpy() == stamps).all()
    # every test target now shares its time with the interaction before it
    tied = dataset.interactions.copy()
    last = tied.groupby("user").cumcount(ascending=False) == 0
    before = tied.groupby("user").cumcount(ascending=False) == 1
    tied.loc[last, "timestamp"] = tied.loc[before].set_index("user")["timestamp"].reindex(
        tied.loc[last, "user"]).to_numpy()
    tied = Dataset("tied", tied, dataset.items)
    assert prepare(tied, tmp_path / "tied")["target_time_ties"]["test"] == 1.0
