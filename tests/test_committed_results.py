"""The results the README cites, as committed: every results JSON has its per-task file
beside it (DESIGN.md 3.4) with one row per task whose ranks give its AvgHR back, and no
committed results file is over the repository's 5 MB limit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from starrec.evaluation.metrics import per_task_metrics
from starrec.evaluation.paired import read_task_rows

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
MAX_BYTES = 5 * 1024 * 1024


def results_files() -> list[Path]:
    found = []
    for path in sorted(RESULTS.rglob("*.json")):
        payload = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(payload, dict) and {"metrics", "n_tasks", "provenance"} <= set(payload):
            found.append(path)
    return found


def test_the_results_folder_holds_results():
    assert len(results_files()) >= 10


@pytest.mark.parametrize("path", results_files(), ids=lambda p: str(p.relative_to(RESULTS)))
def test_every_results_json_has_its_per_task_rows(path: Path):
    result = json.loads(path.read_text(encoding="utf-8"))
    assert path.with_suffix(".tasks.jsonl").exists(), f"{path.name}: no per-task file"
    rows = read_task_rows(path)
    assert len(rows) == result["n_tasks"] == len({r["task_id"] for r in rows})
    avg_hr = 100 * sum(per_task_metrics(int(r["rank"]))["AvgHR"] for r in rows) / len(rows)
    assert avg_hr == pytest.approx(result["metrics"]["AvgHR"], abs=0.06)


def test_no_committed_results_file_is_over_5_mb():
    big = [p.name for p in RESULTS.rglob("*") if p.is_file() and p.stat().st_size > MAX_BYTES]
    assert not big
