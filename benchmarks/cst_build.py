"""CST evidence-store build: time and peak memory on ML-100K and on a synthetic log.

Each case runs in a fresh subprocess so that its peak resident memory is its own.
Prints a table and writes benchmarks/results/cst_build.json.

    python benchmarks/cst_build.py                 # ML-100K + 10M synthetic rows
    python benchmarks/cst_build.py --rows 1000000  # a smaller synthetic log
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "cst_build.json"


def rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def case_ml100k(queue) -> None:
    from starrec.config import CSTConfig
    from starrec.cst.evidence import candidate_evidence
    from starrec.cst.store import EvidenceStore, build_store
    from starrec.data.movielens import load_movielens_100k
    from starrec.data.splits import task_interactions
    from starrec.data.tasks import build_split_tasks

    dataset = load_movielens_100k("recbole")
    tasks = build_split_tasks(dataset, "test")
    allowed = task_interactions(dataset, tasks, "test")
    before = rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = build_store(allowed, dataset.items, Path(tmp) / "s.sqlite", CSTConfig(), progress=False)
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
    queue.put({"case": "ml-100k (test store, content on)", "rows": meta["n_interactions"],
               "users": meta["n_users"], "items": meta["n_items"], "build_s": round(build, 2),
               "stages_s": meta["timings_s"], "store_mb": round(size / 2**20, 1),
               "peak_rss_mb": round(rss_mb(), 0), "rss_before_build_mb": round(before, 0),
               "evidence_ms_median": round(1000 * sorted(timings)[len(timings) // 2], 2)})


def case_synthetic(queue, rows: int, users: int, items: int) -> None:
    from starrec.config import CSTConfig
    from starrec.cst.store import build_store

    frame, catalogue = synthetic_log(rows, users, items)
    before = rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        path = build_store(frame, catalogue, Path(tmp) / "s.sqlite", CSTConfig(content=False),
                           progress=False)
        build = time.perf_counter() - start
        size = path.stat().st_size
        import sqlite3

        meta = {k: json.loads(v) for k, v in sqlite3.connect(path).execute("SELECT key, value FROM meta")}
    queue.put({"case": f"synthetic {rows:,} rows (content off)", "rows": len(frame), "users": users,
               "items": items, "build_s": round(build, 1), "stages_s": meta["timings_s"],
               "store_mb": round(size / 2**20, 1), "peak_rss_mb": round(rss_mb(), 0),
               "rss_before_build_mb": round(before, 0)})


def run(target, *args) -> dict:
    queue = mp.get_context("spawn").Queue()
    process = mp.get_context("spawn").Process(target=target, args=(queue, *args))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    results = [run(case_ml100k), run(case_synthetic, args.rows, args.users, args.items)]
    payload = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}",
               "cases": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print("| case | rows | build s | peak RSS MiB | store MiB |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['case']} | {r['rows']:,} | {r['build_s']} | {r['peak_rss_mb']:.0f} | {r['store_mb']} |")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
