"""The DuckDB engine of the CST store (`starrec.cst.sql`) writes the store the memory
engine writes: same tables, same rows, floats within 1e-9 relative, same tie order, and
the same latent models (fitted by the same Python code on the rows each store holds)."""

import json
import logging
import math
import sqlite3

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from starrec.cli.main import app
from starrec.config import CSTConfig
from starrec.cst.signals import build_graph, transition_neighbours
from starrec.cst.store import EXECUTION_SETTINGS, EvidenceStore, build_store, inputs_hash
from starrec.data.splits import task_interactions
from starrec.data.tasks import build_split_tasks
from tests.conftest import write_dataset_folder

pytest.importorskip("duckdb")
from starrec.cst.sql import build_store_duckdb, item_blocks, memory_bytes  # noqa: E402

MEMORY = CSTConfig(content=False, neighbours=3)
DUCKDB = MEMORY.model_copy(update={"engine": "duckdb", "duckdb_threads": 2})
KEYS = {"items": "idx", "interactions": "seq", "neighbours": "kind, item, rank",
        "transitions": "item, next", "embeddings": "idx", "latent": "model",
        "ranker": "key"}
# what a fitted ranker's meta says of how long its fit took, not of what it is
RANKER_TIMING = "fit_s"


def tables(path) -> dict[str, list[tuple]]:
    db = sqlite3.connect(path)
    try:
        names = sorted(name for (name,) in db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'"))
        assert names == sorted([*KEYS, "meta"])
        out = {name: db.execute(f"SELECT * FROM {name} ORDER BY {key}").fetchall()
               for name, key in KEYS.items()}
        out["ranker"] = [(key, {k: v for k, v in json.loads(meta).items() if k != RANKER_TIMING},
                          model) for key, meta, model in out["ranker"]]
        out["meta"] = [(k, json.loads(v)) for k, v in db.execute("SELECT * FROM meta ORDER BY key")]
        return out
    finally:
        db.close()


def assert_same_store(left, right, *, same_version: bool = True) -> None:
    """Every table row for row; floats within 1e-9 relative; meta but for what says how
    (and how fast) the store was built."""
    a, b = tables(left), tables(right)
    for name in KEYS:
        assert len(a[name]) == len(b[name]), name
        for x, y in zip(a[name], b[name]):
            assert len(x) == len(y)
            for u, v in zip(x, y):
                if isinstance(u, float) or isinstance(v, float):
                    assert math.isclose(u, v, rel_tol=1e-9, abs_tol=0.0), (name, x, y)
                else:
                    assert u == v, (name, x, y)
    skip = {"timings_s", "peak_rss_mb", "build_s", "config", *(() if same_version else ("version",))}
    meta_a = {k: v for k, v in a["meta"] if k not in skip}
    meta_b = {k: v for k, v in b["meta"] if k not in skip}
    assert meta_a == meta_b
    config_a, config_b = (dict(dict(t["meta"])["config"]) for t in (a, b))
    for key in EXECUTION_SETTINGS:
        config_a.pop(key), config_b.pop(key)
    assert config_a == config_b


def synthetic_log(seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A log with what the engines could disagree on: repeated (user, item) rows, an item
    followed by itself, items the catalogue lacks, catalogue items nobody consumed, users
    and items whose ids sort differently as text and as numbers, and many tied
    strengths (few users, small k)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(40):
        length = int(rng.integers(1, 14))
        picks = rng.choice(33, size=length, p=np.r_[np.full(5, 0.1), np.full(28, 0.5 / 28)])
        for k, item in enumerate(picks):
            rows.append((f"u{u}", f"i{item}", 100 * u + k))
    rows += [("u0", "new-b", 5000), ("u1", "new-a", 5001), ("u1", "new-a", 5002),
             ("u2", "new-b", 5003), ("u2", "i3", 5004)]
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    frame = frame.sort_values(["user", "timestamp"], kind="stable").reset_index(drop=True)
    titles = [f"Item {i}" for i in range(32)] + [None, "Never seen", "Nor this"]
    ids = pd.Index([f"i{i}" for i in range(33)] + ["z9", "a0"], name="item")
    catalogue = pd.DataFrame({"title": titles, "genres": ["a|b"] * 35}, index=ids)
    return frame, catalogue


def test_engines_write_the_identical_store_on_a_synthetic_log(tmp_path, caplog):
    frame, catalogue = synthetic_log()
    memory = build_store(frame, catalogue, tmp_path / "memory.sqlite", MEMORY, progress=False)
    with caplog.at_level(logging.INFO, logger="starrec.cst.sql"):
        duck = build_store_duckdb(frame, catalogue, tmp_path / "duckdb.sqlite", DUCKDB,
                                  progress=False, block_groups=40)
    assert any("block(s)" in r.message and not r.message.endswith(" 1 block(s) of items")
               for r in caplog.records)  # several blocks: their edges are crossed
    assert_same_store(memory, duck)
    assert {row[0] for row in tables(duck)["latent"]} == {"als", "sasrec"}
    # the same through build_store's switch; no work folder is left beside the store
    switched = build_store(frame, catalogue, tmp_path / "switched.sqlite", DUCKDB, progress=False)
    assert_same_store(memory, switched)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["duckdb.sqlite", "memory.sqlite",
                                                          "switched.sqlite"]
    store = EvidenceStore(duck)
    assert store.meta["config"]["engine"] == "duckdb"
    assert store.neighbours("cooccurrence", "i0", 3)  # readable as any store


def test_the_stores_hold_ties_broken_by_index_and_items_the_catalogue_lacks(tmp_path):
    frame, catalogue = synthetic_log()
    path = build_store_duckdb(frame, catalogue, tmp_path / "s.sqlite", DUCKDB, progress=False)
    db = sqlite3.connect(path)
    ids = [item for (item,) in db.execute("SELECT item FROM items ORDER BY idx")]
    assert ids[:35] == list(catalogue.index) and ids[35:] == ["new-b", "new-a"]  # first seen
    rows = db.execute("SELECT kind, item, rank, neighbour, strength FROM neighbours "
                      "ORDER BY kind, item, rank").fetchall()
    ties = 0
    for (kind, item, rank, n, s), (kind2, item2, _, n2, s2) in zip(rows, rows[1:]):
        if (kind, item) == (kind2, item2):
            assert s > s2 or (s == s2 and n < n2)
            ties += s == s2
    assert ties > 10


def test_top_k_keeps_the_lowest_indices_among_ties_at_the_kth_place():
    frame = pd.DataFrame({"user": ["u"] * 2 + ["v"] * 2 + ["w"] * 2 + ["x"] * 2,
                          "item": ["a", "d", "a", "c", "a", "b", "a", "e"],
                          "timestamp": range(8)})
    graph = build_graph(frame, pd.Index(["a", "b", "c", "d", "e"]))
    table = transition_neighbours(graph, k=2)
    first = table.item == 0
    assert list(table.neighbour[first]) == [1, 2]  # four next items tied: b, c win


def test_parquet_logs_give_the_same_store(tmp_path):
    frame, catalogue = synthetic_log()
    memory = build_store(frame, catalogue, tmp_path / "memory.sqlite", MEMORY, progress=False)
    # one file: its row order is the log's
    frame.to_parquet(tmp_path / "log.parquet", index=False)
    one = build_store_duckdb(tmp_path / "log.parquet", catalogue, tmp_path / "one.sqlite", DUCKDB,
                             progress=False)
    assert_same_store(memory, one, same_version=False)
    # several files in any order: a seq column says the order
    (tmp_path / "parts").mkdir()
    shuffled = frame.assign(seq=np.arange(len(frame))).sample(frac=1.0, random_state=0)
    shuffled.iloc[::2].to_parquet(tmp_path / "parts" / "a.parquet", index=False)
    shuffled.iloc[1::2].to_parquet(tmp_path / "parts" / "b.parquet", index=False)
    parts = build_store_duckdb(str(tmp_path / "parts" / "*.parquet"), catalogue,
                               tmp_path / "parts.sqlite", DUCKDB, progress=False)
    assert_same_store(memory, parts, same_version=False)
    version = dict(tables(one)["meta"])["version"]
    again = build_store_duckdb(tmp_path / "log.parquet", catalogue, tmp_path / "again.sqlite",
                               DUCKDB, progress=False)
    assert dict(tables(again)["meta"])["version"] == version
    frame.assign(timestamp=frame["timestamp"] + 1).to_parquet(tmp_path / "log.parquet", index=False)
    changed = build_store_duckdb(tmp_path / "log.parquet", catalogue, tmp_path / "changed.sqlite",
                                 DUCKDB, progress=False)
    assert dict(tables(changed)["meta"])["version"] != version
    frame.drop(columns="timestamp").to_parquet(tmp_path / "bad.parquet", index=False)
    with pytest.raises(ValueError, match="missing timestamp"):
        build_store_duckdb(tmp_path / "bad.parquet", catalogue, tmp_path / "bad.sqlite", DUCKDB)
    shuffled.drop(columns="seq").iloc[::2].to_parquet(tmp_path / "parts" / "a.parquet", index=False)
    with pytest.raises(ValueError, match="seq"):
        build_store_duckdb(str(tmp_path / "parts" / "*.parquet"), catalogue,
                           tmp_path / "bad.sqlite", DUCKDB)
    assert not (tmp_path / "bad.sqlite").exists()


def test_a_small_memory_limit_and_one_thread_give_the_same_store(tmp_path):
    frame, catalogue = synthetic_log(seed=1)
    memory = build_store(frame, catalogue, tmp_path / "memory.sqlite", MEMORY, progress=False)
    tight = DUCKDB.model_copy(update={"duckdb_memory_limit": "64MiB", "duckdb_threads": 1})
    duck = build_store(frame, catalogue, tmp_path / "duckdb.sqlite", tight, progress=False)
    assert_same_store(memory, duck)
    with pytest.raises(ValueError, match="duckdb_memory_limit"):
        build_store(frame, catalogue, tmp_path / "x.sqlite",
                    DUCKDB.model_copy(update={"duckdb_memory_limit": "lots"}), progress=False)


def test_engine_settings_are_not_part_of_the_version():
    frame, catalogue = synthetic_log()
    assert inputs_hash(frame, catalogue, MEMORY) == inputs_hash(frame, catalogue, DUCKDB)
    assert inputs_hash(frame, catalogue, MEMORY) != inputs_hash(
        frame, catalogue, MEMORY.model_copy(update={"neighbours": 4}))


def test_memory_sizes_and_blocks():
    assert memory_bytes("4GB") == 4 * 10**9 and memory_bytes("512 MiB") == 512 * 2**20
    assert memory_bytes("1.5gb") == 1_500_000_000
    with pytest.raises(ValueError):
        memory_bytes("4 parsecs")
    work = np.array([50, 0, 3, 3, 3, 3, 0, 100, 1])
    blocks = item_blocks(work, n_items=9, max_groups=10)
    assert blocks[0][0] == 0 and blocks[-1][1] == len(work)
    assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:]))  # consecutive, no gaps
    for low, high in blocks:  # within budget unless a single item is over it alone
        assert np.minimum(work[low:high], 9).sum() <= 10 or high - low == 1 or \
            np.count_nonzero(work[low:high]) == 1
    assert item_blocks(np.zeros(4), 4, 10) == []


def test_cst_build_engine_option(tmp_path, monkeypatch):
    monkeypatch.setenv("STAR_HOME", str(tmp_path / "home"))
    data = tmp_path / "shop"
    write_dataset_folder(data, n_users=30, n_items=50)
    runner = CliRunner()
    base = ["cst", "build", "--dataset", str(data), "--set", "cst.content=false"]
    duck = runner.invoke(app, [*base, "--engine", "duckdb", "--out", str(tmp_path / "d.sqlite")])
    assert duck.exit_code == 0, duck.output
    assert "by the duckdb engine" in duck.output
    memory = runner.invoke(app, [*base, "--out", str(tmp_path / "m.sqlite")])
    assert memory.exit_code == 0 and "by the memory engine" in memory.output
    assert_same_store(tmp_path / "m.sqlite", tmp_path / "d.sqlite")
    assert tables(tmp_path / "d.sqlite")["ranker"]  # each got the ranker learned on valid
    # a store of the same inputs is reused whichever engine is asked for
    again = runner.invoke(app, [*base, "--engine", "memory", "--out", str(tmp_path / "d.sqlite")])
    assert again.exit_code == 0 and "by the duckdb engine" in again.output
    bad = runner.invoke(app, [*base, "--engine", "bigquery"])
    assert bad.exit_code != 0


@pytest.mark.slow
def test_engines_write_the_identical_store_on_ml100k(ml100k, tmp_path):
    tasks = build_split_tasks(ml100k, "test")
    allowed = task_interactions(ml100k, tasks, "test")
    # the latent models are fitted by one Python function for both engines (checked on the
    # synthetic log): here only the SQL is compared, without minutes of SASRec training
    config = CSTConfig(content=False, latent=False)
    memory = build_store(allowed, ml100k.items, tmp_path / "memory.sqlite", config, progress=False)
    duck = build_store(allowed, ml100k.items, tmp_path / "duckdb.sqlite",
                       config.model_copy(update={"engine": "duckdb"}), progress=False)
    assert_same_store(memory, duck)
    assert tables(duck)["neighbours"]  # not two empty stores

