"""Which teacher runs become training data: outcome filtering and difficulty strata.

Only runs of training tasks that finished cleanly (status ok, no fallback ranking, a
valid permutation), whose candidates were shown in the student's order, and that put
the target within the first `top_k` are kept; of several samples of one task,
the first, the best or all are kept. Every run is labelled with two difficulty strata,
the tercile of its target's popularity and the tercile of its history length, with cut
points computed over all tasks given (so a label does not depend on what was filtered);
`balance` then samples equal numbers per stratum. The report counts what each step kept
and dropped.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from starrec.config import TrajectoryFilterConfig
from starrec.core import complete_ranking
from starrec.trajectories.schema import TeacherRun

LEVELS = ("low", "mid", "high")


@dataclass
class FilterStep:
    name: str
    kept: int
    dropped: int


@dataclass
class FilterReport:
    total: int
    steps: list[FilterStep] = field(default_factory=list)
    strata: dict[str, int] = field(default_factory=dict)  # kept runs per stratum, before balancing
    balanced: dict[str, int] = field(default_factory=dict)  # ... and after, when balancing
    kept: int = 0

    def add(self, name: str, before: int, after: int) -> None:
        self.steps.append(FilterStep(name, after, before - after))
        self.kept = after

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        lines = [f"{'runs read':34s} {self.total:6d}"]
        lines += [f"{s.name:34s} {s.kept:6d} kept {s.dropped:6d} dropped" for s in self.steps]
        for name, count in self.strata.items():
            after = f" -> {self.balanced.get(name, 0)}" if self.balanced else ""
            lines.append(f"  stratum {name:25s} {count:6d}{after}")
        return "\n".join(lines)


def shown_order(run: TeacherRun) -> str:
    """`mars.candidate_order` of the run; runs recorded before it existed saw the
    presented order."""
    return (run.config.get("mars") or {}).get("candidate_order", "presented")


def target_rank(run: TeacherRun) -> int | None:
    """1-based rank of the target in the run's ranking; None when it is not there."""
    target = run.task.get("target")
    return run.ranking.index(target) + 1 if target in run.ranking else None


def tercile_labels(values: Mapping[str, float]) -> dict[str, str]:
    """low / mid / high by the 1/3 and 2/3 quantiles of the values."""
    if not values:
        return {}
    low, high = np.quantile(np.fromiter(values.values(), dtype=float), [1 / 3, 2 / 3])
    return {key: LEVELS[0] if v <= low else LEVELS[1] if v <= high else LEVELS[2]
            for key, v in values.items()}


def strata(runs: list[TeacherRun], popularity: Mapping[str, int] | None) -> dict[str, str]:
    """Stratum of each task id, e.g. "pop=high/hist=low". Without popularity counts
    (e.g. from `EvidenceStore.items["pop"]`) only the history dimension is used."""
    tasks = {run.task_id: run.task for run in runs}
    history = tercile_labels({t: len(task["history"]) for t, task in tasks.items()})
    if popularity is None:
        return {t: f"hist={history[t]}" for t in tasks}
    pop = tercile_labels({t: popularity.get(task["target"], 0) for t, task in tasks.items()})
    return {t: f"pop={pop[t]}/hist={history[t]}" for t in tasks}


def _per_task(runs: list[TeacherRun], mode: str) -> list[TeacherRun]:
    if mode == "all":
        return runs
    by_task: dict[str, list[TeacherRun]] = defaultdict(list)
    for run in runs:
        by_task[run.task_id].append(run)
    if mode == "first":
        chosen = {id(min(group, key=lambda r: r.sample)) for group in by_task.values()}
    elif mode == "best":
        chosen = {id(min(group, key=lambda r: (target_rank(r), r.sample)))
                  for group in by_task.values()}
    else:
        raise ValueError(f"unknown per_task mode {mode!r}; expected first, best or all")
    return [run for run in runs if id(run) in chosen]


def _balance(runs: list[TeacherRun], labels: Mapping[str, str], per_stratum: int | None,
             seed: int) -> list[TeacherRun]:
    groups: dict[str, list[TeacherRun]] = defaultdict(list)
    for run in runs:
        groups[labels[run.task_id]].append(run)
    if not groups:
        return []
    n = per_stratum if per_stratum is not None else min(len(g) for g in groups.values())
    rng = np.random.default_rng(seed)
    kept: list[TeacherRun] = []
    for name in sorted(groups):
        group = groups[name]
        picks = sorted(rng.choice(len(group), size=min(n, len(group)), replace=False))
        kept += [group[i] for i in picks]
    order = {id(run): i for i, run in enumerate(runs)}
    return sorted(kept, key=lambda r: order[id(r)])


def _counts(runs: list[TeacherRun], labels: Mapping[str, str]) -> dict[str, int]:
    return dict(sorted(Counter(labels[r.task_id] for r in runs).items()))


def filter_runs(
    runs: list[TeacherRun],
    config: TrajectoryFilterConfig,
    popularity: Mapping[str, int] | None = None,
    candidate_order: str | None = None,
) -> tuple[list[TeacherRun], FilterReport]:
    """The runs to train on, in input order, and the counts of each step.
    `candidate_order`: keep only runs whose model saw the candidates in this order (the
    student's `format.candidate_order`), since their indices number that order."""
    report = FilterReport(total=len(runs), kept=len(runs))
    labels = strata(runs, popularity)
    checks = [
        # a test task's target must never reach training (DESIGN.md 3.2), whatever file
        # the runs came from: teacher runs of `star eval --system mars` are test runs
        ("not a test task", lambda r: r.task.get("split", "test") != "test"),
        ("status ok", lambda r: r.status == "ok"),
        ("no fallback ranking", lambda r: r.fallback is None),
        ("valid permutation", lambda r: complete_ranking(r.ranking, r.task["candidates"]).valid),
        (f"target in top {config.top_k}", lambda r: (target_rank(r) or 10**9) <= config.top_k),
    ]
    if candidate_order is not None:
        checks.insert(2, (f"candidates shown in {candidate_order} order",
                          lambda r: shown_order(r) == candidate_order))
    kept = runs
    for name, keep in checks:
        before = len(kept)
        kept = [r for r in kept if keep(r)]
        report.add(name, before, len(kept))
    before = len(kept)
    kept = _per_task(kept, config.per_task)
    report.add(f"per task: {config.per_task}", before, len(kept))
    report.strata = _counts(kept, labels)
    if config.balance:
        before = len(kept)
        kept = _balance(kept, labels, config.per_stratum, config.seed)
        report.add("balanced strata", before, len(kept))
        report.balanced = _counts(kept, labels)
    return kept, report


def holdout_tasks(runs: list[TeacherRun], fraction: float,
                  seed: int = 0) -> tuple[list[TeacherRun], list[TeacherRun]]:
    """(train, validation) split by task, so no task has samples on both sides. At least
    one task is held out when `fraction` > 0 and there are two tasks or more."""
    tasks = sorted({run.task_id for run in runs})
    n = min(len(tasks) - 1, max(1, round(fraction * len(tasks)))) if fraction > 0 else 0
    if n <= 0:
        return runs, []
    held = {tasks[i] for i in np.random.default_rng(seed).choice(len(tasks), size=n, replace=False)}
    return [r for r in runs if r.task_id not in held], [r for r in runs if r.task_id in held]
