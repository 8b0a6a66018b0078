"""The evidence store: one SQLite file with the precomputed CF signals.

Built once from the interactions a task set may use, versioned by a hash of those
inputs and of the CST settings, written atomically (a crash leaves no half store), and
read by the tools, the per-task summaries and the `cst` ranker alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from starrec.config import CSTConfig
from starrec.core import Recommender
from starrec.core.files import building, private_temp
from starrec.cst.signals import (
    Graph,
    Neighbours,
    build_graph,
    cooccurrence_neighbours,
    embedding_neighbours,
    Timeline,
    percentile_ranks,
    transition_neighbours,
)
from starrec.latent.state import ModelState
from starrec.paths import star_home

if TYPE_CHECKING:
    from starrec.cst.evidence import StoreArrays

log = logging.getLogger(__name__)

# 2: recent popularity is computed per task from the interactions (no global columns)
# 3: ties at the k-th neighbour keep the lowest index (both engines)
# 4: latent models (SASRec, ALS) and the learned ranker
# 5: the latent SASRec trains on batches of similar-length windows (other weights than 4's)
FORMAT_VERSION = 5
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (idx INTEGER PRIMARY KEY, item TEXT NOT NULL UNIQUE, title TEXT NOT NULL,
    text TEXT NOT NULL, pop INTEGER NOT NULL, pop_pct REAL NOT NULL);
CREATE TABLE interactions (seq INTEGER PRIMARY KEY, user TEXT NOT NULL, item INTEGER NOT NULL,
    ts REAL NOT NULL);
CREATE TABLE neighbours (kind TEXT NOT NULL, item INTEGER NOT NULL, rank INTEGER NOT NULL,
    neighbour INTEGER NOT NULL, count REAL NOT NULL, strength REAL NOT NULL,
    PRIMARY KEY (kind, item, rank)) WITHOUT ROWID;
CREATE TABLE transitions (item INTEGER NOT NULL, next INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (item, next)) WITHOUT ROWID;
CREATE TABLE embeddings (idx INTEGER PRIMARY KEY, vector BLOB NOT NULL);
CREATE TABLE latent (model TEXT PRIMARY KEY, header TEXT NOT NULL, state BLOB NOT NULL);
CREATE TABLE ranker (key TEXT PRIMARY KEY, meta TEXT NOT NULL, model TEXT NOT NULL);
"""
INDEXES = "CREATE INDEX interactions_user ON interactions (user);"
KINDS = ("cooccurrence", "transition", "content")


# settings that choose how a store is computed, not what it holds: left out of its version,
# so a store built by one engine is reused by the others
EXECUTION_SETTINGS = frozenset({"engine", "duckdb_memory_limit", "duckdb_threads",
                                "spark_master", "spark_conf"})
# settings of the learned ranker: it is fitted after the store is built and kept in it
# under its own key (`starrec.cst.learned`), so they leave the store's signals unchanged
RANKER_SETTINGS = frozenset({"ranker", "ranker_trees", "ranker_leaves", "ranker_learning_rate",
                             "ranker_min_data", "ranker_holdout", "ranker_seed"})
UNVERSIONED = EXECUTION_SETTINGS | RANKER_SETTINGS
# settings added after stores were built, versioned only away from their default, so that
# a store built before they existed keeps its version: (section, field) -> default
LATER_SETTINGS = {("latent_sasrec", "negative_sampling"): "uniform"}


def inputs_hash(interactions: pd.DataFrame, items: pd.DataFrame, config: CSTConfig) -> str:
    """Changes when any input interaction, item text or CST setting does (but not with the
    engine that computes the store, which gives the same store, nor with the settings of
    the ranker fitted on it afterwards)."""
    digest = hashlib.sha256(f"cst-v{FORMAT_VERSION}".encode())
    frame = interactions[["user", "item", "timestamp"]]
    digest.update(pd.util.hash_pandas_object(frame, index=False).values.tobytes())
    digest.update(pd.util.hash_pandas_object(items.reset_index(), index=False).values.tobytes())
    digest.update(versioned_settings(config))
    return digest.hexdigest()[:16]


def versioned_settings(config: CSTConfig) -> bytes:
    """The CST settings a store's version covers: all but how it is computed and the
    ranker fitted on it."""
    exclude: dict[str, Any] = {name: True for name in UNVERSIONED}
    for (section, name), default in LATER_SETTINGS.items():
        if getattr(getattr(config, section), name) == default:
            exclude.setdefault(section, set()).add(name)
    return config.model_dump_json(exclude=exclude).encode()


def default_store_path(dataset: str, split: str, version: str) -> Path:
    return star_home() / "cst" / f"{dataset}-{split}-{version}.sqlite"


def _peak_rss_mb(reset: bool = False) -> float | None:
    """This process's peak resident memory (VmHWM) in MiB, and with `reset` the peak set
    back to the current use (Linux: /proc/self/clear_refs), so that the next reading is
    the peak of what ran in between; None where /proc does not say."""
    try:
        status = Path("/proc/self/status").read_text()
        peak = next(int(line.split()[1]) for line in status.splitlines()
                    if line.startswith("VmHWM:"))
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
    except (OSError, StopIteration, ValueError):
        return None
    return round(peak / 1024, 1)


class Laps:
    """Wall time and peak resident memory of a build's stages, logged as they end and kept
    for the store's meta (the memory of a stage run in this process: DuckDB's, not a Spark
    JVM's)."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.tick = self.started
        self.timings: dict[str, float] = {}
        self.peak_mb: dict[str, float] = {}
        _peak_rss_mb(reset=True)

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self.tick, 3)
        peak = _peak_rss_mb(reset=True)
        if peak is not None:
            self.peak_mb[name] = peak
        log.info("cst: %s in %.2fs", name, now - self.tick)
        self.tick = now

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 3)


def catalogue_texts(items: pd.DataFrame, item_ids: pd.Index) -> tuple[list[str], list[str]]:
    """(titles, texts) of the store's items in store order; an item the catalogue lacks is
    titled by its id. Shared by the engines so that both write the same item rows."""
    from starrec.cst.content import item_texts

    catalogue = items.reindex(item_ids)
    titles = catalogue["title"].fillna(pd.Series(item_ids, index=item_ids)).astype(str)
    return titles.tolist(), item_texts(catalogue.assign(title=titles))


def content_neighbours(texts: list[str], config: CSTConfig,
                       progress: bool) -> tuple[np.ndarray | None, Neighbours | None]:
    """(vectors, neighbours) of the item texts, or (None, None) with content signals off."""
    if not config.content:
        return None, None
    from starrec.cst.content import embed_texts

    vectors = embed_texts(texts, progress=progress)
    return vectors, embedding_neighbours(vectors, config.neighbours)


def neighbour_rows(table: Neighbours) -> Iterable[tuple]:
    """(item, rank, neighbour, count, strength) rows of a neighbour table."""
    return zip(table.item.tolist(), table.rank.tolist(), table.neighbour.tolist(),
               table.count.tolist(), table.strength.tolist())


class StoreWriter:
    """Writes one store into a temporary file next to `path` and moves it into place only
    when `finish` succeeds, so a crash leaves no half store. Rows may come from lists or
    from generators that compute them while the store is written (an out-of-core engine
    never holds a whole table)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = private_temp(path)
        self.db = sqlite3.connect(self.tmp)
        self.db.executescript("PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;" + SCHEMA)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.db.close()
        if kind is not None:
            self.tmp.unlink(missing_ok=True)

    def items(self, ids: pd.Index, titles: list[str], texts: list[str], pop: np.ndarray) -> None:
        """One row per item in store order; `pop` counts distinct users per item."""
        self.db.executemany(
            "INSERT INTO items VALUES (?,?,?,?,?,?)",
            zip(range(len(ids)), ids.astype(str), titles, texts,
                pop.astype(int).tolist(), percentile_ranks(pop).tolist()),
        )

    def interactions(self, rows: Iterable[tuple]) -> None:
        """(seq, user, item index, timestamp) rows."""
        self.db.executemany("INSERT INTO interactions VALUES (?,?,?,?)", rows)

    def neighbours(self, kind: str, rows: Iterable[tuple]) -> None:
        """(item, rank, neighbour, count, strength) rows of one kind."""
        self.db.executemany("INSERT INTO neighbours VALUES (?,?,?,?,?,?)",
                            ((kind, *row) for row in rows))

    def transitions(self, rows: Iterable[tuple]) -> None:
        """(item, next item, count) rows."""
        self.db.executemany("INSERT INTO transitions VALUES (?,?,?)", rows)

    def embeddings(self, vectors: np.ndarray) -> None:
        self.db.executemany("INSERT INTO embeddings VALUES (?,?)",
                            ((i, v.tobytes()) for i, v in enumerate(vectors)))

    def item_ids(self) -> pd.Index:
        """The ids of the items written so far, in store order."""
        rows = self.db.execute("SELECT item FROM items ORDER BY idx")
        return pd.Index([item for (item,) in rows], dtype=object)

    def stored_interactions(self) -> pd.DataFrame:
        """The interactions written so far (user, item id, timestamp) in sequence order:
        what the latent models are fitted on, read back so that every engine fits them on
        the same rows, exactly those the store holds."""
        frame = pd.read_sql_query("SELECT user, item, ts AS timestamp FROM interactions "
                                  "ORDER BY seq", self.db)
        frame["item"] = self.item_ids().to_numpy()[frame["item"].to_numpy(dtype=np.int64)]
        return frame

    def latent(self, states: Iterable[ModelState]) -> None:
        """Fitted latent models (`starrec.latent`), one row each."""
        self.db.executemany("INSERT INTO latent VALUES (?,?,?)",
                            ((s.kind, s.header(), s.blob()) for s in states))

    def finish(self, meta: dict) -> Path:
        """Index, write `meta`, and move the store into place."""
        self.db.executescript(INDEXES)
        self.db.executemany("INSERT INTO meta VALUES (?,?)",
                            ((k, json.dumps(v)) for k, v in meta.items()))
        self.db.commit()
        self.db.close()
        self.tmp.replace(self.path)
        return self.path


def build_store(
    interactions: pd.DataFrame,
    items: pd.DataFrame,
    path: Path,
    config: CSTConfig,
    *,
    version: str | None = None,
    dataset: str = "",
    split: str = "",
    progress: bool = True,
) -> Path:
    """Compute every signal and write the store to `path` (atomically), with the engine
    `config.engine` names: `memory` (sparse matrices, this process), `duckdb` (SQL out
    of core, `starrec.cst.sql`) or `spark` (the same SQL on Spark, `starrec.cst.spark`);
    all write the same store."""
    if config.engine == "duckdb":
        from starrec.cst.sql import build_store_duckdb

        return build_store_duckdb(interactions, items, path, config, version=version,
                                  dataset=dataset, split=split, progress=progress)
    if config.engine == "spark":
        from starrec.cst.spark import build_store_spark

        return build_store_spark(interactions, items, path, config, version=version,
                                 dataset=dataset, split=split, progress=progress)
    laps = Laps()
    graph = build_graph(interactions, items.index)
    laps("graph")
    cooc = cooccurrence_neighbours(graph, config.neighbours)
    laps("co-consumption neighbours")
    trans = transition_neighbours(graph, config.neighbours)
    laps("transition neighbours")
    titles, texts = catalogue_texts(items, graph.items)
    vectors, content = content_neighbours(texts, config, progress)
    if vectors is not None:
        laps("content embeddings")

    with StoreWriter(path) as writer:
        writer.items(graph.items, titles, texts, graph.popularity)
        writer.interactions(zip(range(len(interactions)), interactions["user"].astype(str),
                                graph.items.get_indexer(interactions["item"]).tolist(),
                                interactions["timestamp"].astype(float).tolist()))
        for kind, table in (("cooccurrence", cooc), ("transition", trans), ("content", content)):
            if table is not None:
                writer.neighbours(kind, neighbour_rows(table))
        transitions = graph.transitions.tocoo()
        writer.transitions(zip(transitions.row.tolist(), transitions.col.tolist(),
                               transitions.data.astype(int).tolist()))
        if vectors is not None:
            writer.embeddings(vectors)
        laps("write")
        write_latent_models(writer, config, progress, laps)
        return writer.finish(store_meta(
            version or inputs_hash(interactions, items, config), dataset, split, config,
            n_users=len(graph.users), n_items=len(graph.items),
            n_interactions=len(interactions), laps=laps))


def write_latent_models(writer: StoreWriter, config: CSTConfig, progress: bool,
                        laps: Laps) -> None:
    """Fit the latent models on the interactions the writer holds and store them (both
    engines call this, so their models come from the same rows by the same code)."""
    if not config.latent:
        return
    from starrec.cst.latent import fit_latent_models

    writer.latent(fit_latent_models(writer.stored_interactions(), writer.item_ids(), config,
                                    progress=progress, laps=laps))


def store_meta(version: str, dataset: str, split: str, config: CSTConfig, *, n_users: int,
               n_items: int, n_interactions: int, laps: Laps) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "version": version,
        "dataset": dataset,
        "split": split,
        "config": config.model_dump(),
        "n_users": n_users,
        "n_items": n_items,
        "n_interactions": n_interactions,
        "timings_s": laps.timings,
        "peak_rss_mb": laps.peak_mb,
        "build_s": laps.total(),
    }


def ensure_store(
    interactions: pd.DataFrame,
    items: pd.DataFrame,
    config: CSTConfig,
    *,
    dataset: str,
    split: str,
    path: Path | None = None,
    progress: bool = True,
) -> Path:
    """The store for these inputs, built only if no store of the same version exists."""
    version = inputs_hash(interactions, items, config)
    path = path or default_store_path(dataset, split, version)
    with building(path):  # a second process asking for the same store waits, then reuses it
        if path.exists() and _version_of(path) == version:
            log.info("cst: reusing %s", path)
            return path
        log.info("cst: building %s", path)
        return build_store(interactions, items, path, config, version=version,
                           dataset=dataset, split=split, progress=progress)


def _version_of(path: Path) -> str | None:
    store = EvidenceStore(path)
    try:
        return store.meta.get("version")
    finally:
        store.close()


@dataclass(frozen=True)
class Neighbour:
    item: str
    title: str
    rank: int
    count: float
    strength: float


def _reopen_after_fork() -> None:
    """A forked process (`star serve --processes N`) gets connections of its own: SQLite
    connections must not cross a fork. The inherited ones are left unused, not closed."""
    for store in list(_OPEN_STORES):
        store.db = store._connect()


_OPEN_STORES: weakref.WeakSet[EvidenceStore] = weakref.WeakSet()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reopen_after_fork)


class EvidenceStore:
    """Read access to a built store. Look-ups of precomputed neighbours are SQL queries;
    the signals that depend on a task's history are computed from the graph, which is
    rebuilt from the stored interactions on first use."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no evidence store (run `star cst build`)")
        self.db = self._connect()
        _OPEN_STORES.add(self)
        self.meta = {k: json.loads(v) for k, v in self.db.execute("SELECT key, value FROM meta")}
        frame = pd.read_sql_query(
            "SELECT idx, item, title, pop, pop_pct FROM items ORDER BY idx", self.db
        )
        self.items = frame.set_index("item")
        self.item_ids = pd.Index(frame["item"])
        self._recent: dict[float | None, np.ndarray] = {}

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)

    def close(self) -> None:
        _OPEN_STORES.discard(self)
        self.db.close()

    @cached_property
    def config(self) -> CSTConfig:
        # read by every task's evidence: validated once
        return CSTConfig.model_validate(self.meta["config"])

    def index(self, item: str) -> int | None:
        position = self.item_ids.get_indexer([item])[0]
        return None if position < 0 else int(position)

    def title(self, item: str) -> str:
        return str(self.items.at[item, "title"]) if item in self.items.index else f"item {item}"

    def neighbours(self, kind: str, item: str, k: int) -> list[Neighbour]:
        if kind not in KINDS:
            raise ValueError(f"unknown neighbour kind {kind!r}")
        index = self.index(item)
        if index is None:
            return []
        rows = self.db.execute(
            "SELECT neighbour, rank, count, strength FROM neighbours WHERE kind=? AND item=? "
            "AND rank<=? ORDER BY rank",
            (kind, index, k),
        ).fetchall()
        return [
            Neighbour(self.item_ids[n], self.title(self.item_ids[n]), rank, count, strength)
            for n, rank, count, strength in rows
        ]

    def next_step_total(self, item: str) -> int:
        index = self.index(item)
        if index is None:
            return 0
        (total,) = self.db.execute("SELECT COALESCE(SUM(count), 0) FROM transitions WHERE item=?",
                                   (index,)).fetchone()
        return int(total)

    def user_history(self, user: str) -> list[str]:
        rows = self.db.execute("SELECT item FROM interactions WHERE user=? ORDER BY seq", (user,))
        return [self.item_ids[i] for (i,) in rows]

    def knows_user(self, user: str) -> bool:
        return self.db.execute("SELECT 1 FROM interactions WHERE user=? LIMIT 1", (user,)).fetchone() is not None

    @cached_property
    def graph(self) -> Graph:
        frame = pd.read_sql_query("SELECT user, item, ts AS timestamp FROM interactions ORDER BY seq",
                                  self.db)
        frame["item"] = self.item_ids[frame["item"].to_numpy()]
        graph = build_graph(frame, self.item_ids)
        if not graph.items.equals(self.item_ids):
            raise RuntimeError(f"{self.path}: item order of the store and its graph differ")
        return graph

    @cached_property
    def timeline(self) -> Timeline:
        rows = self.db.execute("SELECT ts, item FROM interactions ORDER BY seq").fetchall()
        table = np.array(rows, dtype=np.float64).reshape(-1, 2)
        return Timeline.build(table[:, 0], table[:, 1].astype(np.int64), len(self.item_ids))

    def recent_percentiles(self, cutoff_time: float | None) -> np.ndarray:
        """Per item (store order): the percentile (0-100) of its recent popularity in the
        window ending at `cutoff_time` (`Timeline.recent_popularity`). A task's evidence
        passes its own cutoff, so it never counts what happened after its target."""
        cached = self._recent.get(cutoff_time)
        if cached is None:
            counts = self.timeline.recent_popularity(self.config.recent_fraction, cutoff_time)
            cached = percentile_ranks(counts)
            if len(self._recent) >= 64:  # a run serves tasks one after another
                self._recent.clear()
            self._recent[cutoff_time] = cached
        return cached

    def recent_percentile(self, item: str, cutoff_time: float | None) -> float:
        index = self.index(item)
        return 0.0 if index is None else float(self.recent_percentiles(cutoff_time)[index])

    @cached_property
    def item_users(self):
        return self.graph.matrix.T.tocsr()

    @cached_property
    def arrays(self) -> StoreArrays:
        """What every task's evidence reads of the store, computed once
        (`starrec.cst.evidence`)."""
        from starrec.cst.evidence import StoreArrays

        return StoreArrays.of(self)

    def _has_table(self, name: str) -> bool:
        """Whether the store has table `name` (one written before format 4 has no latent
        models and no ranker: it reads as a store without them)."""
        return self.db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?",
                               (name,)).fetchone() is not None

    @cached_property
    def latent_states(self) -> dict[str, ModelState]:
        """The latent models fitted with the store, by kind (none if built without)."""
        if not self._has_table("latent"):
            return {}
        rows = self.db.execute("SELECT model, header, state FROM latent ORDER BY model").fetchall()
        return {kind: ModelState.load(header, blob) for kind, header, blob in rows}

    @cached_property
    def latent_models(self) -> dict[str, Recommender]:
        """The stored latent models rebuilt for scoring (`starrec.cst.latent`)."""
        from starrec.cst.latent import load_latent_models

        return load_latent_models(self.latent_states)

    def ranker_row(self) -> tuple[str, dict, str] | None:
        """(key, meta, model text) of the ranker fitted for this store, if any."""
        if not self._has_table("ranker"):
            return None
        row = self.db.execute("SELECT key, meta, model FROM ranker").fetchone()
        return None if row is None else (row[0], json.loads(row[1]), row[2])

    @cached_property
    def embeddings(self) -> np.ndarray | None:
        rows = self.db.execute("SELECT vector FROM embeddings ORDER BY idx").fetchall()
        if not rows:
            return None
        return np.stack([np.frombuffer(blob, dtype=np.float32) for (blob,) in rows])
