import json

import numpy as np
import pytest

from starrec.data.splits import fit_interactions, target_mask
from starrec.data.tasks import (
    EVAL_USERS,
    SCENARIOS,
    build_split_tasks,
    eval_users,
    load_tasks,
    prepare,
    scenario_tasks,
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
