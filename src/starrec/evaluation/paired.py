"""Two systems on the same tasks, compared task by task (DESIGN.md 3.4).

Two AvgHR values with overlapping intervals say little; on the same tasks the per-task
differences vary far less than either system's hits, so a paired bootstrap of their mean
tells a real lift from noise. This matters most for an LLM shown a ranker's order: it is
judged by its lift over that ranker on the same tasks, not by its absolute AvgHR
(DESIGN.md 3.7). Tasks are matched by id, and a task id whose target or candidate set
differs between the two files is refused: those are different tasks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from starrec.evaluation.metrics import bootstrap_ci, per_task_metrics
from starrec.evaluation.report import load_result
from starrec.evaluation.runner import read_records
from starrec.evaluation.task_file import candidates_sha256, read_task_file, task_file_path, task_row

PAIRED_METRICS = ("AvgHR", "HR@1", "NDCG@10", "MRR")


@dataclass(frozen=True)
class PairedMetric:
    """One metric on the shared tasks, x100: each system's mean, the mean of the per-task
    differences A - B with its paired bootstrap 95% interval, and the tasks where A's
    value is higher (win), equal (tie) or lower (loss) than B's."""

    metric: str
    a: float
    b: float
    difference: float
    ci95: tuple[float, float]
    wins: int
    ties: int
    losses: int


@dataclass(frozen=True)
class PairedComparison:
    """A against B on the tasks both answered (`n_shared`); `only_a` / `only_b` count
    the tasks one of them answered alone, left out of every number."""

    a: str
    b: str
    n_shared: int
    only_a: int
    only_b: int
    metrics: list[PairedMetric] = field(default_factory=list)

    def metric(self, name: str) -> PairedMetric:
        return next(m for m in self.metrics if m.metric == name)


def read_task_rows(results: Path) -> list[dict[str, Any]]:
    """The per-task rows of a results JSON (`task_file.read_task_file`), else (results
    written before per-task files existed) those of the `.records.jsonl` an LLM evaluation
    keeps beside it."""
    rows_path = task_file_path(results)
    if rows_path.exists():
        return read_task_file(rows_path)
    records = results.with_suffix(".records.jsonl")
    if records.exists():
        return [task_row(r) for r in read_records(records).values()]
    raise ValueError(f"{results}: no per-task file beside it ({rows_path.name}); rerun "
                     "`star eval` to write one")


def _label(result: dict[str, Any], path: Path) -> str:
    return f"{result.get('system', '?')} ({path.name})"


def compare_rows(rows_a: list[dict[str, Any]], rows_b: list[dict[str, Any]], a: str = "A",
                 b: str = "B", n_resamples: int = 1000, seed: int = 0) -> PairedComparison:
    """Paired comparison of two sets of per-task rows (`task_id`, `target`, `rank`,
    `candidates_sha256`, as `task_file.task_row` writes them). Raises `ValueError` when
    they share no task, or when a shared task id names different tasks."""
    by_a = {r["task_id"]: r for r in rows_a}
    by_b = {r["task_id"]: r for r in rows_b}
    shared = [t for t in by_a if t in by_b]
    if not shared:
        raise ValueError(f"{a} and {b} share no task id: nothing to compare")
    clashes = [t for t in shared if by_a[t]["target"] != by_b[t]["target"]
               or _candidates(by_a[t]) != _candidates(by_b[t])]
    if clashes:
        raise ValueError(
            f"{len(clashes)} task id(s) name different tasks in {a} and {b} (another target "
            f"or candidate set), e.g. {clashes[0]}: the two were run on different task files")
    ranks_a = [int(by_a[t]["rank"]) for t in shared]
    ranks_b = [int(by_b[t]["rank"]) for t in shared]
    metrics = []
    for name in PAIRED_METRICS:
        values_a = np.array([per_task_metrics(r)[name] for r in ranks_a])
        values_b = np.array([per_task_metrics(r)[name] for r in ranks_b])
        difference = values_a - values_b
        low, high = bootstrap_ci(difference, n_resamples, seed)
        metrics.append(PairedMetric(
            metric=name, a=round(100 * float(values_a.mean()), 2),
            b=round(100 * float(values_b.mean()), 2),
            difference=round(100 * float(difference.mean()), 2),
            ci95=(round(100 * low, 2), round(100 * high, 2)),
            wins=int((difference > 0).sum()), ties=int((difference == 0).sum()),
            losses=int((difference < 0).sum())))
    return PairedComparison(a, b, len(shared), len(by_a) - len(shared), len(by_b) - len(shared),
                            metrics)


def _candidates(row: dict[str, Any]) -> str:
    if row.get("candidates_sha256"):
        return row["candidates_sha256"]
    return candidates_sha256(row.get("ranking") or [])


def paired_comparison(a: Path, b: Path, n_resamples: int = 1000, seed: int = 0) -> PairedComparison:
    """Results JSON `a` against `b` on their shared tasks, from their per-task files."""
    result_a, result_b = load_result(a), load_result(b)
    return compare_rows(read_task_rows(Path(a)), read_task_rows(Path(b)),
                        _label(result_a, Path(a)), _label(result_b, Path(b)), n_resamples, seed)


def paired_markdown(comparison: PairedComparison) -> str:
    """The comparison as a markdown table, to paste into a README."""
    c = comparison
    lines = [f"A = {c.a}, B = {c.b}: {c.n_shared} shared tasks"
             + (f" ({c.only_a} only in A, {c.only_b} only in B, left out)"
                if c.only_a or c.only_b else ""),
             "",
             "| metric | A | B | A - B [paired 95% CI] | A wins / ties / losses |",
             "|---|---|---|---|---|"]
    for m in c.metrics:
        lines.append(f"| {m.metric} | {m.a:.1f} | {m.b:.1f} | {m.difference:+.1f} "
                     f"[{m.ci95[0]:+.1f}, {m.ci95[1]:+.1f}] | {m.wins} / {m.ties} / {m.losses} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class FirstPlaceMoves:
    """Where a system put first an item other than the one shown first (DESIGN.md 3.7):
    on how many tasks (`moved` of `n_tasks`), from which shown positions (1-based, as
    position -> count), the promoted items' mean rank under a reference ranker (chance:
    (candidates + 1) / 2), and how many of them were the target."""

    n_tasks: int
    moved: int
    shown_positions: dict[int, int]
    mean_ranker_rank: float | None
    chance_rank: float | None
    targets: int


def first_place_moves(rows: list[dict[str, Any]], shown_rows: list[dict[str, Any]],
                      ranker_rows: list[dict[str, Any]]) -> FirstPlaceMoves:
    """What a system's first places read: `rows` its per-task rows (with `ranking`),
    `shown_rows` those of the order it was shown (the `presented` system), `ranker_rows`
    those of a ranker whose order measures evidence. Tasks missing from either reference
    are refused: these numbers are about the same tasks."""
    if any("ranking" not in r for r in (*rows, *shown_rows, *ranker_rows)):
        raise ValueError("compact per-task rows name their rankings by letters: give them "
                         "their item ids first with task_file.expand_rankings and the tasks")
    shown = {r["task_id"]: r["ranking"] for r in shown_rows}
    ranker = {r["task_id"]: r["ranking"] for r in ranker_rows}
    missing = [r["task_id"] for r in rows if r["task_id"] not in shown or r["task_id"] not in ranker]
    if missing:
        raise ValueError(f"{len(missing)} task(s) missing from the shown order or the ranker, "
                         f"e.g. {missing[0]}")
    moved = [r for r in rows if r["ranking"][0] != shown[r["task_id"]][0]]
    positions: dict[int, int] = {}
    for r in moved:
        position = shown[r["task_id"]].index(r["ranking"][0]) + 1
        positions[position] = positions.get(position, 0) + 1
    ranks = [ranker[r["task_id"]].index(r["ranking"][0]) + 1 for r in moved]
    return FirstPlaceMoves(
        n_tasks=len(rows), moved=len(moved), shown_positions=dict(sorted(positions.items())),
        mean_ranker_rank=round(float(np.mean(ranks)), 2) if ranks else None,
        chance_rank=(len(rows[0]["ranking"]) + 1) / 2 if rows else None,
        targets=sum(r["ranking"][0] == r["target"] for r in moved))
