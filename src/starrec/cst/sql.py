"""The CST evidence store computed as SQL over Parquet, out of core (DuckDB, Spark).

The memory engine (`starrec.cst.store.build_store`) holds the user x item matrix and a
block of item x item co-occurrences in RAM; past tens of millions of interactions that no
longer fits a small machine (DESIGN.md 6). Here the same counts are SQL that DuckDB runs
under a memory cap, spilling to disk, and the results stream into the same SQLite store
through the shared `StoreWriter`, so neither the log nor any item x item table is ever
held in Python.

What the store precomputes from interactions, and its SQL below:
- item popularity: distinct users per item (`POPULARITY`);
- co-consumption neighbours: per item, the top-k items by cosine of user sets
  (`COOCCURRENCE_TOP_K`), computed by DuckDB for one block of items at a time so that
  the pair aggregation of a block stays within the memory cap (Spark, which spills and
  distributes it, takes all items at once);
- first-order transitions: counts of "item, then next item" in each user's sequence
  (`TRANSITION_COUNTS`) and their top-k per item (`TRANSITION_TOP_K`).
Similar-user overlaps are not precomputed by either engine: they depend on the task's
history and are computed per task from the stored interactions. The latent models
(SASRec, ALS) are not SQL: every engine fits them with the same Python code on the
interactions read back from the store being written (`write_latent_models`).

The SQL engines and the memory engine give the identical store: the same item order (the
catalogue's, then items first seen in the log), the same floating-point formulas (the cosine as
count / (sqrt(pop_a) * sqrt(pop_b)); a transition's share in float32, as the memory
engine's float32 matrices compute it) and the same top-k order (strength descending,
then neighbour index ascending, also across ties at the k-th place).

The statements are written once and run by two engines through one build
(`write_store`): DuckDB here (one process, out of core) and Spark (`starrec.cst.spark`,
local mode or a cluster). They use only portable SQL (no QUALIFY, no engine's own
functions); what differs between the two dialects (how a table is materialised, how an
identifier is quoted, which 64-bit row hash versions a Parquet log) is the `Dialect`
below and nothing else. Loading the log and the session settings are each engine's own.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from starrec.config import CSTConfig
from starrec.cst.store import (
    FORMAT_VERSION,
    Laps,
    StoreWriter,
    catalogue_texts,
    content_neighbours,
    inputs_hash,
    neighbour_rows,
    store_meta,
    versioned_settings,
    write_latent_models,
)
from starrec.progress import progress as progress_bar

log = logging.getLogger(__name__)

# --- DuckDB session and loading -------------------------------------------------------

SETTINGS = (
    "SET memory_limit = '{memory_limit}'",
    "SET temp_directory = '{temp_directory}'",
    # results that need an order say so (ORDER BY); the rest may stream in any order,
    # which lets DuckDB run them in less memory
    "SET preserve_insertion_order = false",
)
THREADS = "SET threads = {threads}"

# a DataFrame handed to the engine becomes this Parquet file first, with its row order
# as an explicit `seq` column (the order of each user's sequence)
FRAME_TO_PARQUET = """
COPY (SELECT seq, "user", item, "timestamp" FROM frame_in) TO '{path}' (FORMAT parquet)
"""

DUCKDB_SOURCE = "read_parquet({files}, file_row_number = true)"
PARQUET_COLUMNS = "DESCRIBE SELECT * FROM read_parquet({files})"
PARQUET_FILES = "SELECT count(*) FROM glob({files})"


# --- the dialects: every difference between the engines' SQL --------------------------

@dataclass(frozen=True)
class Table:
    """A table the build materialises: its name and the SELECT that fills it."""

    name: str
    select: str


@dataclass(frozen=True)
class Dialect:
    """What one engine's SQL says differently; the statements are shared."""

    name: str
    create_table: str  # a statement that materialises {select} as {name}
    create_view: str  # ... that names {select} as {name}, computed when read
    release: tuple[str, ...]  # statements that free table {name} once the build is done
    quote: str  # identifier quote (`user` and `timestamp` are keywords)
    row_hash: str  # a 64-bit hash of several columns (a Parquet log's version)

    def table(self, table: Table) -> str:
        return self.create_table.format(name=table.name, select=table.select)

    def view(self, table: Table) -> str:
        return self.create_view.format(name=table.name, select=table.select)

    def ident(self, name: str) -> str:
        return self.quote + name.replace(self.quote, self.quote * 2) + self.quote


DUCKDB = Dialect("duckdb", "CREATE TABLE {name} AS {select}", "CREATE VIEW {name} AS {select}",
                 ("DROP TABLE IF EXISTS {name}",), '"', "hash")
# CACHE TABLE ... AS SELECT: a temporary view, computed once and kept by the executors in
# memory and on disk (Spark's default storage level), never written to a warehouse
SPARK = Dialect("spark", "CACHE TABLE {name} AS {select}",
                "CREATE OR REPLACE TEMPORARY VIEW {name} AS {select}",
                ("UNCACHE TABLE IF EXISTS {name}", "DROP VIEW IF EXISTS {name}"), "`", "xxhash64")

# --- portable SQL: the log and the counts ---------------------------------------------

# the log as the SQL below reads it: user and item ids as text, time as a double, and
# `seq` (the row's place in the log) from the log's own `seq` column or its row number;
# {source} is where the engine reads the log from
RAW = Table("raw", """
SELECT CAST({seq} AS BIGINT) AS seq, CAST({user} AS STRING) AS user_id,
       CAST({item} AS STRING) AS item_id, CAST({timestamp} AS DOUBLE) AS ts
FROM {source}
""")
# a version for a Parquet log the caller gives no version for: its rows, order included
# (the dialects' hashes differ, so a Parquet log's version is per engine; a DataFrame's
# is `inputs_hash`, the same for every engine)
PARQUET_DIGEST = """
SELECT COUNT(*) AS n, BIT_XOR({row_hash}(seq, user_id, item_id, ts)) AS digest FROM raw
"""

# items of the log the catalogue lacks, in order of first appearance (they follow the
# catalogue's items in the store, as in the memory engine)
EXTRA_ITEMS = """
SELECT r.item_id, MIN(r.seq) AS first_seq
FROM raw r LEFT JOIN catalogue c ON c.item_id = r.item_id
WHERE c.item_id IS NULL
GROUP BY r.item_id
ORDER BY first_seq
"""
USERS = Table("users", """
SELECT user_id, CAST(ROW_NUMBER() OVER (ORDER BY user_id) AS INTEGER) AS uid
FROM (SELECT DISTINCT user_id FROM raw) d
""")
# the log with integer user and item codes (item = the store's item index)
CODED = Table("coded", """
SELECT r.seq, u.uid, m.idx AS item, r.ts
FROM raw r JOIN users u ON u.user_id = r.user_id JOIN item_map m ON m.item_id = r.item_id
""")
# who consumed what, once per (user, item): the binary user x item matrix
USER_ITEMS = Table("ui", "SELECT DISTINCT uid, item FROM coded")
POPULARITY = Table("pop", "SELECT item, COUNT(*) AS pop FROM ui GROUP BY item")
# per item, the number of (item, other item, user) rows its co-occurrence join makes:
# what sizes the blocks of COOCCURRENCE_TOP_K (an item's own pair included: an estimate)
COOCCURRENCE_WORK = """
SELECT x.item, SUM(d.deg) AS work
FROM ui x JOIN (SELECT uid, COUNT(*) AS deg FROM ui GROUP BY uid) d ON d.uid = x.uid
GROUP BY x.item
"""
# the items lo <= item < hi: their top-k co-consumed items by cosine of user sets
COOCCURRENCE_TOP_K = """
SELECT item, rnk, neighbour, cnt, strength FROM (
  SELECT s.item, s.neighbour, s.cnt, s.strength,
         ROW_NUMBER() OVER (PARTITION BY s.item ORDER BY s.strength DESC, s.neighbour) AS rnk
  FROM (
    SELECT p.item, p.neighbour, p.cnt,
           CAST(p.cnt AS DOUBLE) / (SQRT(CAST(GREATEST(a.pop, 1) AS DOUBLE))
                                    * SQRT(CAST(GREATEST(b.pop, 1) AS DOUBLE))) AS strength
    FROM (
      SELECT x.item, y.item AS neighbour, COUNT(*) AS cnt
      FROM ui x JOIN ui y ON y.uid = x.uid
      WHERE x.item >= {lo} AND x.item < {hi} AND y.item <> x.item
      GROUP BY x.item, y.item
    ) p JOIN pop a ON a.item = p.item JOIN pop b ON b.item = p.neighbour
  ) s
) r
WHERE rnk <= {k}
ORDER BY item, rnk
"""
# "item, then next item" in each user's sequence (rows in log order), counted
TRANSITION_COUNTS = Table("steps", """
SELECT item, nxt, COUNT(*) AS cnt
FROM (SELECT item, LEAD(item) OVER (PARTITION BY uid ORDER BY seq) AS nxt FROM coded) t
WHERE nxt IS NOT NULL
GROUP BY item, nxt
""")
# rows of `steps` per item: what sizes the blocks of TRANSITION_TOP_K
TRANSITION_WORK = "SELECT item, COUNT(*) AS work FROM steps GROUP BY item"
# the items lo <= item < hi: their k most frequent next items, with the item's total of
# next steps (the share is taken outside SQL, in the memory engine's float32)
TRANSITION_TOP_K = """
SELECT item, rnk, nxt, cnt, total FROM (
  SELECT s.item, s.nxt, s.cnt, t.total,
         ROW_NUMBER() OVER (PARTITION BY s.item ORDER BY s.cnt DESC, s.nxt) AS rnk
  FROM steps s JOIN (SELECT item, SUM(cnt) AS total FROM steps
                     WHERE item >= {lo} AND item < {hi} GROUP BY item) t
    ON t.item = s.item
  WHERE s.item >= {lo} AND s.item < {hi}
) r
WHERE rnk <= {k}
ORDER BY item, rnk
"""
TRANSITIONS = "SELECT item, nxt, cnt FROM steps ORDER BY item, nxt"
POPULARITY_ROWS = "SELECT item, pop FROM pop"
INTERACTIONS = """
SELECT c.seq, u.user_id, c.item, c.ts
FROM coded c JOIN users u ON u.uid = c.uid
ORDER BY c.seq
"""
SIZES = """
SELECT (SELECT COUNT(*) FROM coded) AS n_interactions, (SELECT COUNT(*) FROM users) AS n_users
"""

# rows fetched from DuckDB per chunk, in DuckDB vectors of 2048 rows
CHUNK_VECTORS = 64
# what one group of a block's pair aggregation (item, neighbour, count, strength, its
# hash-table slot and the top-k sort) may cost; a conservative figure, so that a block
# stays within the memory cap with room left for the join's own hash table. Smaller
# blocks cost one more scan of `ui` each, little beside the pairs they aggregate.
BYTES_PER_GROUP = 256
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def memory_bytes(limit: str) -> int:
    """`4GB`, `500 MiB`, `2.5gb` as bytes (DuckDB's units: KB = 1000, KiB = 1024)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", limit)
    if not match or match.group(2).lower() not in UNITS:
        raise ValueError(f"cst.duckdb_memory_limit {limit!r}: expected a size such as 4GB "
                         "or 500MiB")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def item_blocks(work: np.ndarray, n_items: int, max_groups: int) -> list[tuple[int, int]]:
    """Consecutive item ranges [lo, hi) whose per-item aggregation (pairs of the item and
    another item) stays under `max_groups` groups: an item of `work` rows makes at most
    min(work, n_items) groups. An item that alone exceeds the budget is a block of its
    own (DuckDB then spills). Trailing items without work (no rows) may be left out."""
    groups = np.minimum(np.asarray(work, dtype=np.int64), n_items)
    blocks: list[tuple[int, int]] = []
    low, total = 0, 0
    for item, size in enumerate(groups.tolist()):
        if total and total + size > max_groups:
            blocks.append((low, item))
            low, total = item, 0
        total += size
    if total:
        blocks.append((low, len(groups)))
    return blocks


def _literal(text: str) -> str:
    """A SQL string literal (paths go into statements that take no parameters)."""
    return "'" + text.replace("'", "''") + "'"


def log_columns(source: str, columns: set[str], n_files: int) -> str:
    """The column that orders the log: `seq` where the log has one, else the row number
    (one file only: row numbers restart in each file). Raises on a log without the
    columns the SQL reads."""
    missing = {"user", "item", "timestamp"} - columns
    if missing:
        raise ValueError(f"{source}: the interactions need columns user, item, timestamp "
                         f"(missing {', '.join(sorted(missing))})")
    if "seq" in columns:
        return "seq"
    if n_files != 1:
        raise ValueError(f"{source}: several Parquet files need a `seq` column (the rows' "
                         "order), since their row numbers restart in each file")
    return "file_row_number"


def raw_view(dialect: Dialect, source: str, seq: str) -> str:
    """The statement that creates `raw` over the log the engine reads from `source`."""
    names = {name: dialect.ident(name) for name in ("user", "item", "timestamp")}
    return dialect.view(Table(RAW.name, RAW.select.format(
        seq=dialect.ident(seq), source=source, **names)))


def log_frame(source: pd.DataFrame) -> dict[str, np.ndarray]:
    """A DataFrame log as the columns an engine loads: its row order as `seq`, ids as
    text, time as a double."""
    return {"seq": np.arange(len(source), dtype=np.int64),
            "user": source["user"].astype(str).to_numpy(dtype=object),
            "item": source["item"].astype(str).to_numpy(dtype=object),
            "timestamp": source["timestamp"].astype(float).to_numpy()}


# --- the engines ------------------------------------------------------------------------

class Engine(Protocol):
    """What `write_store` asks of an engine that runs the shared SQL."""

    dialect: Dialect
    # (item, other item) groups one block of COOCCURRENCE_TOP_K / TRANSITION_TOP_K may
    # aggregate; None: all items in one query (the engine spills or distributes)
    block_groups: int | None

    def create(self, table: Table) -> None:
        """Materialise `table` (`Dialect.table`), for the statements that follow."""

    def fetch(self, sql: str) -> pd.DataFrame:
        """A result small enough to hold (a row per item at most), whole."""

    def chunks(self, sql: str) -> Iterator[pd.DataFrame]:
        """A result in order, in chunks, never held whole."""

    def frame_table(self, name: str, frame: pd.DataFrame) -> None:
        """A small DataFrame (the catalogue's ids, the item map) as table `name`."""

    def close(self) -> None:
        """Free what the build made; called before the latent models are fitted."""


class DuckDBEngine:
    """DuckDB in this process, on a database file in `workdir`, under
    `config.duckdb_memory_limit`, spilling into `workdir`."""

    dialect = DUCKDB

    def __init__(self, workdir: Path, config: CSTConfig, block_groups: int | None = None) -> None:
        try:
            import duckdb
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError(
                "cst.engine=duckdb needs the duckdb package: pip install -e '.[scale]'"
            ) from error
        limit = memory_bytes(config.duckdb_memory_limit)  # a bad size fails here, by name
        self.block_groups = block_groups or max(limit // BYTES_PER_GROUP, 1)
        self.workdir = workdir
        spill = workdir / "spill"
        spill.mkdir()
        self.db = duckdb.connect(str(workdir / "work.duckdb"))
        for statement in SETTINGS:
            self.db.execute(statement.format(
                memory_limit=config.duckdb_memory_limit.replace("'", ""),
                temp_directory=str(spill).replace("'", "''")))
        if config.duckdb_threads:
            self.db.execute(THREADS.format(threads=int(config.duckdb_threads)))

    def create(self, table: Table) -> None:
        self.db.execute(self.dialect.table(table))

    def fetch(self, sql: str) -> pd.DataFrame:
        # fetched to its end: DuckDB refuses more work on a connection while a result is
        # unfinished
        return self.db.execute(sql).fetchdf()

    def chunks(self, sql: str) -> Iterator[pd.DataFrame]:
        result = self.db.execute(sql)
        while True:
            chunk = result.fetch_df_chunk(CHUNK_VECTORS)
            if chunk.empty:
                return
            yield chunk

    def frame_table(self, name: str, frame: pd.DataFrame) -> None:
        """A table (not a view of Python objects): joins then see its true size, and
        DuckDB may spill it like any table."""
        self.db.register("frame_in", frame)
        self.db.execute(f"CREATE TABLE {name} AS SELECT * FROM frame_in")
        self.db.unregister("frame_in")

    def open_log(self, source: pd.DataFrame | str | Path) -> None:
        """Create the `raw` view over the log, writing a DataFrame to Parquet first."""
        if isinstance(source, pd.DataFrame):
            frame_in = pd.DataFrame(log_frame(source))
            path = self.workdir / "interactions.parquet"
            self.db.register("frame_in", frame_in)
            self.db.execute(FRAME_TO_PARQUET.format(path=str(path).replace("'", "''")))
            self.db.unregister("frame_in")
            del frame_in
            files = _literal(str(path))
        else:
            files = _literal(str(source))
        [(n_files,)] = self.db.execute(PARQUET_FILES.format(files=files)).fetchall()
        if n_files == 0:
            raise FileNotFoundError(f"{source}: no Parquet file")
        columns = {row[0] for row in
                   self.db.execute(PARQUET_COLUMNS.format(files=files)).fetchall()}
        seq = log_columns(str(source), columns, n_files)
        self.db.execute(raw_view(self.dialect, DUCKDB_SOURCE.format(files=files), seq))

    def close(self) -> None:
        self.db.close()


# --- one build for every engine ---------------------------------------------------------

def parquet_inputs_hash(engine: Engine, items: pd.DataFrame, config: CSTConfig) -> str:
    """A version for a Parquet log: its rows (order included), the item texts and the CST
    settings, as `inputs_hash` does for a DataFrame (the two are different hashes of the
    same inputs; a DataFrame is always versioned by `inputs_hash`)."""
    result = engine.fetch(PARQUET_DIGEST.format(row_hash=engine.dialect.row_hash))
    # column by column: a row of int64 and uint64 (DuckDB's hash) would become floats
    rows, digest_of_rows = (int(result[column].iloc[0]) for column in ("n", "digest"))
    digest = hashlib.sha256(f"cst-v{FORMAT_VERSION}-parquet".encode())
    digest.update(f"{rows}:{digest_of_rows}".encode())
    digest.update(pd.util.hash_pandas_object(items.reset_index(), index=False).values.tobytes())
    digest.update(versioned_settings(config))
    return digest.hexdigest()[:16]


def _per_item(engine: Engine, sql: str, n_items: int) -> np.ndarray:
    """An (item, work) query as an array over all items (0 where the query has no row)."""
    out = np.zeros(n_items, dtype=np.int64)
    rows = engine.fetch(sql)
    out[rows["item"].to_numpy(dtype=np.int64)] = rows["work"].to_numpy(dtype=np.int64)
    return out


def _blocks(engine: Engine, work_sql: str, n_items: int) -> list[tuple[int, int]]:
    if engine.block_groups is None:
        return [(0, n_items)] if n_items else []
    return item_blocks(_per_item(engine, work_sql, n_items), n_items, engine.block_groups)


def write_store(
    engine: Engine,
    interactions: pd.DataFrame | str | Path,
    items: pd.DataFrame,
    path: Path,
    config: CSTConfig,
    *,
    version: str | None,
    dataset: str,
    split: str,
    progress: bool,
    laps: Laps,
) -> Path:
    """Run the shared SQL on `engine`, whose `raw` view is open over `interactions`, and
    write the store to `path` (atomically) through the shared `StoreWriter`: the store
    the memory engine writes. Closes the engine before the latent models are fitted."""
    if version is None:
        version = (inputs_hash(interactions, items, config)
                   if isinstance(interactions, pd.DataFrame)
                   else parquet_inputs_hash(engine, items, config))
    laps("load")

    catalogue_ids = pd.Index(items.index).unique()
    engine.frame_table("catalogue", pd.DataFrame({"item_id": catalogue_ids.astype(str)}))
    extra = engine.fetch(EXTRA_ITEMS)["item_id"].astype(str)
    item_ids = catalogue_ids.append(pd.Index(extra.to_numpy(dtype=object)))
    engine.frame_table("item_map", pd.DataFrame({
        "idx": np.arange(len(item_ids), dtype=np.int64), "item_id": item_ids.astype(str)}))
    for table in (USERS, CODED, USER_ITEMS, POPULARITY):
        engine.create(table)
    sizes = engine.fetch(SIZES)
    n_interactions, n_users = (int(sizes[column].iloc[0])
                               for column in ("n_interactions", "n_users"))
    popularity = np.zeros(len(item_ids))
    pop = engine.fetch(POPULARITY_ROWS)
    popularity[pop["item"].to_numpy(dtype=np.int64)] = pop["pop"].to_numpy(dtype=np.float64)
    laps("graph")

    titles, texts = catalogue_texts(items, item_ids)
    with StoreWriter(path) as writer:
        writer.items(item_ids, titles, texts, popularity)
        writer.interactions(_interaction_rows(engine))
        laps("interactions")

        n_items, k = len(item_ids), int(config.neighbours)
        blocks = _blocks(engine, COOCCURRENCE_WORK, n_items)
        log.info("cst: co-occurrence in %d block(s) of items", len(blocks))
        for low, high in progress_bar(blocks, "co-occurrence blocks", unit="block",
                                      enabled=progress and len(blocks) > 1):
            query = COOCCURRENCE_TOP_K.format(lo=low, hi=high, k=k)
            writer.neighbours("cooccurrence", _cooccurrence_rows(engine, query))
        laps("co-consumption neighbours")

        engine.create(TRANSITION_COUNTS)
        for low, high in _blocks(engine, TRANSITION_WORK, n_items):
            query = TRANSITION_TOP_K.format(lo=low, hi=high, k=k)
            writer.neighbours("transition", _transition_rows(engine, query))
        writer.transitions(_plain_rows(engine, TRANSITIONS))
        laps("transition neighbours")

        vectors, content = content_neighbours(texts, config, progress)
        if content is not None:
            writer.neighbours("content", neighbour_rows(content))
            writer.embeddings(vectors)
            laps("content embeddings")
        engine.close()
        # fitted in Python on the rows just written, by the memory engine's own code
        write_latent_models(writer, config, progress, laps)
        return writer.finish(store_meta(
            version, dataset, split, config, n_users=n_users, n_items=len(item_ids),
            n_interactions=n_interactions, laps=laps))


def build_store_duckdb(
    interactions: pd.DataFrame | str | Path,
    items: pd.DataFrame,
    path: Path,
    config: CSTConfig,
    *,
    version: str | None = None,
    dataset: str = "",
    split: str = "",
    progress: bool = True,
    block_groups: int | None = None,
) -> Path:
    """Compute the store with DuckDB and write it to `path` (atomically): the same store
    `build_store` writes with the memory engine.

    `interactions` is a DataFrame (user, item, timestamp; each user's rows in time order,
    as `Dataset` keeps them) or a Parquet file or glob with those columns, whose row order
    (or `seq` column, required for several files) is each user's sequence: a log larger
    than memory is given as Parquet and never loaded into Python. DuckDB runs under
    `config.duckdb_memory_limit`, spilling into a folder next to `path` that is removed
    afterwards. `block_groups` caps the (item, other item) groups that one block of items
    may aggregate (default: what the memory limit allows; tests set it to cross blocks).
    """
    laps = Laps()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.duckdb-", dir=path.parent))
    engine = None
    try:
        engine = DuckDBEngine(workdir, config, block_groups)
        engine.open_log(interactions)
        return write_store(engine, interactions, items, path, config, version=version,
                           dataset=dataset, split=split, progress=progress, laps=laps)
    finally:
        if engine is not None:
            engine.close()  # closing twice is allowed
        shutil.rmtree(workdir, ignore_errors=True)


def _interaction_rows(engine: Engine) -> Iterator[tuple]:
    for chunk in engine.chunks(INTERACTIONS):
        yield from zip(chunk["seq"].tolist(), chunk["user_id"].astype(str).tolist(),
                       chunk["item"].tolist(), chunk["ts"].astype(float).tolist())


def _cooccurrence_rows(engine: Engine, query: str) -> Iterator[tuple]:
    for chunk in engine.chunks(query):
        yield from zip(chunk["item"].tolist(), chunk["rnk"].tolist(),
                       chunk["neighbour"].tolist(), chunk["cnt"].astype(float).tolist(),
                       chunk["strength"].astype(float).tolist())


def _transition_rows(engine: Engine, query: str) -> Iterator[tuple]:
    for chunk in engine.chunks(query):
        counts = chunk["cnt"].to_numpy().astype(np.float32)
        share = (counts / chunk["total"].to_numpy().astype(np.float32)).astype(np.float64)
        yield from zip(chunk["item"].tolist(), chunk["rnk"].tolist(), chunk["nxt"].tolist(),
                       counts.astype(np.float64).tolist(), share.tolist())


def _plain_rows(engine: Engine, sql: str) -> Iterator[tuple]:
    for chunk in engine.chunks(sql):
        yield from zip(*(chunk[column].tolist() for column in chunk.columns))
