"""The CST evidence store computed by Spark: the statements of `starrec.cst.sql` run by
Spark SQL, in local mode or on a cluster, written into the same SQLite store.

The count SQL is the DuckDB engine's, statement for statement; the differences of the
dialect (a table is `CACHE TABLE ... AS SELECT`, kept by the executors in memory and on
disk; identifiers are quoted with backticks; a Parquet log is versioned with `xxhash64`)
are `starrec.cst.sql.SPARK`. The build is the same function too (`write_store`): Spark
computes the tables, the driver streams each result into the SQLite store through the
shared `StoreWriter`, then fits the latent models (SASRec, ALS) in Python on the rows the
store holds, as every engine does. So `--engine spark` writes the store `memory` and
`duckdb` write.

What comes back to the driver: the item ids (catalogue plus items first seen in the log)
and one popularity per item; every interaction, one partition at a time, as the store
keeps them all; the top `cst.neighbours` co-consumed and next items per item; and every
distinct (item, next item) pair with its count. The interactions and the pairs are
streamed (`toLocalIterator`), never held whole; the latent models then read the
interactions back from the store (docs/scaling.md sizes all this).

The session: `cst.spark_master` (a master URL: `local[*]`, `spark://host:7077`, `yarn`,
`k8s://...`) or, when it is unset, what Spark itself is told: `spark-submit --master`,
`$MASTER`, `spark-defaults.conf`, else `local[*]`. `cst.spark_conf` adds any Spark
setting (driver memory, executor memory, shuffle partitions). A session this process
already runs (a notebook's, spark-submit's) is used as it is, in a session of its own
(`newSession`: temporary views and SQL settings apart), and left running; the cached
tables are released when the build ends.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from starrec.config import CSTConfig
from starrec.cst.sql import SPARK, Table, log_columns, log_frame, raw_view, write_store
from starrec.cst.store import Laps

log = logging.getLogger(__name__)

# rows per chunk streamed from Spark into the store
CHUNK_ROWS = 50_000
# the log's temporary view, which `raw` reads
LOG_VIEW = "star_log"
# settings of a session this process starts (cst.spark_conf wins): no console progress
# bars between the build's own lines
SESSION_DEFAULTS = {"spark.ui.showConsoleProgress": "false"}
# SQL settings of the build's own session (cst.spark_conf wins): adaptive execution may
# merge the small partitions of a cached table (by default a cached table keeps all
# spark.sql.shuffle.partitions of its plan, and every query on it runs as many tasks)
SQL_DEFAULTS = {"spark.sql.optimizer.canChangeCachedPlanOutputPartitioning": "true"}
# partitions per shuffle in local mode, per core, where nothing sets them (Spark's 200
# are for clusters: on a few cores each costs a task in every stage)
LOCAL_PARTITIONS_PER_CORE = 4
SHUFFLE_PARTITIONS = "spark.sql.shuffle.partitions"
# Parquet errors that mean "no such log" (Spark's error conditions)
NOT_FOUND = ("PATH_NOT_FOUND", "UNABLE_TO_INFER_SCHEMA")


def spark_settings(config: CSTConfig) -> dict[str, str]:
    """The Spark settings of a session started for `config`, as Spark reads them."""
    settings = dict(SESSION_DEFAULTS)
    for key, value in config.spark_conf.items():
        settings[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return settings


def spark_session(config: CSTConfig, base=None):
    """A Spark session of its own for one build: a new session of `base`, default the
    process's Spark, started here (`cst.spark_master`, `cst.spark_conf`) when there is
    none; with the build's SQL settings (`SQL_DEFAULTS`, those of `cst.spark_conf`)."""
    try:
        from pyspark import SparkContext
        from pyspark.sql import SparkSession
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "cst.engine=spark needs the pyspark package (and a Java runtime): "
            "pip install -e '.[spark]'") from error
    settings = spark_settings(config)
    if base is None and SparkContext._active_spark_context is None:
        if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
            raise FileNotFoundError(
                "cst.engine=spark needs a Java runtime (17 or 21) on PATH or in JAVA_HOME: "
                "apt-get install openjdk-17-jre-headless (bash scripts/setup.sh does as root)")
        builder = SparkSession.builder.appName("star-cst")
        if config.spark_master:
            builder = builder.master(config.spark_master)
        for key, value in settings.items():
            builder = builder.config(key, value)
        base = builder.getOrCreate()
        log.info("cst: Spark %s started on %s", base.version, base.sparkContext.master)
    elif base is None:
        base = SparkSession.builder.getOrCreate()
    context = base.sparkContext
    if config.spark_master and config.spark_master != context.master:
        log.warning("cst: cst.spark_master=%s ignored: this process already runs Spark on %s",
                    config.spark_master, context.master)
    session = base.newSession()
    if (context.master.startswith("local") and SHUFFLE_PARTITIONS not in settings
            and not context.getConf().contains(SHUFFLE_PARTITIONS)):
        session.conf.set(SHUFFLE_PARTITIONS,
                         str(LOCAL_PARTITIONS_PER_CORE * context.defaultParallelism))
    for key, value in {**SQL_DEFAULTS, **settings}.items():
        if key.startswith("spark.sql."):  # what a running context still takes, per session
            try:
                session.conf.set(key, value)
            except Exception as error:  # a static setting: only a starting Spark takes it
                if context.getConf().get(key, None) != value:
                    log.warning("cst: %s=%s not applied to a running Spark: %s", key, value,
                                str(error).splitlines()[0])
    return session


class SparkEngine:
    """Spark SQL on one session: tables cached by the executors, results streamed to the
    driver. All items in one query per kind of neighbour: the executors spill the pairs
    of a large log, so no blocks of items are needed (`block_groups` None)."""

    dialect = SPARK
    block_groups = None

    def __init__(self, session) -> None:
        self.spark = session
        self.cached: list[str] = []
        self.views: list[str] = []

    def create(self, table: Table) -> None:
        self.spark.sql(self.dialect.table(table))
        self.cached.append(table.name)

    def fetch(self, sql: str) -> pd.DataFrame:
        result = self.spark.sql(sql)
        return pd.DataFrame.from_records([tuple(row) for row in result.collect()],
                                         columns=result.columns)

    def chunks(self, sql: str) -> Iterator[pd.DataFrame]:
        """The result partition by partition, in its order (the partitions of a sorted
        result are its ranges, in order), in chunks of CHUNK_ROWS rows."""
        result = self.spark.sql(sql)
        columns, rows = result.columns, []
        for row in result.toLocalIterator(prefetchPartitions=True):
            rows.append(tuple(row))
            if len(rows) == CHUNK_ROWS:
                yield pd.DataFrame.from_records(rows, columns=columns)
                rows = []
        if rows:
            yield pd.DataFrame.from_records(rows, columns=columns)

    def _view(self, name: str, frame) -> None:
        frame.createOrReplaceTempView(name)
        self.views.append(name)

    def frame_table(self, name: str, frame: pd.DataFrame) -> None:
        import pyarrow as pa

        # from Arrow, not pandas: the columns keep their types whatever pandas' version
        self._view(name, self.spark.createDataFrame(
            pa.Table.from_pandas(frame, preserve_index=False)))

    def open_log(self, source: pd.DataFrame | str | Path) -> None:
        """Create the `raw` view over the log: a DataFrame is sent to Spark through the
        driver; a Parquet path (a file, a folder or a glob, any URL Spark reads: hdfs://,
        s3a://, ...) is read by the executors and never enters this process."""
        import pyarrow as pa

        if isinstance(source, pd.DataFrame):
            frame = self.spark.createDataFrame(pa.table(log_frame(source)))
            seq = "seq"
        else:
            from pyspark.errors import AnalysisException
            from pyspark.sql import functions as F

            try:
                frame = self.spark.read.parquet(str(source))
            except AnalysisException as error:
                if (error.getCondition() or "") in NOT_FOUND:
                    raise FileNotFoundError(f"{source}: no Parquet file") from None
                raise
            n_files = len(frame.inputFiles())
            if n_files == 0:
                raise FileNotFoundError(f"{source}: no Parquet file")
            seq = log_columns(str(source), set(frame.columns), n_files)
            if seq == "file_row_number":  # the row's place in its (one) file
                frame = frame.select("*", F.col("_metadata.row_index").alias(seq))
        self._view(LOG_VIEW, frame)
        self.spark.sql(raw_view(self.dialect, LOG_VIEW, seq))
        self.views.append("raw")

    def close(self) -> None:
        """Release the cached tables and drop the views (the session stays). Called again
        after a failure, it must not hide that failure: what it cannot release it logs."""
        cached, views = self.cached, self.views
        self.cached, self.views = [], []
        try:
            for name in reversed(cached):
                for statement in self.dialect.release:
                    self.spark.sql(statement.format(name=name))
            for name in reversed(views):
                self.spark.catalog.dropTempView(name)
        except Exception as error:  # Spark gone: nothing is left to release
            log.warning("cst: Spark tables not released: %s", str(error).splitlines()[0])


def build_store_spark(
    interactions: pd.DataFrame | str | Path,
    items: pd.DataFrame,
    path: Path,
    config: CSTConfig,
    *,
    version: str | None = None,
    dataset: str = "",
    split: str = "",
    progress: bool = True,
    session=None,
) -> Path:
    """Compute the store with Spark and write it to `path` (atomically, on the driver):
    the store `build_store` writes with the memory and DuckDB engines.

    `interactions` is a DataFrame (user, item, timestamp; each user's rows in time order)
    or a Parquet file, folder or glob with those columns whose row order (or `seq`
    column, required for several files) is each user's sequence; give a path the
    executors can read (a shared file system, HDFS, S3) on a cluster. `session` is a
    SparkSession to run in (in a new session of it, which the build releases); default:
    the process's Spark, or one started by `spark_session`."""
    laps = Laps()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = SparkEngine(spark_session(config, base=session))
    try:
        engine.open_log(interactions)
        return write_store(engine, interactions, items, path, config, version=version,
                           dataset=dataset, split=split, progress=progress, laps=laps)
    finally:
        engine.close()

