"""CST evidence-store build: time and peak memory on ML-100K and on a synthetic log,
with the memory engine, the DuckDB engine (`cst.engine=duckdb`), the Spark engine
(`cst.engine=spark`) or several.

Each case runs in a fresh subprocess so that its peak resident memory is its own (DuckDB
runs in that process, so its memory is counted too; Spark's driver JVM is a child of that
process, sampled while the case runs: `peak_jvm_rss_mb`). The memory engine builds the
synthetic log in its own process as a DataFrame, as before; the DuckDB and Spark engines
read the same rows from a Parquet file written beforehand by another process, so a log
larger than memory never enters their process. Prints a table and writes
benchmarks/results/cst_build.json (or --out).

    python benchmarks/cst_build.py                 # ML-100K + 10M synthetic rows, memory and duckdb
    python benchmarks/cst_build.py --rows 1000000  # a smaller synthetic log
    python benchmarks/cst_build.py --dataset amazon-games --no-synthetic --engine memory \
        --out benchmarks/results/cst_build-amazon-games.json
    python benchmarks/cst_build.py --rows 100000000 --engine duckdb --no-dataset \
        --duckdb-memory-limit 6GB --out benchmarks/results/cst_build-100m.json
    python benchmarks/cst_build.py --rows 1000000 --engine duckdb spark \
        --spark-conf spark.driver.memory=4g --out benchmarks/results/cst_build-spark.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import tempfile
import threading
import time
from pathlib import Path
from queue import Empty

RESULTS = Path(__file__).parent / "results" / "cst_build.json"


def rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_mb(stage_peaks: dict[str, float] | None) -> float:
    """The process's peak over the whole case: a build resets the kernel's high-water mark
    at each stage (to record the stage's own peak), after which `rss_mb` only sees the
    peak since the last reset, so the stages' peaks count too."""
    return round(max([rss_mb(), *(stage_peaks or {}).values()]), 0)


class ChildMemory:
    """Peak resident memory of this process's children (Spark's driver JVM), sampled
    every `every` seconds from /proc while the context runs, in MiB (0 without /proc)."""

    def __init__(self, every: float = 0.5) -> None:
        self.every, self.peak = every, 0.0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _children_rss_kib(parent: int) -> int:
        total = 0
        for entry in Path("/proc").glob("[0-9]*"):
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
            if int(fields.get("PPid", "0").strip() or 0) == parent:
                total += int(fields.get("VmRSS", "0 kB").split()[0])
                total += ChildMemory._children_rss_kib(int(entry.name))
        return total

    def _sample(self) -> None:
        while not self.done.wait(self.every):
            self.peak = max(self.peak, self._children_rss_kib(os.getpid()) / 1024)

    def __enter__(self) -> ChildMemory:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        self.thread.join()


def synthetic_log(rows: int, users: int, items: int, seed: int = 0):
    """A log with Zipf-like item popularity and per-user timestamps in order; the shape
    that makes co-occurrence expensive (popular items co-occur with almost everything)."""
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, items + 1) ** 0.8
    item_codes = rng.choice(items, size=rows, p=weights / weights.sum())
    user_codes = np.sort(rng.integers(0, users, size=rows))
    frame = pd.DataFrame({
        "user": pd.Categorical.from_codes(user_codes % users, [f"u{i}" for i in range(users)]).astype(str),
        "item": pd.Categorical.from_codes(item_codes, [f"i{i}" for i in range(items)]).astype(str),
        "timestamp": np.arange(rows, dtype=np.int64),
    }).drop_duplicates(["user", "item"])
    catalogue = pd.DataFrame({"title": [f"Item {i}" for i in range(items)]},
                             index=pd.Index([f"i{i}" for i in range(items)], name="item"))
    return frame.reset_index(drop=True), catalogue


def write_synthetic_parquet(queue, rows: int, users: int, items: int, path: str,
                            seed: int = 0) -> None:
    """The rows `synthetic_log` makes (same draws, same first-kept duplicates, same order)
    written to Parquet without ever holding them as Python strings."""
    import duckdb
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, items + 1) ** 0.8
    item_codes = rng.choice(items, size=rows, p=weights / weights.sum())
    user_codes = np.sort(rng.integers(0, users, size=rows)) % users
    _, first = np.unique(user_codes.astype(np.int64) * items + item_codes, return_index=True)
    keep = np.sort(first)
    codes = pd.DataFrame({"u": user_codes[keep].astype(np.int32),
                          "i": item_codes[keep].astype(np.int32), "t": keep.astype(np.int64)})
    del item_codes, user_codes, first, keep
    db = duckdb.connect()
    db.register("codes", codes)
    # insertion order is kept (DuckDB's default), so the file's row order is the log's
    db.execute(f"COPY (SELECT 'u' || u AS \"user\", 'i' || i AS item, t AS \"timestamp\" "
               f"FROM codes) TO '{path}' (FORMAT parquet)")
    queue.put(len(codes))


def case_dataset(queue, engine: str = "memory", settings: dict | None = None,
                 spec: str = "ml-100k", overrides: list[str] | None = None) -> None:
    """The test store of a real dataset (`spec` as `--dataset` names it), every signal on,
    under the `cst.*` config `overrides`."""
    from starrec.config import load_config
    from starrec.cst.evidence import candidate_evidence
    from starrec.cst.store import EvidenceStore, build_store
    from starrec.data.splits import task_interactions
    from starrec.data.tasks import build_split_tasks
    from starrec.experiment import open_dataset

    dataset, _ = open_dataset(spec)
    tasks = build_split_tasks(dataset, "test")
    allowed = task_interactions(dataset, tasks, "test")
    before = rss_mb()
    with tempfile.TemporaryDirectory() as tmp, ChildMemory() as jvm:
        start = time.perf_counter()
        config = load_config(None, overrides).cst.model_copy(
            update={"engine": engine, **(settings or {})})
        path = build_store(allowed, dataset.items, Path(tmp) / "s.sqlite", config, progress=False)
        build = time.perf_counter() - start
        store = EvidenceStore(path)
        meta = store.meta
        size = path.stat().st_size
        store.graph  # noqa: B018 - built on first use; not part of per-task latency
        timings = []
        for task in tasks[:200]:
            t0 = time.perf_counter()
            candidate_evidence(store, task)
            timings.append(time.perf_counter() - t0)
    queue.put({"case": f"{spec} (test store, content and latent models on)", "engine": engine,
               "overrides": overrides or [],
               "rows": meta["n_interactions"],
               "users": meta["n_users"], "items": meta["n_items"], "build_s": round(build, 2),
               "stages_s": meta["timings_s"], "stages_peak_rss_mb": meta.get("peak_rss_mb"),
               "store_mb": round(size / 2**20, 1),
               "peak_rss_mb": peak_mb(meta.get("peak_rss_mb")),
               "rss_before_build_mb": round(before, 0),
               **({"peak_jvm_rss_mb": round(jvm.peak, 0)} if engine == "spark" else {}),
               "evidence_ms_median": round(1000 * sorted(timings)[len(timings) // 2], 2)})


def case_synthetic(queue, engine: str, rows: int, users: int, items: int, parquet: str | None,
                   settings: dict, workdir: str | None) -> None:
    import sqlite3

    import pandas as pd

    from starrec.config import CSTConfig
    from starrec.cst.store import build_store

    # the latent models are the same Python code for both engines (the ML-100K case times
    # them); this case measures the count SQL at scale
    config = CSTConfig(content=False, latent=False, engine=engine, **settings)
    if engine in ("duckdb", "spark"):
        log = parquet  # read by DuckDB or Spark, never loaded here
        catalogue = pd.DataFrame({"title": [f"Item {i}" for i in range(items)]},
                                 index=pd.Index([f"i{i}" for i in range(items)], name="item"))
    else:
        log, catalogue = synthetic_log(rows, users, items)
    before = rss_mb()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, ChildMemory() as jvm:
        start = time.perf_counter()
        if engine == "duckdb":
            from starrec.cst.sql import build_store_duckdb

            path = build_store_duckdb(log, catalogue, Path(tmp) / "s.sqlite", config,
                                      progress=False)
        elif engine == "spark":
            from starrec.cst.spark import build_store_spark

            path = build_store_spark(log, catalogue, Path(tmp) / "s.sqlite", config,
                                     progress=False)
        else:
            path = build_store(log, catalogue, Path(tmp) / "s.sqlite", config, progress=False)
        build = time.perf_counter() - start
        size = path.stat().st_size
        meta = {k: json.loads(v)
                for k, v in sqlite3.connect(path).execute("SELECT key, value FROM meta")}
    queue.put({"case": f"synthetic {rows:,} rows (content and latent models off)", "engine": engine,
               "duckdb_memory_limit": (settings["duckdb_memory_limit"] if engine == "duckdb"
                                       else None),
               **({"spark_master": settings.get("spark_master") or "local[*]",
                   "spark_conf": settings.get("spark_conf", {}),
                   "peak_jvm_rss_mb": round(jvm.peak, 0)} if engine == "spark" else {}),
               "rows": meta["n_interactions"], "users": users,
               "items": items, "build_s": round(build, 1), "stages_s": meta["timings_s"],
               "store_mb": round(size / 2**20, 1), "peak_rss_mb": peak_mb(meta.get("peak_rss_mb")),
               "rss_before_build_mb": round(before, 0)})


class OverCap(RuntimeError):
    """A case's process went over the resident-memory cap and was stopped."""


def resident_mb(pid: int) -> float:
    """Resident memory of process `pid` now, in MiB (0 without /proc)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run(target, *args, rss_cap_mb: float | None = None) -> dict:
    """`target(queue, *args)` in a fresh process, and what it put on the queue; a process
    that dies before reporting (killed for memory, an error) is an error here, not a hang.
    With `rss_cap_mb`, the process is sampled every 0.2 s and stopped (OverCap) once its
    resident memory passes the cap, as a memory-limited container would stop it."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(queue, *args))
    start = time.perf_counter()
    process.start()
    while True:
        try:
            result = queue.get(timeout=0.2)
            break
        except Empty:
            if rss_cap_mb is not None and (used := resident_mb(process.pid)) > rss_cap_mb:
                process.kill()
                process.join()
                raise OverCap(f"resident memory passed {rss_cap_mb:,.0f} MiB ({used:,.0f}) after "
                              f"{time.perf_counter() - start:.0f} s; stopped") from None
            if not process.is_alive():
                raise RuntimeError(f"{target.__name__} exited with code {process.exitcode} "
                                   "before reporting a result") from None
    process.join()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--engine", nargs="+", choices=("memory", "duckdb", "spark"),
                        default=["memory", "duckdb"], help="engines to run, in this order")
    parser.add_argument("--dataset", action="append", default=None,
                        help="a real dataset's test store to build (ml-100k, amazon-games, ...; "
                        "repeatable; default ml-100k)")
    parser.add_argument("--no-ml100k", "--no-dataset", dest="no_dataset", action="store_true",
                        help="no real dataset: only the synthetic log")
    parser.add_argument("--no-synthetic", action="store_true", help="no synthetic log")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a cst.* config override for the real datasets' stores, e.g. "
                        "cst.latent_sasrec.epochs=5")
    parser.add_argument("--duckdb-memory-limit", default="4GB")
    parser.add_argument("--duckdb-threads", type=int, default=None)
    parser.add_argument("--spark-master", default=None,
                        help="cst.spark_master (default: what Spark is told, else local[*])")
    parser.add_argument("--spark-conf", action="append", default=[], metavar="KEY=VALUE",
                        help="a Spark setting (cst.spark_conf), e.g. spark.driver.memory=4g")
    parser.add_argument("--workdir", default=None,
                        help="folder for the stores, the Parquet log and DuckDB's spill files "
                             "(default: the system's temporary folder)")
    parser.add_argument("--rss-cap-mb", type=float, default=None,
                        help="stop a synthetic case whose process passes this resident memory "
                        "and record it as over the cap (e.g. 8192: what a machine with 8 GiB "
                        "for the build allows)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    settings = {"duckdb_memory_limit": args.duckdb_memory_limit,
                "duckdb_threads": args.duckdb_threads, "spark_master": args.spark_master,
                "spark_conf": dict(item.split("=", 1) for item in args.spark_conf)}
    results: list[dict] = []

    def save() -> None:  # after every case: a long run that stops keeps what it measured
        payload = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                              f"{platform.system()}", "cases": results}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")

    if not args.no_dataset:
        for spec in args.dataset or ["ml-100k"]:
            for engine in args.engine:
                results.append(run(case_dataset, engine, settings, spec, args.overrides))
                print(json.dumps(results[-1]), flush=True)
                save()
    synthetic_engines = [] if args.no_synthetic else args.engine
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        parquet = None
        if {"duckdb", "spark"} & set(synthetic_engines):
            parquet = str(Path(tmp) / "log.parquet")
            start = time.perf_counter()
            kept = run(write_synthetic_parquet, args.rows, args.users, args.items, parquet)
            print(f"synthetic log: {kept:,} rows written to Parquet in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        for engine in synthetic_engines:
            try:
                results.append(run(case_synthetic, engine, args.rows, args.users, args.items,
                                   parquet, settings, args.workdir, rss_cap_mb=args.rss_cap_mb))
            except OverCap as over:
                results.append({"case": f"synthetic {args.rows:,} rows drawn (content and "
                                        "latent models off)", "engine": engine,
                                "rss_cap_mb": args.rss_cap_mb, "failed": str(over)})
            print(json.dumps(results[-1]), flush=True)
            save()
    save()
    print("| case | engine | rows | build s | peak RSS MiB | store MiB |")
    print("|---|---|---|---|---|---|")
    for r in results:
        if "failed" in r:
            print(f"| {r['case']} | {r['engine']} | - | {r['failed']} | - | - |")
            continue
        print(f"| {r['case']} | {r['engine']} | {r['rows']:,} | {r['build_s']} | "
              f"{r['peak_rss_mb']:.0f} | {r['store_mb']} |")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
