"""Markdown tables from results JSON files, for the README and the terminal."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

COLUMNS = ("HR@1", "HR@3", "HR@5", "NDCG@10", "MRR", "valid_rate")
# what a results JSON must hold for a table row; anything else is not one
REQUIRED = ("system", "split", "n_tasks", "metrics", "ci95", "efficiency")
# how each candidate order is labelled in a table (DESIGN.md 3.7)
PRESENTATIONS = {"presented": "task file (shuffled)", "cst": "cst ranker's order"}


def load_result(path: Path) -> dict[str, Any]:
    """One results JSON, checked to be one: a missing file, bad JSON or another JSON
    raises `ValueError` naming the file, which the CLI prints as one line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot be read ({error})") from None
    try:
        result = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not JSON ({error})") from None
    missing = [k for k in REQUIRED if not isinstance(result, dict) or k not in result]
    if missing or not isinstance(result["metrics"], dict) or "AvgHR" not in result["metrics"] \
            or "AvgHR" not in (result["ci95"] or {}):
        raise ValueError(f"{path}: not a results JSON of `star eval` (missing "
                         f"{', '.join(missing) or 'metrics.AvgHR'})")
    return result


def load_results(paths: Iterable[Path]) -> list[dict]:
    return [load_result(Path(p)) for p in paths]


def _system_label(result: dict) -> str:
    """The system, with the variant a pipeline gave it (a student after SFT or GRPO)."""
    variant = result.get("config", {}).get("variant")
    return f"{result['system']} ({variant})" if variant else result["system"]


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
            _system_label(result),
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
            _system_label(result), _tasks_label(result), str(result["n_tasks"]),
            f"{e['median_s']:.1f}", f"{e['p95_s']:.1f}", f"{e['llm_calls_per_task']:.1f}",
            f"{e['prompt_tokens_per_task']:,.0f}", f"{e['completion_tokens_per_task']:,.0f}",
            f"{ratio:.1f}x"]) + " |")
    return "\n".join(lines)


def presentation(result: dict[str, Any]) -> str:
    """The order the system was shown the candidates in (its config's `candidate_order`),
    labelled; "" when the result does not say (a baseline, an older result)."""
    config = result.get("config") or {}
    params = config.get("params") if isinstance(config.get("params"), dict) else {}
    order = config.get("candidate_order") or params.get("candidate_order")
    return PRESENTATIONS.get(order, str(order)) if order else ""


def is_llm(result: dict[str, Any]) -> bool:
    e = result.get("efficiency") or {}
    return bool(e.get("llm_calls_per_task") or e.get("generation_requests_per_task"))


def _number(value: Any, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def llm_table(results: list[dict]) -> str:
    """What each LLM system adds to the order it was shown (DESIGN.md 3.4, 3.7): the
    presentation, how often its ranking is exactly that order, the mean Kendall tau to
    it, and how its answers were formed. Empty when no result made LLM calls."""
    rows = [r for r in results if is_llm(r)]
    if not rows:
        return ""
    header = ["system", "tasks", "n", "presentation", "shown-order identity %",
              "Kendall tau to shown", "well-formed %", "repaired %", "constrained %",
              "fallback %", "valid %"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for result in rows:
        m = result["metrics"]
        lines.append("| " + " | ".join([
            _system_label(result), _tasks_label(result), str(result["n_tasks"]),
            presentation(result) or "–",
            _number(m.get("shown_order_identity"), ".1f"), _number(m.get("kendall_tau_shown"), ".2f"),
            _number(m.get("well_formed_rate"), ".1f"), _number(m.get("repaired_rate"), ".1f"),
            _number(m.get("constrained_rate"), ".1f"), _number(m.get("fallback_rate"), ".1f"),
            _number(m.get("valid_rate"), ".1f")]) + " |")
    return "\n".join(lines)


def full_report(results: list[dict]) -> str:
    """The quality table, then the LLM systems' answers and cost tables when there are."""
    tables = [markdown_table(results), llm_table(results), efficiency_table(results)]
    return "\n\n".join(t for t in tables if t)
