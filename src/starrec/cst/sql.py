"""The CST evidence store computed as SQL over Parquet, out of core (DuckDB).

The memory engine (`starrec.cst.store.build_store`) holds the user x item matrix and a
block of item x item co-occurrences in RAM; past tens of millions of interactions that no
longer fits a small machine (DESIGN.md 6). Here the same counts are SQL that DuckDB runs
under a memory cap, spilling to disk, and the results stream into the same SQLite store
through the shared `StoreWriter`, so neither the log nor any item x item table is ever
held in Python.

What the store precomputes from interactions, and its SQL below:
- item popularity: distinct users per item (`POPULARITY`);
- co-consumption neighbours: per item, the top-k items by cosine of user sets
  (`COOCCURRENCE_TOP_K`), computed for one block of items at a time so that the pair
  aggregation of a block stays within the memory cap;
- first-order transitions: counts of "item, then next item" in each user's sequence
  (`TRANSITION_COUNTS`) and their top-k per item (`TRANSITION_TOP_K`).
Similar-user overlaps are not precomputed by either engine: they depend on the task's
history and are computed per task from the stored interactions. The latent models
(SASRec, ALS) are not SQL: both engines fit them with the same Python code on the
interactions read back from the store being written (`write_latent_models`).

The two engines give the identical store: the same item order (the catalogue's, then
items first seen in the log), the same floating-point formulas (the cosine as
count / (sqrt(pop_a) * sqrt(pop_b)); a transition's share in float32, as the memory
engine's float32 matrices compute it) and the same top-k order (strength descending,
then neighbour index ascending, also across ties at the k-th place).

The statements that compute counts use only portable SQL (no QUALIFY, no DuckDB
functions), so that another engine (Spark SQL) can run them unchanged; loading Parquet
and the session settings are DuckDB's own.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from starrec.config import CSTConfig
from starrec.cst.store import (
    FORMAT_VERSION,
    UNVERSIONED,
    Laps,
    StoreWriter,
    catalogue_texts,
    content_neighbours,
    inputs_hash,
    neighbour_rows,
    store_meta,
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

# the log as the SQL below reads it: user and item ids as text, time as a double, and
# `seq` (the row's place in the log) from the file's own `seq` column or its row number
RAW_VIEW = """
CREATE VIEW raw AS
SELECT CAST({seq} AS BIGINT) AS seq, CAST("user" AS VARCHAR) AS user_id,
       CAST(item AS VARCHAR) AS item_id, CAST("timestamp" AS DOUBLE) AS ts
FROM read_parquet({files}, file_row_number = true)
"""
PARQUET_COLUMNS = "DESCRIBE SELECT * FROM read_parquet({files})"
PARQUET_FILES = "SELECT count(*) FROM glob({files})"
# a version for a Parquet log the caller gives no version for: its rows, order included
PARQUET_DIGEST = "SELECT count(*), bit_xor(hash(seq, user_id, item_id, ts)) FROM raw"

# --- portable SQL: the counts ---------------------------------------------------------

# items of the log the catalogue lacks, in order of first appearance (they follow the
# catalogue's items in the store, as in the memory engine)
EXTRA_ITEMS = """
SELECT r.item_id, MIN(r.seq) AS first_seq
FROM raw r LEFT JOIN catalogue c ON c.item_id = r.item_id
WHERE c.item_id IS NULL
GROUP BY r.item_id
ORDER BY first_seq
"""
USERS = """
CREATE TABLE users AS
SELECT user_id, CAST(ROW_NUMBER() OVER (ORDER BY user_id) AS INTEGER) AS uid
FROM (SELECT DISTINCT user_id FROM raw) d
"""
# the log with integer user and item codes (item = the store's item index)
CODED = """
CREATE TABLE coded AS
SELECT r.seq, u.uid, m.idx AS item, r.ts
FROM raw r JOIN users u ON u.user_id = r.user_id JOIN item_map m ON m.item_id = r.item_id
"""
# who consumed what, once per (user, item): the binary user x item matrix
USER_ITEMS = "CREATE TABLE ui AS SELECT DISTINCT uid, item FROM coded"
POPULARITY = "CREATE TABLE pop AS SELECT item, COUNT(*) AS pop FROM ui GROUP BY item"
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
TRANSITION_COUNTS = """
CREATE TABLE steps AS
SELECT item, nxt, COUNT(*) AS cnt
FROM (SELECT item, LEAD(item) OVER (PARTITION BY uid ORDER BY seq) AS nxt FROM coded) t
WHERE nxt IS NOT NULL
GROUP BY item, nxt
"""
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
SIZES = "SELECT (SELECT COUNT(*) FROM coded), (SELECT COUNT(*) FROM users)"

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


def _connect(workdir: Path, config: CSTConfig):
    try:
        import duckdb
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "cst.engine=duckdb needs the duckdb package: pip install -e '.[scale]'"
        ) from error
    memory_bytes(config.duckdb_memory_limit)  # a bad size fails here, with the setting's name
    spill = workdir / "spill"
    spill.mkdir()
    db = duckdb.connect(str(workdir / "work.duckdb"))
    for statement in SETTINGS:
        db.execute(statement.format(memory_limit=config.duckdb_memory_limit.replace("'", ""),
                                    temp_directory=str(spill).replace("'", "''")))
    if config.duckdb_threads:
        db.execute(THREADS.format(threads=int(config.duckdb_threads)))
    return db


def _table(db, name: str, frame: pd.DataFrame) -> None:
    """A small DataFrame as a DuckDB table (not a view of Python objects): joins then see
    its true size, and DuckDB may spill it like any table."""
    db.register("frame_in", frame)
    db.execute(f"CREATE TABLE {name} AS SELECT * FROM frame_in")
    db.unregister("frame_in")


def _per_item(db, sql: str, n_items: int) -> np.ndarray:
    """An (item, work) query as an array over all items (0 where the query has no row)."""
    out = np.zeros(n_items, dtype=np.int64)
    rows = db.execute(sql).fetchnumpy()
    out[rows["item"].astype(np.int64)] = rows["work"]
    return out


def _one(db, sql: str) -> tuple:
    """A one-row result, fetched to its end (DuckDB refuses more work on a connection
    while a result is unfinished)."""
    (row,) = db.execute(sql).fetchall()
    return row


def _chunks(db, sql: str) -> Iterator[pd.DataFrame]:
    """A query's result in chunks, so that no result is ever held whole."""
    result = db.execute(sql)
    while True:
        chunk = result.fetch_df_chunk(CHUNK_VECTORS)
        if chunk.empty:
            return
        yield chunk


def _open_log(db, source: pd.DataFrame | str | Path, workdir: Path) -> None:
    """Create the `raw` view over the log, writing a DataFrame to Parquet first."""
    if isinstance(source, pd.DataFrame):
        frame_in = pd.DataFrame({
            "seq": np.arange(len(source), dtype=np.int64),
            "user": source["user"].astype(str).to_numpy(dtype=object),
            "item": source["item"].astype(str).to_numpy(dtype=object),
            "timestamp": source["timestamp"].astype(float).to_numpy(),
        })
        path = workdir / "interactions.parquet"
        db.register("frame_in", frame_in)
        db.execute(FRAME_TO_PARQUET.format(path=str(path).replace("'", "''")))
        db.unregister("frame_in")
        del frame_in
        files = _literal(str(path))
    else:
        files = _literal(str(source))
        (n_files,) = _one(db, PARQUET_FILES.format(files=files))
        if n_files == 0:
            raise FileNotFoundError(f"{source}: no Parquet file")
    columns = {row[0] for row in db.execute(PARQUET_COLUMNS.format(files=files)).fetchall()}
    missing = {"user", "item", "timestamp"} - columns
    if missing:
        raise ValueError(f"{source}: the interactions need columns user, item, timestamp "
                         f"(missing {', '.join(sorted(missing))})")
    if "seq" in columns:
        seq = "seq"
    else:
        (n_files,) = _one(db, PARQUET_FILES.format(files=files))
        if n_files != 1:
            raise ValueError(f"{source}: several Parquet files need a `seq` column (the rows' "
                             "order), since their row numbers restart in each file")
        seq = "file_row_number"
    db.execute(RAW_VIEW.format(seq=seq, files=files))


def parquet_inputs_hash(db, items: pd.DataFrame, config: CSTConfig) -> str:
    """A version for a Parquet log: its rows (order included), the item texts and the CST
    settings, as `inputs_hash` does for a DataFrame (the two are different hashes of the
    same inputs; a DataFrame is always versioned by `inputs_hash`)."""
    rows, digest_of_rows = _one(db, PARQUET_DIGEST)
    digest = hashlib.sha256(f"cst-v{FORMAT_VERSION}-parquet".encode())
    digest.update(f"{rows}:{digest_of_rows}".encode())
    digest.update(pd.util.hash_pandas_object(items.reset_index(), index=False).values.tobytes())
    digest.update(config.model_dump_json(exclude=set(UNVERSIONED)).encode())
    return digest.hexdigest()[:16]


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
    db = None
    try:
        db = _connect(workdir, config)
        _open_log(db, interactions, workdir)
        if version is None:
            version = (inputs_hash(interactions, items, config)
                       if isinstance(interactions, pd.DataFrame)
                       else parquet_inputs_hash(db, items, config))
        laps("load")

        catalogue_ids = pd.Index(items.index).unique()
        _table(db, "catalogue", pd.DataFrame({"item_id": catalogue_ids.astype(str)}))
        extra = db.execute(EXTRA_ITEMS).fetchdf()["item_id"].astype(str)
        item_ids = catalogue_ids.append(pd.Index(extra.to_numpy(dtype=object)))
        _table(db, "item_map", pd.DataFrame({"idx": np.arange(len(item_ids), dtype=np.int64),
                                             "item_id": item_ids.astype(str)}))
        for statement in (USERS, CODED, USER_ITEMS, POPULARITY):
            db.execute(statement)
        n_interactions, n_users = _one(db, SIZES)
        popularity = np.zeros(len(item_ids))
        pop = db.execute(POPULARITY_ROWS).fetchnumpy()
        popularity[pop["item"].astype(np.int64)] = pop["pop"]
        laps("graph")

        titles, texts = catalogue_texts(items, item_ids)
        with StoreWriter(path) as writer:
            writer.items(item_ids, titles, texts, popularity)
            writer.interactions(_interaction_rows(db))
            laps("interactions")

            n_items, k = len(item_ids), int(config.neighbours)
            budget = block_groups or max(
                memory_bytes(config.duckdb_memory_limit) // BYTES_PER_GROUP, 1)
            blocks = item_blocks(_per_item(db, COOCCURRENCE_WORK, n_items), n_items, budget)
            log.info("cst: co-occurrence in %d block(s) of items", len(blocks))
            for low, high in progress_bar(blocks, "co-occurrence blocks", unit="block",
                                          enabled=progress and len(blocks) > 1):
                query = COOCCURRENCE_TOP_K.format(lo=low, hi=high, k=k)
                writer.neighbours("cooccurrence", _cooccurrence_rows(db, query))
            laps("co-consumption neighbours")

            db.execute(TRANSITION_COUNTS)
            blocks = item_blocks(_per_item(db, TRANSITION_WORK, n_items), n_items, budget)
            for low, high in blocks:
                query = TRANSITION_TOP_K.format(lo=low, hi=high, k=k)
                writer.neighbours("transition", _transition_rows(db, query))
            writer.transitions(_plain_rows(db, TRANSITIONS))
            laps("transition neighbours")

            vectors, content = content_neighbours(texts, config, progress)
            if content is not None:
                writer.neighbours("content", neighbour_rows(content))
                writer.embeddings(vectors)
                laps("content embeddings")
            db.close()
            db = None
            # fitted in Python on the rows just written, by the memory engine's own code
            write_latent_models(writer, config, progress, laps)
            return writer.finish(store_meta(
                version, dataset, split, config, n_users=int(n_users), n_items=len(item_ids),
                n_interactions=int(n_interactions), laps=laps))
    finally:
        if db is not None:
            db.close()
        shutil.rmtree(workdir, ignore_errors=True)


def _interaction_rows(db) -> Iterator[tuple]:
    for chunk in _chunks(db, INTERACTIONS):
        yield from zip(chunk["seq"].tolist(), chunk["user_id"].astype(str).tolist(),
                       chunk["item"].tolist(), chunk["ts"].astype(float).tolist())


def _cooccurrence_rows(db, query: str) -> Iterator[tuple]:
    for chunk in _chunks(db, query):
        yield from zip(chunk["item"].tolist(), chunk["rnk"].tolist(),
                       chunk["neighbour"].tolist(), chunk["cnt"].astype(float).tolist(),
                       chunk["strength"].astype(float).tolist())


def _transition_rows(db, query: str) -> Iterator[tuple]:
    for chunk in _chunks(db, query):
        counts = chunk["cnt"].to_numpy().astype(np.float32)
        share = (counts / chunk["total"].to_numpy().astype(np.float32)).astype(np.float64)
        yield from zip(chunk["item"].tolist(), chunk["rnk"].tolist(), chunk["nxt"].tolist(),
                       counts.astype(np.float64).tolist(), share.tolist())


def _plain_rows(db, sql: str) -> Iterator[tuple]:
    for chunk in _chunks(db, sql):
        yield from zip(*(chunk[column].tolist() for column in chunk.columns))
