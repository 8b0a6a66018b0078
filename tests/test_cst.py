import os

import jsonschema
import numpy as np
import pandas as pd
import pytest

from starrec.config import CSTConfig
from starrec.cst.evidence import candidate_evidence
from starrec.cst.signals import build_graph, cooccurrence_neighbours, percentile_ranks, transition_neighbours
from starrec.cst.store import EvidenceStore, build_store, ensure_store, inputs_hash
from starrec.cst import toolbox
from starrec.cst.tools import ToolExecutor, task_tool_calls, tool_names, tool_specs
from starrec.cst.verbalize import approx_tokens, fit_budget
from starrec.data.schema import Dataset
from starrec.data.splits import target_mask, task_interactions
from starrec.data.tasks import build_split_tasks

NO_CONTENT = CSTConfig(content=False)


def store_for(dataset: Dataset, tasks, tmp_path, config=NO_CONTENT, name="s.sqlite"):
    allowed = task_interactions(dataset, tasks, tasks[0].split)
    return EvidenceStore(build_store(allowed, dataset.items, tmp_path / name, config))


def brute_cooccurrence(interactions):
    users = interactions.groupby("user")["item"].agg(set)
    counts = {}
    for items in users:
        for a in items:
            for b in items:
                if a != b:
                    counts[(a, b)] = counts.get((a, b), 0) + 1
    return counts


def test_cooccurrence_neighbours_match_brute_force(tiny):
    graph = build_graph(tiny.interactions, tiny.items.index)
    table = cooccurrence_neighbours(graph, k=5, block=7)  # small blocks cross block edges
    counts = brute_cooccurrence(tiny.interactions)
    pop = tiny.interactions["item"].value_counts()
    for item, rank, neighbour, count, strength in zip(table.item, table.rank, table.neighbour,
                                                       table.count, table.strength):
        a, b = graph.items[item], graph.items[neighbour]
        assert counts[(a, b)] == count
        assert strength == pytest.approx(count / np.sqrt(pop[a] * pop[b]))
    # ranks are by strength, and nothing stronger was left out
    for item in np.unique(table.item):
        rows = table.item == item
        assert list(table.rank[rows]) == list(range(1, rows.sum() + 1))
        assert np.all(np.diff(table.strength[rows]) <= 1e-12)
        a = graph.items[item]
        weakest = table.strength[rows].min()
        others = [c / np.sqrt(pop[a] * pop[b]) for (x, b), c in counts.items()
                  if x == a and graph.items.get_loc(b) not in set(table.neighbour[rows])]
        assert all(o <= weakest + 1e-12 for o in others)


def test_transitions_count_consecutive_items_per_user():
    frame = pd.DataFrame({"user": ["u", "u", "u", "v", "v", "w"],
                          "item": ["a", "b", "c", "a", "b", "a"],
                          "timestamp": [1, 2, 3, 1, 2, 1]})
    graph = build_graph(frame, pd.Index(["a", "b", "c"]))
    dense = graph.transitions.toarray()
    assert dense[0, 1] == 2 and dense[1, 2] == 1 and dense.sum() == 3
    table = transition_neighbours(graph, k=3)
    first = table.item == 0
    assert table.count[first][0] == 2 and table.strength[first][0] == 1.0


def test_percentiles():
    assert list(percentile_ranks(np.array([5, 1, 3, 3]))) == [75.0, 0.0, 25.0, 25.0]


def test_store_is_versioned_and_reused(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("STAR_HOME", str(tmp_path))
    tasks = build_split_tasks(tiny, "test")
    allowed = task_interactions(tiny, tasks, "test")
    first = ensure_store(allowed, tiny.items, NO_CONTENT, dataset="tiny", split="test")
    stamp = os.stat(first).st_mtime_ns
    again = ensure_store(allowed, tiny.items, NO_CONTENT, dataset="tiny", split="test")
    assert again == first and os.stat(again).st_mtime_ns == stamp
    other = ensure_store(allowed, tiny.items, CSTConfig(content=False, neighbours=3),
                         dataset="tiny", split="test")
    assert other != first
    assert EvidenceStore(first).meta["version"] == inputs_hash(allowed, tiny.items, NO_CONTENT)
    assert not list(tmp_path.rglob("*.tmp*")), "no half-written store is left behind"


def test_two_processes_asking_for_one_store_build_it_once(tiny, tmp_path, monkeypatch):
    """Two runs sharing a cache (a server and a benchmark) ask for the same store at
    once: one builds it, the other waits and reuses it; neither sees the other's half."""
    import threading
    import time

    from starrec.cst import store as store_module
    from tests.conftest import run_together

    monkeypatch.setenv("STAR_HOME", str(tmp_path))
    tasks = build_split_tasks(tiny, "test")
    allowed = task_interactions(tiny, tasks, "test")
    builds, real_build = [], store_module.build_store

    def slow_build(*args, **kwargs):
        builds.append(threading.get_ident())
        time.sleep(0.3)  # the other asker arrives while this one builds
        return real_build(*args, **kwargs)

    monkeypatch.setattr(store_module, "build_store", slow_build)
    start, paths, errors = threading.Barrier(2), [], []

    def ask():
        start.wait()
        try:
            paths.append(ensure_store(allowed, tiny.items, NO_CONTENT, dataset="tiny",
                                      split="test"))
        except Exception as error:  # noqa: BLE001 - the test reports it
            errors.append(error)

    run_together([ask, ask])
    assert not errors and len(builds) == 1
    assert paths[0] == paths[1] and EvidenceStore(paths[0]).meta["n_interactions"] == len(allowed)
    assert not list(tmp_path.rglob("*.tmp*"))


def test_private_temporary_names_never_repeat(tmp_path):
    from starrec.core.files import private_temp, write_text_atomic

    target = tmp_path / "a.json"
    assert len({private_temp(target) for _ in range(100)}) == 100
    write_text_atomic(target, "one")
    write_text_atomic(target, "two")
    assert target.read_text() == "two" and [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_store_holds_no_target_and_nothing_after_it(tiny, tmp_path):
    for split in ("test", "train"):
        tasks = build_split_tasks(tiny, split)
        store = store_for(tiny, tasks, tmp_path, name=f"{split}.sqlite")
        for task in tasks:
            assert store.user_history(task.user_id) == task.history
        test_rows = tiny.interactions[target_mask(tiny, "test")]
        stored = pd.read_sql_query("SELECT user, item FROM interactions", store.db)
        stored["item"] = store.item_ids[stored["item"].to_numpy()]
        assert not set(zip(test_rows["user"], test_rows["item"])) & set(zip(stored["user"], stored["item"]))


@pytest.mark.parametrize("split", ["test", "train"])
def test_removing_the_target_interaction_does_not_change_the_evidence(tiny, tmp_path, split):
    tasks = build_split_tasks(tiny, split)
    task = tasks[2]
    row = (tiny.interactions["user"] == task.user_id) & (tiny.interactions["item"] == task.target)
    assert row.sum() == 1
    without = Dataset("tiny", tiny.interactions[~row].reset_index(drop=True), tiny.items)
    full = store_for(tiny, tasks, tmp_path, name="full.sqlite")
    cut = store_for(without, tasks, tmp_path, name="cut.sqlite")
    assert [e.to_dict() for e in candidate_evidence(full, task)] == \
        [e.to_dict() for e in candidate_evidence(cut, task)]
    calls = [("candidate_evidence", {}), ("similar_users", {"user_id": task.user_id}),
             ("item_neighbours", {"item_id": task.history[-1]}), ("sequence_candidates", {}),
             ("popularity", {"item_ids": task.candidates})]
    answers = [[ToolExecutor(store, task).call(n, a).text for n, a in calls] for store in (full, cut)]
    assert answers[0] == answers[1]


def test_candidate_evidence_numbers(tmp_path):
    frame = pd.DataFrame({
        "user": ["u1", "u1", "u2", "u2", "u3", "u3", "me"],
        "item": ["a", "b", "a", "b", "a", "c", "a"],
        "timestamp": [1, 2, 1, 2, 1, 2, 1]})
    items = pd.DataFrame({"title": ["A", "B", "C", "D"]}, index=pd.Index(list("abcd"), name="item"))
    path = build_store(frame, items, tmp_path / "s.sqlite", NO_CONTENT)
    from starrec.data.tasks import Task

    task = Task("t", "me", "classic", ["a"], ["b", "c", "d"], "b")
    b, c, d = candidate_evidence(EvidenceStore(path), task)
    assert (b.cooc_best_item, b.cooc_best_count, b.cooc_best_base) == ("a", 2, 4)
    assert b.transition_count == 2 and c.transition_count == 1 and d.transition_count == 0
    assert b.user_votes == 2 and c.user_votes == 1 and b.similar_users == 3
    assert not d.known and d.pop == 0
    assert b.cooc_score == pytest.approx(2 / np.sqrt(4 * 2))


def test_tool_specs_are_valid_openai_functions():
    assert set(tool_names()) == {"item_neighbours", "next_items", "content_neighbours", "popularity",
                                 "similar_users", "sequence_candidates", "sequence_model",
                                 "factor_model", "candidate_evidence"}
    for spec in tool_specs():
        assert spec["type"] == "function" and spec["function"]["description"]
        jsonschema.Draft202012Validator.check_schema(spec["function"]["parameters"])


def test_each_tool_is_one_object_described_in_the_resources(monkeypatch):
    for name, tool in toolbox.TOOLS.items():
        assert tool.name == name and tool.spec["function"]["name"] == name
        assert tool.description and tool.parameters["type"] == "object"
    # a tool without a description (or a description without a tool) is an error, not a
    # tool the models are never told about
    monkeypatch.setitem(toolbox.TOOLS, "ghost", toolbox.SequenceCandidates())
    tool_specs.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="ghost"):
            tool_specs()
    finally:
        monkeypatch.undo()
        tool_specs.cache_clear()
    assert len(tool_specs()) == len(toolbox.TOOLS)


@pytest.mark.parametrize("latent", [False, True])
def test_every_call_a_tool_offers_runs(tiny, tmp_path, latent):
    tasks = build_split_tasks(tiny, "test")
    store = store_for(tiny, tasks, tmp_path, config=CSTConfig(content=False, latent=latent))
    task = tasks[0]
    executor = ToolExecutor(store, task)
    calls = task_tool_calls(tool_specs(), task, store, history_items=3)
    offered = {call.name for call in calls}
    # a call that could only return an error is not offered: content without embeddings,
    # latent models on a store built without them
    missing = {"content_neighbours"} | (set() if latent else {"sequence_model", "factor_model"})
    assert offered == set(tool_names()) - missing
    assert [c.arguments for c in calls if c.name == "item_neighbours"] == \
        [{"item_id": i} for i in reversed(task.history[-3:])]
    for call in calls:
        result = executor.call(call.name, call.arguments)
        assert result.ok, (call, result.text)
    assert sum(executor.stats.errors.values()) == 0


def test_executor_returns_errors_never_raises(tiny, tmp_path):
    tasks = build_split_tasks(tiny, "test")
    tools = ToolExecutor(store_for(tiny, tasks, tmp_path), tasks[0])
    cases = [
        ("nope", "{}", "unknown tool 'nope'"),
        ("item_neighbours", {"item_id": "zzz"}, "Unknown item id 'zzz'"),
        ("item_neighbours", {}, "'item_id' is a required property"),
        ("item_neighbours", {"item_id": "i1", "k": "five"}, "invalid k"),
        ("item_neighbours", {"item_id": "i1", "k": 500}, "invalid k"),
        ("item_neighbours", '{"item_id": ', "not valid JSON"),
        ("popularity", {"item_ids": "i1"}, "invalid item_ids"),
        ("similar_users", {"user_id": "ghost"}, "unknown user id 'ghost'"),
        ("candidate_evidence", {"item_ids": ["i39999"]}, "not candidates of this task"),
        ("content_neighbours", {"item_id": "i1"}, "without content signals"),
    ]
    for name, arguments, message in cases:
        result = tools.call(name, arguments)
        assert not result.ok and result.text.startswith("Error:") and message in result.text, result.text
    assert sum(tools.stats.errors.values()) == len(cases)
    ok = tools.call("item_neighbours", {"item_id": tasks[0].history[-1], "k": 2})
    assert ok.ok and ok.text.count("\n") <= 1 and "users who consumed" in ok.text
    assert tools.stats.calls["item_neighbours"] == 6
    # the ids a call names that the store does not hold, found before it runs
    known = tasks[0].history[-1]
    assert tools.unknown_items({"item_id": "zzz", "k": 5}) == ["zzz"]
    assert tools.unknown_items({"item_ids": [known, "i39999", "zzz"]}) == ["i39999", "zzz"]
    assert tools.unknown_items({"item_id": known}) == [] == tools.unknown_items({"recent": 3})


def test_numeric_ids_are_accepted(tmp_path):
    frame = pd.DataFrame({"user": ["1", "1", "2", "2"], "item": ["50", "181", "50", "181"],
                          "timestamp": [1, 2, 1, 2]})
    items = pd.DataFrame({"title": ["Star Wars", "Return of the Jedi"]},
                         index=pd.Index(["50", "181"], name="item"))
    tools = ToolExecutor(EvidenceStore(build_store(frame, items, tmp_path / "s.sqlite", NO_CONTENT)))
    result = tools.call("item_neighbours", {"item_id": 50})
    assert result.ok and "Of the 2 users who consumed Star Wars, 2 also consumed Return of the Jedi" in result.text


def test_budget_truncates_and_says_so():
    lines = [f"line {i} " + "x" * 40 for i in range(10)]
    kept = fit_budget(lines, budget=40)
    assert len(kept) < 10 and "more lines omitted" in kept[-1]
    assert sum(approx_tokens(l) for l in kept[:-1]) <= 40
    assert fit_budget(lines[:2], budget=1000) == lines[:2]


def test_content_signals_with_minilm(tmp_path):
    frame = pd.DataFrame({"user": ["u", "u"], "item": ["a", "b"], "timestamp": [1, 2]})
    items = pd.DataFrame(
        {"title": ["Star Wars (1977)", "Return of the Jedi (1983)", "Pride and Prejudice (1995)"],
         "genres": ["Sci-Fi, Adventure", "Sci-Fi, Adventure", "Romance, Drama"]},
        index=pd.Index(["a", "b", "c"], name="item"))
    store = EvidenceStore(build_store(frame, items, tmp_path / "s.sqlite", CSTConfig(), progress=False))
    assert store.embeddings.shape == (3, 384)
    assert np.allclose(np.linalg.norm(store.embeddings, axis=1), 1, atol=1e-5)
    top = store.neighbours("content", "a", 1)[0]
    assert top.item == "b"
    text = ToolExecutor(store).call("content_neighbours", {"item_id": "c"}).text
    assert "Pride and Prejudice" in text and "similarity" in text


def test_recent_window_ends_at_the_cutoff_strictly_before_it():
    from starrec.cst.signals import Timeline

    stamps = np.arange(0, 101, dtype=float)  # one interaction a second, item = second % 3
    timeline = Timeline.build(stamps[::-1], (np.arange(0, 101) % 3)[::-1], n_items=4)
    counts = timeline.recent_popularity(0.1, cutoff_time=50.0)  # window [45, 50)
    assert counts.tolist() == [2.0, 2.0, 1.0, 0.0]  # 45, 48 | 46, 49 | 47
    assert timeline.recent_popularity(0.1, cutoff_time=0.0).sum() == 0
    assert timeline.recent_popularity(0.1, cutoff_time=None).sum() == 11  # [90, 100]


def test_recent_popularity_of_a_task_ignores_interactions_after_its_cutoff(tiny, tmp_path):
    tasks = build_split_tasks(tiny, "test")
    task = max(tasks, key=lambda t: t.cutoff_time)
    end = tiny.interactions["timestamp"].max()
    late = pd.DataFrame({"user": "late", "item": task.candidates[:6],
                         "timestamp": [end + 1000 + 10 * k for k in range(6)], "rating": 4.0})
    grown = Dataset("tiny", pd.concat([tiny.interactions, late], ignore_index=True), tiny.items)
    grown_tasks = build_split_tasks(grown, "test")
    (same,) = [t for t in grown_tasks if t.user_id == task.user_id]
    assert same == task
    before = store_for(tiny, tasks, tmp_path, name="before.sqlite")
    after = store_for(grown, grown_tasks, tmp_path, name="after.sqlite")
    assert after.meta["n_interactions"] > before.meta["n_interactions"]
    recent = [[e.recent_pct for e in candidate_evidence(store, task)] for store in (before, after)]
    assert recent[0] == recent[1] and max(recent[0]) > 0
    lines = [ToolExecutor(store, task).call("popularity", {"item_ids": task.candidates}).text
             for store in (before, after)]
    assert [l.split("recent popularity")[1] for l in lines[0].splitlines()] == \
        [l.split("recent popularity")[1] for l in lines[1].splitlines()]


def test_store_has_no_global_recent_columns(world):
    store, _ = world
    assert "recent_pct" not in store.items.columns
    columns = [row[1] for row in store.db.execute("PRAGMA table_info(items)")]
    assert "recent" not in columns and "recent_pct" not in columns


def test_build_laps_keep_each_stages_own_peak_memory():
    from starrec.cst.store import Laps, _peak_rss_mb

    if _peak_rss_mb() is None:
        pytest.skip("no /proc/self/status here")
    import mmap

    laps = Laps()
    laps("before")
    # 64 MiB of fresh pages, touched, then returned: a map of its own, since a heap
    # allocation may reuse pages a long test session already holds
    block = mmap.mmap(-1, 64 * 2**20)
    block.write(b"\1" * len(block))
    block.close()
    laps("large")
    laps("after")
    assert list(laps.peak_mb) == ["before", "large", "after"]
    assert laps.peak_mb["large"] >= laps.peak_mb["before"] + 32
    # the peak is set back after each stage: the next stage does not inherit it
    assert laps.peak_mb["after"] <= laps.peak_mb["large"] - 32


def test_item_embeddings_keep_the_given_order_when_batched_by_length():
    """Texts of very different lengths, batched by length: each row is the embedding of
    its own text, as embedding it alone gives (padding is masked out)."""
    from starrec.cst.content import embed_texts

    texts = ["Heat (1995). Action, Crime, Thriller, and a long description " * 4, "Up (2009)",
             "Toy Story (1995). Animation, Children's, Comedy", "Alien (1979)"]
    together = embed_texts(texts, batch_size=2, progress=False)
    alone = np.concatenate([embed_texts([text], progress=False) for text in texts])
    assert together.shape == (4, 384)
    assert np.allclose(together, alone, atol=1e-4)
    assert embed_texts([], progress=False).shape == (0, 384)
