"""One evaluation loop for every system: baselines, the teacher, the student.

A system turns a task into a `Recommendation`; the runner times it, completes the
ranking, and writes the results JSON of DESIGN.md 7 plus, on request, one record per
task so that any number can be traced back to the outputs behind it.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from starrec.baselines.base import FitData, Recommender
from starrec.data.schema import Dataset
from starrec.data.splits import fit_interactions
from starrec.data.tasks import Task
from starrec.evaluation.metrics import complete_ranking, summarize
from starrec.progress import progress as progress_bar


@dataclass
class Recommendation:
    """A system's answer to one task. `ranking` holds item ids in the system's order as it
    produced them (possibly partial or malformed); None when nothing could be parsed."""

    ranking: list[str] | None
    fallback: bool = False  # the ranking is a fallback, not the system's own answer: invalid
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    details: dict[str, Any] = field(default_factory=dict)


class System(Protocol):
    name: str

    def recommend(self, task: Task) -> Recommendation: ...


class RecommenderSystem:
    """A fitted score-based recommender seen as a System."""

    def __init__(self, recommender: Recommender) -> None:
        self.recommender = recommender
        self.name = recommender.name

    def recommend(self, task: Task) -> Recommendation:
        return Recommendation(self.recommender.rank(task))


def split_of(tasks: list[Task]) -> str:
    splits = {t.split for t in tasks}
    if len(splits) != 1:
        raise ValueError(f"tasks mix splits {sorted(splits)}; evaluate one split at a time")
    return splits.pop()


def fit_recommender(recommender: Recommender, dataset: Dataset, split: str) -> float:
    """Fit on what `split` allows (never a target of it or anything after); return seconds."""
    start = time.perf_counter()
    recommender.fit(FitData(fit_interactions(dataset, split), dataset.items, split))
    return time.perf_counter() - start


@dataclass
class TaskRecord:
    task_id: str
    target: str
    rank: int
    valid: bool
    seconds: float
    llm_calls: int
    prompt_tokens: int
    completion_tokens: int
    ranking: list[str]
    # the system's own account of its answer (a student's text, a teacher's status), so a
    # number can be traced back to what was written
    details: dict[str, Any] = field(default_factory=dict)


def read_records(path: Path) -> dict[str, TaskRecord]:
    """Per-task records of an earlier (possibly interrupted) run; a line cut short by a
    crash is ignored, so its task simply runs again."""
    done: dict[str, TaskRecord] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = TaskRecord(**json.loads(line))
        except (json.JSONDecodeError, TypeError):
            continue
        done[record.task_id] = record
    return done


def run_tasks(system: System, tasks: Iterable[Task], progress: bool = True,
              checkpoint: Path | None = None) -> list[TaskRecord]:
    """Answer every task; with `checkpoint`, each record is appended to that file as soon
    as it exists and tasks already there are not run again, so a long LLM evaluation
    resumes where it stopped."""
    tasks = list(tasks)
    done = read_records(checkpoint) if checkpoint is not None else {}
    by_id = {t.task_id: t for t in tasks}
    for task_id, record in done.items():
        if task_id in by_id and by_id[task_id].target != record.target:
            raise ValueError(f"{checkpoint}: task {task_id} has another target there; it "
                             "belongs to a different task file (use a new --records file)")
    todo = [t for t in tasks if t.task_id not in done]
    handle = None
    if checkpoint is not None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        handle = checkpoint.open("a", encoding="utf-8")
    try:
        for task in progress_bar(todo, f"eval {system.name}", total=len(tasks), unit="task",
                                 enabled=progress, initial=len(tasks) - len(todo)):
            start = time.perf_counter()
            answer = system.recommend(task)
            seconds = time.perf_counter() - start
            completed = complete_ranking(answer.ranking, task.candidates)
            record = TaskRecord(
                task_id=task.task_id,
                target=task.target,
                rank=completed.ranking.index(task.target) + 1,
                valid=completed.valid and not answer.fallback,
                seconds=seconds,
                llm_calls=answer.llm_calls,
                prompt_tokens=answer.prompt_tokens,
                completion_tokens=answer.completion_tokens,
                ranking=completed.ranking,
                details=answer.details,
            )
            done[task.task_id] = record
            if handle is not None:
                handle.write(json.dumps(asdict(record)) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
    finally:
        if handle is not None:
            handle.close()
    return [done[t.task_id] for t in tasks]


def results_json(
    system: str,
    dataset: str,
    split: str,
    records: list[TaskRecord],
    config: dict[str, Any],
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    if not records:
        raise ValueError("no task was evaluated")
    metrics, ci = summarize([r.rank for r in records], [r.valid for r in records], n_resamples, seed)
    seconds = np.array([r.seconds for r in records])

    def per_task(attribute: str) -> float:
        return round(float(np.mean([getattr(r, attribute) for r in records])), 2)

    answers = answer_counts(records)
    return {
        "system": system,
        "dataset": dataset,
        "split": split,
        "n_tasks": len(records),
        "metrics": metrics,
        "ci95": ci,
        **({"answers": answers} if answers else {}),
        "efficiency": {
            "median_s": round(float(np.median(seconds)), 6),
            "p95_s": round(float(np.percentile(seconds, 95)), 6),
            "llm_calls_per_task": per_task("llm_calls"),
            "prompt_tokens_per_task": per_task("prompt_tokens"),
            "completion_tokens_per_task": per_task("completion_tokens"),
        },
        "config": {**config, "machine": machine_description()},
    }


def answer_counts(records: list[TaskRecord]) -> dict[str, Any]:
    """What the answers' `details` say, over the tasks: how many held each yes/no fact (a
    student's well-formed passes, repairs, chosen plans), how the passes ended (`stop`),
    and the mean length of each list (tool calls per task). Empty without details."""
    flags: Counter[str] = Counter()
    stops: Counter[str] = Counter()
    lengths: dict[str, list[int]] = {}
    for record in records:
        for key, value in (record.details or {}).items():
            if isinstance(value, bool):
                flags[key] += value
            elif isinstance(value, list):
                lengths.setdefault(key, []).append(len(value))
            elif key == "stop" and isinstance(value, str):
                stops[value] += 1
    counts: dict[str, Any] = {key: flags[key] for key in sorted(flags)}
    if stops:
        counts["stop"] = dict(sorted(stops.items()))
    counts.update({f"{key}_per_task": round(sum(v) / len(records), 2) for key, v in sorted(lengths.items())})
    return counts


def machine_description() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.system()}"


def write_json(payload: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")


def write_records(records: list[TaskRecord], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(asdict(record)) + "\n")


def evaluate_system(
    system: System, dataset: str, tasks: list[Task], config: Any, params: dict[str, Any],
    checkpoint: Path | None = None,
) -> tuple[dict[str, Any], list[TaskRecord]]:
    """Run `system` on `tasks` (resumable through `checkpoint`) and summarise."""
    split = split_of(tasks)
    records = run_tasks(system, tasks, checkpoint=checkpoint)
    result = results_json(system.name, dataset, split, records, params,
                          config.eval.bootstrap_resamples, config.eval.bootstrap_seed)
    return result, records


def evaluate_baseline(
    name: str, dataset: Dataset, tasks: list[Task], config: Any
) -> tuple[dict[str, Any], list[TaskRecord]]:
    """Fit baseline `name` on what the tasks' split allows, then evaluate it on them."""
    from starrec.baselines.registry import make_recommender

    recommender = make_recommender(name, config, dataset.name)
    fit_seconds = fit_recommender(recommender, dataset, split_of(tasks))
    params = config.cst if name == "cst" else getattr(config.baselines, name, None)
    return evaluate_system(
        RecommenderSystem(recommender), dataset.name, tasks, config,
        {"params": params.model_dump() if params is not None else {}, "fit_s": round(fit_seconds, 3)},
    )


def subset_result(
    result: dict[str, Any], records: list[TaskRecord], task_ids: set[str], config: Any
) -> dict[str, Any]:
    """The same run restricted to some tasks (eval-200 out of all test users): one fit and
    one pass serve both numbers, so they cannot disagree about the model."""
    kept = [r for r in records if r.task_id in task_ids]
    return results_json(
        result["system"],
        result["dataset"],
        result["split"],
        kept,
        dict(result["config"]),
        config.eval.bootstrap_resamples,
        config.eval.bootstrap_seed,
    )
