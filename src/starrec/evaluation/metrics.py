"""Ranking metrics of DESIGN.md 3.4.

Every task counts: a system's output (possibly partial, with duplicates or foreign
items, or nothing at all) is turned into a full ranking of the candidates first, and
whether the output was a clean permutation is reported separately as the valid rate
(`complete_ranking`, which lives in `starrec.core` because the student and the
trajectory filters apply the same rule).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from starrec.core import CompletedRanking, complete_ranking  # noqa: F401 (here too, as before)
from starrec.core.stats import bootstrap_ci  # noqa: F401 (here too: the evaluation's name)

METRICS = ("HR@1", "HR@3", "HR@5", "AvgHR", "NDCG@5", "NDCG@10", "MRR", "valid_rate")


def kendall_tau(ranking: Sequence[str], reference: Sequence[str]) -> float:
    """Kendall tau between two orders of the same items: 1 when `ranking` keeps
    `reference`'s order, -1 when it reverses it, near 0 when unrelated. It says how far
    an LLM moved from the order it was shown (DESIGN.md 3.4); 1.0 for fewer than 2 items."""
    if sorted(ranking) != sorted(reference):
        raise ValueError("Kendall tau needs two orders of the same items")
    n = len(ranking)
    if n < 2:
        return 1.0
    position = {item: i for i, item in enumerate(reference)}
    order = [position[item] for item in ranking]
    concordant = sum(1 for i in range(n) for j in range(i + 1, n) if order[i] < order[j])
    pairs = n * (n - 1) // 2
    return (2 * concordant - pairs) / pairs


def per_task_metrics(rank: int) -> dict[str, float]:
    """Metrics of one task given the 1-based rank of its target."""
    hits = {k: float(rank <= k) for k in (1, 3, 5)}
    gain = 1.0 / np.log2(rank + 1)
    return {
        "HR@1": hits[1],
        "HR@3": hits[3],
        "HR@5": hits[5],
        "AvgHR": (hits[1] + hits[3] + hits[5]) / 3,
        "NDCG@5": gain if rank <= 5 else 0.0,
        "NDCG@10": gain if rank <= 10 else 0.0,
        "MRR": 1.0 / rank,
    }


def metric_table(ranks: Sequence[int], valid: Sequence[bool]) -> dict[str, np.ndarray]:
    """Per-task values of every metric (unscaled), as arrays aligned with the tasks."""
    if len(ranks) != len(valid):
        raise ValueError("ranks and valid flags must have the same length")
    rows = [per_task_metrics(int(r)) for r in ranks]
    table = {name: np.array([row[name] for row in rows], dtype=float) for name in METRICS[:-1]}
    table["valid_rate"] = np.asarray(valid, dtype=float)
    return table


def summarize(
    ranks: Sequence[int], valid: Sequence[bool], n_resamples: int = 1000, seed: int = 0
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Means x100 and 95% bootstrap intervals x100 of every metric."""
    table = metric_table(ranks, valid)
    means = {name: round(100 * float(values.mean()), 2) for name, values in table.items()}
    ci = {
        name: [round(100 * bound, 2) for bound in bootstrap_ci(values, n_resamples, seed)]
        for name, values in table.items()
    }
    return means, ci
