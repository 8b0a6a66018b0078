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


def efficiency_table(results: list[dict]) -> str:
    """The LLM systems' cost per task (DESIGN.md 3.4), with each one's speed-up over the
    teacher (`mars`; the first LLM system when none is listed): the ratio transfers between
    machines, the seconds do not. Empty when no result made LLM calls."""
    rows = [r for r in results if r["efficiency"].get("llm_calls_per_task")]
    if not rows:
        return ""
    reference = next((r for r in rows if r["system"] == "mars"), rows[0])
    header = ["system", "tasks", "n", "median s/task", "p95 s/task", "LLM calls/task",
              "prompt tokens/task", "completion tokens/task", f"speed-up vs {reference['system']}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in rows:
        e = result["efficiency"]
        ratio = reference["efficiency"]["median_s"] / e["median_s"] if e["median_s"] else float("nan")
        lines.append("| " + " | ".join([
            result["system"], _tasks_label(result), str(result["n_tasks"]),
            f"{e['median_s']:.1f}", f"{e['p95_s']:.1f}", f"{e['llm_calls_per_task']:.1f}",
            f"{e['prompt_tokens_per_task']:,.0f}", f"{e['completion_tokens_per_task']:,.0f}",
            f"{ratio:.1f}x"]) + " |")
    return "\n".join(lines)


def full_report(results: list[dict]) -> str:
    """The quality table, then the LLM systems' cost table when there is one."""
    cost = efficiency_table(results)
    return markdown_table(results) + (f"\n\n{cost}" if cost else "")
