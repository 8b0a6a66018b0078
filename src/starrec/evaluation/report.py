"""Markdown tables from results JSON files, for the README and the terminal."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

COLUMNS = ("HR@1", "HR@3", "HR@5", "NDCG@10", "MRR", "valid_rate")


def load_results(paths: Iterable[Path]) -> list[dict]:
    return [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]


def _tasks_label(result: dict) -> str:
    users = result.get("config", {}).get("users", "")
    return f"{result['split']} {users}".strip()


def markdown_table(results: list[dict]) -> str:
    """One row per result: AvgHR with its 95% interval, the other metrics, latency."""
    header = ["system", "tasks", "n", "AvgHR [95% CI]", *COLUMNS, "median ms/task"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in results:
        metrics, ci = result["metrics"], result["ci95"]
        low, high = ci["AvgHR"]
        row = [
            result["system"],
            _tasks_label(result),
            str(result["n_tasks"]),
            f"{metrics['AvgHR']:.1f} [{low:.1f}, {high:.1f}]",
            *(f"{metrics[c]:.1f}" for c in COLUMNS),
            f"{1000 * result['efficiency']['median_s']:.2f}",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
