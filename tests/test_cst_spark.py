"""The Spark engine of the CST store (`starrec.cst.spark`) runs the DuckDB engine's SQL
(`starrec.cst.sql`) on Spark in local mode and writes the store the memory and DuckDB
engines write: same tables, same rows, floats within 1e-9 relative, same tie order.

One Spark session serves the module (Spark takes tens of seconds to start); each build
runs in a new session of it, as `build_store_spark` does with a running Spark. Without
pyspark or a Java runtime the Spark tests are skipped, saying which is missing."""

import os
import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from starrec.cli.main import app
from starrec.config import CSTConfig
from starrec.cst.store import EvidenceStore, build_store, inputs_hash
from tests.conftest import write_dataset_folder
from tests.test_cst_duckdb import MEMORY, assert_same_store, synthetic_log, tables

SPARK = MEMORY.model_copy(update={"engine": "spark"})


def zipf_log(users: int = 200, items: int = 400, rows: int = 8_000, seed: int = 0):
    """A small log shaped like the benchmark's (Zipf-popular items, each user's rows in
    time order, a (user, item) pair once), ids whose text and numeric orders differ."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, items + 1) ** 0.8
    frame = pd.DataFrame({
        "user": [f"u{u}" for u in np.sort(rng.integers(0, users, size=rows))],
        "item": [f"i{i}" for i in rng.choice(items, size=rows, p=weights / weights.sum())],
        "timestamp": np.arange(rows, dtype=np.int64),
    }).drop_duplicates(["user", "item"]).reset_index(drop=True)
    catalogue = pd.DataFrame({"title": [f"Item {i}" for i in range(items - 5)]},
                             index=pd.Index([f"i{i}" for i in range(items - 5)], name="item"))
    return frame, catalogue  # the last five items are missing from the catalogue


# --- without Spark ----------------------------------------------------------------------

def test_spark_settings_choose_how_not_what():
    config = CSTConfig(**{**MEMORY.model_dump(), "engine": "spark",
                          "spark_master": "spark://head:7077",
                          "spark_conf": {"spark.driver.memory": "8g",
                                         "spark.sql.shuffle.partitions": 64,
                                         "spark.sql.adaptive.enabled": True}})
    frame, catalogue = synthetic_log()
    assert inputs_hash(frame, catalogue, config) == inputs_hash(frame, catalogue, MEMORY)
    from starrec.cst.spark import spark_settings

    settings = spark_settings(config)
    assert settings["spark.driver.memory"] == "8g"
    assert settings["spark.sql.shuffle.partitions"] == "64"
    assert settings["spark.sql.adaptive.enabled"] == "true"
    assert settings["spark.ui.showConsoleProgress"] == "false"  # a default the config may change
    with pytest.raises(ValueError):
        CSTConfig(engine="bigquery")


def test_a_missing_java_runtime_is_one_clear_error(tmp_path, monkeypatch):
    pyspark = pytest.importorskip("pyspark", reason="pyspark is not installed")
    monkeypatch.setattr(pyspark.SparkContext, "_active_spark_context", None)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("JAVA_HOME", raising=False)
    frame, catalogue = synthetic_log()
    with pytest.raises(FileNotFoundError, match="Java runtime"):
        build_store(frame, catalogue, tmp_path / "s.sqlite", SPARK, progress=False)
    assert not list(tmp_path.iterdir())


# --- on Spark, local mode ---------------------------------------------------------------

@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    pytest.importorskip("pyspark", reason="pyspark is not installed: pip install -e '.[spark]'")
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        pytest.skip("Spark needs a Java runtime (17 or 21) on PATH or in JAVA_HOME: "
                    "bash scripts/setup.sh installs openjdk-17-jre-headless as root")
    from pyspark.sql import SparkSession

    # two partitions per shuffle, so that results in order cross partitions; the rest makes
    # Spark quick on tiny data (no code generation, no optimising JIT, no adaptive plans:
    # 20 s for the first build here instead of 60)
    session = (SparkSession.builder.master("local[2]").appName("star-cst-test")
               .config("spark.sql.warehouse.dir", str(tmp_path_factory.mktemp("warehouse")))
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false")
               .config("spark.sql.shuffle.partitions", "2")
               .config("spark.sql.adaptive.enabled", "false")
               .config("spark.sql.codegen.wholeStage", "false")
               .config("spark.sql.codegen.factoryMode", "NO_CODEGEN")
               .config("spark.driver.extraJavaOptions", "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC")
               .getOrCreate())
    yield session
    session.stop()


def test_spark_writes_the_identical_store_on_a_synthetic_log(spark, tmp_path):
    """The log with what the engines could disagree on (repeated pairs, self-transitions,
    items the catalogue lacks, ids that sort differently, ties), latent models included
    (the DuckDB engine writes this store too: tests/test_cst_duckdb.py)."""
    frame, catalogue = synthetic_log()
    config = MEMORY.model_copy(update={  # a quick sequence model: the rows it is fitted on count
        "latent_sasrec": MEMORY.latent_sasrec.model_copy(update={"epochs": 3})})
    memory = build_store(frame, catalogue, tmp_path / "memory.sqlite", config, progress=False)
    # through build_store's switch, in the running Spark (cst.spark_master is not asked)
    path = build_store(frame, catalogue, tmp_path / "spark.sqlite",
                       config.model_copy(update={"engine": "spark"}), progress=False)
    assert_same_store(memory, path)
    assert {row[0] for row in tables(path)["latent"]} == {"als", "sasrec"}
    store = EvidenceStore(path)
    assert store.meta["config"]["engine"] == "spark"
    assert store.neighbours("cooccurrence", "i0", 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory.sqlite", "spark.sqlite"]
    assert spark.sparkContext._jsc.sc().getPersistentRDDs().isEmpty()  # nothing left cached


def test_spark_reads_a_parquet_log_in_file_order(spark, tmp_path):
    """A small Zipf log as one Parquet file without `seq` (the file's row order is the
    log's) gives the store the memory engine writes from the DataFrame and DuckDB from
    the same file."""
    pytest.importorskip("duckdb")
    from starrec.cst.spark import build_store_spark
    from starrec.cst.sql import build_store_duckdb

    frame, catalogue = zipf_log()
    config = MEMORY.model_copy(update={"latent": False, "neighbours": 5})
    memory = build_store(frame, catalogue, tmp_path / "memory.sqlite", config, progress=False)
    frame.to_parquet(tmp_path / "log.parquet", index=False)
    duck = build_store_duckdb(tmp_path / "log.parquet", catalogue, tmp_path / "duckdb.sqlite",
                              config.model_copy(update={"engine": "duckdb"}), progress=False)
    path = build_store_spark(tmp_path / "log.parquet", catalogue, tmp_path / "spark.sqlite",
                             config.model_copy(update={"engine": "spark"}), progress=False,
                             session=spark)
    assert_same_store(memory, path, same_version=False)
    assert_same_store(duck, path, same_version=False)  # a Parquet log's version is per engine
    counts = tables(path)
    assert len(counts["interactions"]) == len(frame) > 5000
    assert len(counts["neighbours"]) > 3000  # co-consumption and transitions, 5 per item
    assert {row[1] for row in counts["items"][395:]} <= {f"i{i}" for i in range(395, 400)}


def test_spark_parquet_versions_and_errors(spark, tmp_path):
    from starrec.cst.spark import SparkEngine, build_store_spark
    from starrec.cst.sql import parquet_inputs_hash

    frame, catalogue = synthetic_log()

    def version(source) -> str:
        engine = SparkEngine(spark.newSession())
        try:
            engine.open_log(source)
            return parquet_inputs_hash(engine, catalogue, SPARK)
        finally:
            engine.close()
            assert not engine.spark.catalog.listTables()  # its views dropped

    frame.to_parquet(tmp_path / "log.parquet", index=False)
    first = version(tmp_path / "log.parquet")
    assert version(str(tmp_path / "log.parquet")) == first
    (tmp_path / "parts").mkdir()
    shuffled = frame.assign(seq=np.arange(len(frame))).sample(frac=1.0, random_state=0)
    shuffled.iloc[::2].to_parquet(tmp_path / "parts" / "a.parquet", index=False)
    shuffled.iloc[1::2].to_parquet(tmp_path / "parts" / "b.parquet", index=False)
    assert version(str(tmp_path / "parts" / "*.parquet")) == first  # the same rows, in order
    frame.assign(timestamp=frame["timestamp"] + 1).to_parquet(tmp_path / "log.parquet",
                                                              index=False)
    assert version(tmp_path / "log.parquet") != first

    def build(source):
        return build_store_spark(source, catalogue, tmp_path / "bad.sqlite", SPARK,
                                 progress=False, session=spark)

    frame.drop(columns="timestamp").to_parquet(tmp_path / "bad.parquet", index=False)
    with pytest.raises(ValueError, match="missing timestamp"):
        build(tmp_path / "bad.parquet")
    shuffled.drop(columns="seq").iloc[::2].to_parquet(tmp_path / "parts" / "a.parquet",
                                                      index=False)
    with pytest.raises(ValueError, match="seq"):
        build(str(tmp_path / "parts" / "*.parquet"))
    with pytest.raises(FileNotFoundError, match="no Parquet file"):
        build(str(tmp_path / "nowhere" / "*.parquet"))
    assert not (tmp_path / "bad.sqlite").exists()


def test_cst_build_engine_spark(spark, tmp_path, monkeypatch):
    monkeypatch.setenv("STAR_HOME", str(tmp_path / "home"))
    data = tmp_path / "shop"
    write_dataset_folder(data, n_users=30, n_items=50)
    runner = CliRunner()
    base = ["cst", "build", "--dataset", str(data), "--set", "cst.content=false",
            "--set", "cst.latent=false", "--set", "cst.ranker=manual"]
    memory = runner.invoke(app, [*base, "--out", str(tmp_path / "m.sqlite")])
    assert memory.exit_code == 0, memory.output
    built = runner.invoke(app, [*base, "--engine", "spark", "--out", str(tmp_path / "s.sqlite")])
    assert built.exit_code == 0, built.output
    assert "by the spark engine" in built.output
    assert_same_store(tmp_path / "m.sqlite", tmp_path / "s.sqlite")


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("STAR_TEST_SPARK_ML100K"),
                    reason="minutes of Spark on 2 cores: set STAR_TEST_SPARK_ML100K=1 to run")
def test_spark_writes_the_identical_store_on_ml100k(spark, ml100k, tmp_path):
    from starrec.data.splits import task_interactions
    from starrec.data.tasks import build_split_tasks

    tasks = build_split_tasks(ml100k, "test")
    allowed = task_interactions(ml100k, tasks, "test")
    config = CSTConfig(content=False, latent=False)  # the SQL, not minutes of SASRec
    memory = build_store(allowed, ml100k.items, tmp_path / "memory.sqlite", config, progress=False)
    path = build_store(allowed, ml100k.items, tmp_path / "spark.sqlite",
                       config.model_copy(update={"engine": "spark"}), progress=False)
    assert_same_store(memory, path)
    assert len(tables(path)["neighbours"]) > 50_000
