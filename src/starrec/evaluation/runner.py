"""One evaluation loop for every system: baselines, the teacher, the student.

A system turns a task into a `Recommendation` (both in `starrec.core`, which the systems
implement without depending on this package); the runner times it, completes the
ranking, and writes the results JSON of DESIGN.md 7 plus, on request, one record per
task so that any number can be traced back to the outputs behind it. A records file
opens with the identity of the run that wrote it (`starrec.evaluation.identity`), so a
resume cannot mix two systems' answers; every results JSON says what an LLM added to
the order it was shown, and where the number came from (`provenance`).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import IO, Any

import numpy as np

from starrec.core import FitData, Recommendation, Recommender, System, Task
from starrec.data.schema import Dataset
from starrec.data.splits import check_no_leak, fit_interactions
from starrec.evaluation.identity import RunIdentity, run_identity
from starrec.evaluation.metrics import complete_ranking, kendall_tau, summarize
from starrec.evaluation.provenance import provenance as provenance_block
from starrec.evaluation.task_file import task_file_path, write_task_file
from starrec.llm.concurrency import as_finished
from starrec.progress import progress as progress_bar

log = logging.getLogger(__name__)

# a run where more tasks than this fell back measures its fallback more than itself
FALLBACK_WARNING_RATE = 0.10
IDENTITY_KEY = "records_identity"  # the key of a records file's identity lines


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


def fit_recommender(recommender: Recommender, dataset: Dataset, split: str,
                    tasks: Sequence[Task] = ()) -> float:
    """Fit on what `split` allows (never a target of it or anything after); return seconds.
    With `tasks`, the fit data is first checked to hold none of their targets nor anything
    after them (`LeakError` otherwise)."""
    fit = fit_interactions(dataset, split)
    if tasks:
        check_no_leak(tasks, fit, where=f"the fit data of {recommender.name}")
    start = time.perf_counter()
    recommender.fit(FitData(fit, dataset.items, split))
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
    # as in `Recommendation`; `shown` is always the explicit order in records written now
    # (None only in records written before it was kept, when it is not known)
    shown: list[str] | None = None
    well_formed: bool | None = None
    repaired: bool = False
    constrained: bool = False
    fallback: bool = False
    generation_requests: int = 0

    @property
    def well_formed_or_valid(self) -> bool:
        """Well formed as DESIGN.md 3.4 counts it: a non-generative system's output is
        well formed when it is valid."""
        return self.valid if self.well_formed is None else self.well_formed


_RECORD_FIELDS = {f.name for f in fields(TaskRecord)}


def _record(line: dict[str, Any]) -> TaskRecord:
    """A record from its JSON line. Lines written before a field existed get what their
    `details` say of it (a teacher's fallback reason, a student's well-formed parse,
    repairs and generation requests); `shown` stays unknown."""
    if "fallback" not in line:
        details = line.get("details") or {}
        fallback = bool(details.get("fallback"))
        student = isinstance(details.get("well_formed"), bool)
        repaired = bool(details.get("repaired")) or bool(details.get("repaired_calls"))
        line = {**line, "fallback": fallback,
                "repaired": repaired or fallback,
                "constrained": bool(details.get("repaired")),
                "well_formed": (details["well_formed"] and not repaired) if student else None,
                "generation_requests": int(details.get("segments") or line.get("llm_calls") or 0)}
    return TaskRecord(**{k: v for k, v in line.items() if k in _RECORD_FIELDS})


@dataclass
class RecordsFile:
    """A records file as read: its identity lines (the first is the run's; a later one
    marks where a resume ran newer code), its records by task id, and whether it ends
    with a whole line (a crash may cut the last one)."""

    identities: list[RunIdentity]
    records: dict[str, TaskRecord]
    ends_cleanly: bool = True


def read_records_file(path: Path) -> RecordsFile:
    """Identity lines and per-task records; a line cut short by a crash is ignored, so
    its task simply runs again."""
    if not path.exists():
        return RecordsFile([], {})
    text = path.read_text(encoding="utf-8")
    identities: list[RunIdentity] = []
    done: dict[str, TaskRecord] = {}
    for line in text.splitlines():
        try:
            value = json.loads(line)
            if isinstance(value, dict) and IDENTITY_KEY in value:
                identities.append(RunIdentity.from_dict(value[IDENTITY_KEY]))
                continue
            record = _record(value)
        except (json.JSONDecodeError, TypeError, AttributeError):
            continue
        done[record.task_id] = record
    return RecordsFile(identities, done, ends_cleanly=not text or text.endswith("\n"))


def read_records(path: Path) -> dict[str, TaskRecord]:
    """Per-task records of an earlier (possibly interrupted) run, by task id."""
    return read_records_file(path).records


def read_identity(path: Path) -> RunIdentity | None:
    """The identity of the run that wrote a records file; None for a file written before
    records had one (or no file)."""
    identities = read_records_file(path).identities
    return identities[0] if identities else None


def _identity_line(identity: RunIdentity) -> str:
    return json.dumps({IDENTITY_KEY: identity.to_dict()}) + "\n"


def _open_records(path: Path, identity: RunIdentity, tasks: list[Task]
                  ) -> tuple[dict[str, TaskRecord], IO[str]]:
    """The records already in `path` and the file opened for appending; refuses a file
    that another run (or a run of unknown identity) wrote."""
    existing = read_records_file(path)
    if existing.records and not existing.identities:
        raise ValueError(
            f"{path} holds records without an identity line (written before records had "
            "one): whose answers they are cannot be checked. Rerun with --fresh to replace "
            "it, or give another --records file")
    if existing.identities:
        differ = existing.identities[0].differences(identity)
        if differ:
            raise ValueError(
                f"{path} holds the answers of another run ({'; '.join(differ)}); a resume "
                "would report them as this run's. Rerun with --fresh to replace it, or give "
                "another --records (or --out) file")
    by_id = {t.task_id: t for t in tasks}
    for task_id, record in existing.records.items():
        if task_id in by_id and by_id[task_id].target != record.target:
            raise ValueError(f"{path}: task {task_id} has another target there; it "
                             "belongs to a different task file (use a new --records file)")
    path.parent.mkdir(parents=True, exist_ok=True)
    if not existing.identities:  # new, empty, or only a line cut before it was whole
        handle = path.open("w", encoding="utf-8")
        handle.write(_identity_line(identity))
        return {}, handle
    handle = path.open("a", encoding="utf-8")
    if not existing.ends_cleanly:
        handle.write("\n")  # else the next record would join the cut line and be lost too
    latest = existing.identities[-1].code_version
    if identity.code_version and latest != identity.code_version:
        log.warning("%s: resuming with code version %s (records so far: %s)", path,
                    identity.code_version, latest)
        handle.write(_identity_line(identity))
    return existing.records, handle


def _flush(handle: IO[str]) -> None:
    handle.flush()
    os.fsync(handle.fileno())


def run_tasks(system: System, tasks: Iterable[Task], progress: bool = True,
              checkpoint: Path | None = None, identity: RunIdentity | None = None,
              concurrency: int = 1, make_system: Callable[[], System] | None = None
              ) -> list[TaskRecord]:
    """Answer every task; with `checkpoint`, each record is appended to that file as soon
    as it exists and tasks already there are not run again, so a long LLM evaluation
    resumes where it stopped. The file opens with `identity` (by default the system's
    name and the tasks' hash); a resume with another identity raises `ValueError`.

    With `concurrency` > 1, that many tasks are answered at once on threads, each thread
    by its own system from `make_system` (the first one by `system`; without
    `make_system` they share `system`, which must then be thread-safe). Records reach
    the file in the order tasks finish, written by this thread alone, so lines never
    interleave; the list returned is in task order whatever the order of finishing, and
    so is everything computed from it. When a task raises, the tasks in flight finish
    and are written before the error is raised."""
    tasks = list(tasks)
    done: dict[str, TaskRecord] = {}
    handle = None
    if checkpoint is not None:
        identity = identity or run_identity(system.name, tasks)
        done, handle = _open_records(checkpoint, identity, tasks)
        _flush(handle)
    # one answer per task id, even if the task list repeats one
    todo = list({t.task_id: t for t in tasks if t.task_id not in done}.values())
    answers = _answers(system, todo, concurrency, make_system)
    try:
        for task, record in progress_bar(answers, f"eval {system.name}", total=len(tasks),
                                         unit="task", enabled=progress,
                                         initial=len(tasks) - len(todo)):
            done[task.task_id] = record
            if handle is not None:
                handle.write(json.dumps(asdict(record)) + "\n")
                _flush(handle)
    finally:
        answers.close()  # no new task starts; with threads, those in flight are abandoned
        if handle is not None:
            handle.close()
    return [done[t.task_id] for t in tasks]


def answer_task(system: System, task: Task) -> TaskRecord:
    """`system`'s answer to `task` as a record, timed (with several tasks in flight, the
    time includes waiting for a busy server: the latency a user of the run would see)."""
    start = time.perf_counter()
    answer = system.recommend(task)
    return task_record(task, answer, time.perf_counter() - start)


def _answers(system: System, todo: list[Task], concurrency: int,
             make_system: Callable[[], System] | None) -> Generator[tuple[Task, TaskRecord], None, None]:
    """(task, record) pairs as the tasks are answered."""
    if concurrency <= 1 or len(todo) <= 1:
        return ((task, answer_task(system, task)) for task in todo)
    spare, lock = [system], threading.Lock()

    def worker_system() -> System:
        with lock:
            if spare:
                return spare.pop()
        return make_system() if make_system is not None else system

    return as_finished(answer_task, worker_system, todo, concurrency)


def task_record(task: Task, answer: Recommendation, seconds: float) -> TaskRecord:
    """The record of one answer. The ranking is completed (DESIGN.md 3.4): what the
    system ranked, in its order, then the rest in the task file's order; a fallback is
    kept as the system gave it (the presented order), never replaced by another order."""
    shown = list(answer.shown) if answer.shown is not None else list(task.candidates)
    if sorted(shown) != sorted(task.candidates):
        raise ValueError(f"{task.task_id}: the system reports being shown items that are not "
                         "the task's candidates")
    completed = complete_ranking(answer.ranking, task.candidates)
    return TaskRecord(
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
        shown=shown,
        well_formed=answer.well_formed,
        repaired=answer.repaired or answer.fallback,
        constrained=answer.constrained,
        fallback=answer.fallback,
        generation_requests=answer.generation_requests,
    )


def _rate(flags: Sequence[bool]) -> float:
    return round(100 * float(np.mean(flags)), 2)


def answer_quality(records: list[TaskRecord]) -> dict[str, float | None]:
    """What an LLM adds to the order it was shown (DESIGN.md 3.4), x100 except tau:
    `shown_order_identity` (% of tasks ranked exactly in the shown order),
    `kendall_tau_shown` (mean tau between ranking and shown order, in [-1, 1]), and the
    rates of well-formed, repaired, constrained and fallback answers. Identity and tau
    are None when no record knows its shown order (records written before it was kept)."""
    known = [r for r in records if r.shown is not None]
    return {
        "shown_order_identity": _rate([r.ranking == r.shown for r in known]) if known else None,
        "kendall_tau_shown": (round(float(np.mean([kendall_tau(r.ranking, r.shown) for r in known])), 4)
                              if known else None),
        "well_formed_rate": _rate([r.well_formed_or_valid for r in records]),
        "repaired_rate": _rate([r.repaired for r in records]),
        "constrained_rate": _rate([r.constrained for r in records]),
        "fallback_rate": _rate([r.fallback for r in records]),
    }


def run_warnings(records: list[TaskRecord]) -> list[str]:
    """What makes a run's numbers say less than they seem to: many fallbacks."""
    warnings = []
    fallbacks = sum(r.fallback for r in records)
    if records and fallbacks > FALLBACK_WARNING_RATE * len(records):
        warnings.append(
            f"{fallbacks} of {len(records)} tasks ({100 * fallbacks / len(records):.1f}%) fell "
            f"back to the presented order (more than {100 * FALLBACK_WARNING_RATE:.0f}%): the "
            "metrics measure the fallback more than the system")
    return warnings


def results_json(
    system: str,
    dataset: str,
    split: str,
    records: list[TaskRecord],
    config: dict[str, Any],
    n_resamples: int = 1000,
    seed: int = 0,
    provenance: dict[str, Any] | None = None,
    warnings: Sequence[str] = (),
) -> dict[str, Any]:
    """The results JSON of DESIGN.md 7, with what an LLM adds beside `valid_rate`, the
    run's `warnings` (many fallbacks, and any given) and its `provenance` (code and
    machine only, when none is given)."""
    if not records:
        raise ValueError("no task was evaluated")
    metrics, ci = summarize([r.rank for r in records], [r.valid for r in records], n_resamples, seed)
    metrics.update(answer_quality(records))
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
            "generation_requests_per_task": per_task("generation_requests"),
            "prompt_tokens_per_task": per_task("prompt_tokens"),
            "completion_tokens_per_task": per_task("completion_tokens"),
        },
        "warnings": [*run_warnings(records), *warnings],
        "provenance": provenance if provenance is not None else provenance_block(),
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


def write_records(records: list[TaskRecord], path: Path, identity: RunIdentity | None = None) -> None:
    """All records at once (a baseline's), after an identity line when one is given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        if identity is not None:
            handle.write(_identity_line(identity))
        for record in records:
            handle.write(json.dumps(asdict(record)) + "\n")


def write_results(result: dict[str, Any], records: list[TaskRecord], path: Path) -> Path:
    """The results JSON at `path` and its per-task file beside it (DESIGN.md 3.4, written
    by `task_file`), which `star report --paired` compares; returns the per-task file's
    path."""
    write_json(result, path)
    tasks_path = task_file_path(path)
    write_task_file(records, tasks_path)
    return tasks_path


def evaluate_system(
    system: System, dataset: str, tasks: list[Task], config: Any, params: dict[str, Any],
    checkpoint: Path | None = None, identity: RunIdentity | None = None,
    dataset_fingerprint: str | None = None, concurrency: int = 1,
    make_system: Callable[[], System] | None = None,
) -> tuple[dict[str, Any], list[TaskRecord]]:
    """Run `system` on `tasks` (resumable through `checkpoint`; `concurrency` tasks at
    once, as `run_tasks`) and summarise. `identity` (by default the system's name,
    `params` and the tasks) guards the checkpoint and, with `dataset_fingerprint`, makes
    the provenance of the results."""
    split = split_of(tasks)
    identity = identity or run_identity(system.name, tasks, params)
    records = run_tasks(system, tasks, checkpoint=checkpoint, identity=identity,
                        concurrency=concurrency, make_system=make_system)
    warnings = []
    if checkpoint is not None:
        versions = list(dict.fromkeys(i.code_version for i in read_records_file(checkpoint).identities))
        if len(versions) > 1:
            warnings.append(f"the records in {checkpoint.name} were answered by several code "
                            f"versions: {', '.join(versions)}")
    result = results_json(system.name, dataset, split, records, params,
                          config.eval.bootstrap_resamples, config.eval.bootstrap_seed,
                          provenance=provenance_block(identity, dataset_fingerprint),
                          warnings=warnings)
    return result, records


def evaluate_baseline(
    name: str, dataset: Dataset, tasks: list[Task], config: Any, tasks_path: Path | None = None,
) -> tuple[dict[str, Any], list[TaskRecord]]:
    """Fit baseline `name` on what the tasks' split allows, then evaluate it on them.
    `tasks_path`, the file the tasks came from, gives the provenance its sha256."""
    from starrec.baselines.registry import make_recommender

    recommender = make_recommender(name, config, dataset.name)
    fit_seconds = fit_recommender(recommender, dataset, split_of(tasks), tasks)
    params = config.cst if name == "cst" else getattr(config.baselines, name, None)
    dumped = params.model_dump() if params is not None else {}
    identity = run_identity(name, tasks, {"system": name, "params": dumped}, tasks_path=tasks_path)
    return evaluate_system(
        RecommenderSystem(recommender), dataset.name, tasks, config,
        {"params": dumped, "fit_s": round(fit_seconds, 3)},
        identity=identity, dataset_fingerprint=dataset.fingerprint(),
    )


def subset_result(
    result: dict[str, Any], records: list[TaskRecord], task_ids: set[str], config: Any,
    tasks_sha256: str | None = None,
) -> dict[str, Any]:
    """The same run restricted to some tasks (eval-200 out of all test users): one fit and
    one pass serve both numbers, so they cannot disagree about the model. `tasks_sha256`
    (the subset's own task file) replaces the provenance's; without it that stays the
    file the run answered, of which these tasks are a part."""
    kept = [r for r in records if r.task_id in task_ids]
    source = dict(result.get("provenance") or provenance_block())
    if tasks_sha256 is not None:
        source["tasks_sha256"] = tasks_sha256
    return results_json(
        result["system"],
        result["dataset"],
        result["split"],
        kept,
        dict(result["config"]),
        config.eval.bootstrap_resamples,
        config.eval.bootstrap_seed,
        provenance=source,
    )
