"""Ranking tasks: a user's history, 20 shuffled candidates, one hidden target.

The `Task` record itself is `starrec.core.Task` (every layer reads it); this module
builds, writes, reads and checks task files.

Tasks are built once, written to disk with content hashes, and read back by every
system, so that all numbers of the project are measured on identical candidate lists in
identical order (DESIGN.md 3.2).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from starrec.core.files import write_text_atomic
from starrec.core.task import SHORT_SCENARIOS, Task
from starrec.data.errors import DataError
from starrec.data.schema import Dataset
from starrec.data.splits import (
    MIN_INTERACTIONS,
    SPLITS,
    TARGET_OFFSET,
    Split,
    fit_interactions,
    locate_cutoff,
    sorted_ids,
)

log = logging.getLogger(__name__)

N_CANDIDATES = 20
EVAL_USERS = 200
EVAL_SEED = 2026
SCENARIOS = ("classic", "user_cold", "item_cold", "long_term", "short_term")
SHORT_HISTORY = 5
COLD_ITEM_MAX_INTERACTIONS = 5
# version of the task files' content; a folder written by another version is re-prepared
TASK_FORMAT = 2
MIN_CANDIDATES = 2


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def task_rng(seed: int, split: str, user: str) -> np.random.Generator:
    """A generator per (seed, split, user): a user's candidates do not depend on which
    other users exist or in what order they are processed."""
    return np.random.default_rng([seed, _stable_int(split), _stable_int(user)])


def sample_candidates(
    target: str,
    seen: set[str],
    universe: np.ndarray,
    rng: np.random.Generator,
    n_candidates: int = N_CANDIDATES,
) -> list[str] | None:
    """The target plus `n_candidates - 1` distinct items the user never interacted with,
    drawn uniformly, then shuffled. None if the catalogue is too small for that user."""
    n_negatives = n_candidates - 1
    if len(universe) - len(seen) < n_negatives:
        return None
    negatives: list[str] = []
    chosen: set[str] = set()
    while len(negatives) < n_negatives:
        for index in rng.integers(0, len(universe), size=2 * n_negatives):
            item = universe[index]
            if item in seen or item in chosen:
                continue
            chosen.add(item)
            negatives.append(item)
            if len(negatives) == n_negatives:
                break
    candidates = [target, *negatives]
    return [candidates[i] for i in rng.permutation(len(candidates))]


def build_split_tasks(dataset: Dataset, split: Split, seed: int = 0) -> list[Task]:
    """Classic leave-one-out tasks of one split, one per user, users in sorted order."""
    universe = np.array(sorted_ids(dataset.interactions["item"]), dtype=object)
    grouped = dataset.interactions.groupby("user", sort=False)
    sequences = grouped["item"].agg(list)
    times = grouped["timestamp"].agg(list)
    tasks: list[Task] = []
    too_short = too_few_items = 0
    for user in sorted_ids(sequences.index):
        sequence = sequences[user]
        if len(sequence) < MIN_INTERACTIONS:
            too_short += 1
            continue
        cut = len(sequence) - TARGET_OFFSET[split]
        target = sequence[cut]
        candidates = sample_candidates(target, set(sequence), universe, task_rng(seed, split, user))
        if candidates is None:
            too_few_items += 1
            continue
        tasks.append(
            Task(
                task_id=f"{split}-{user}",
                user_id=user,
                scenario="classic",
                history=list(sequence[:cut]),
                candidates=candidates,
                target=target,
                split=split,
                cutoff=cut,
                cutoff_time=float(times[user][cut]),
            )
        )
    if too_short:
        log.info("%s: %d user(s) with fewer than %d interactions have no task", split, too_short,
                 MIN_INTERACTIONS)
    if too_few_items:
        log.warning("%s: %d user(s) skipped: too few unseen items for %d candidates", split,
                    too_few_items, N_CANDIDATES)
    return tasks


def scenario_tasks(tasks: list[Task], scenario: str, fit: pd.DataFrame) -> list[Task]:
    """A scenario's variant of classic tasks (AgentRecBench's five, DESIGN.md 3.2).

    user_cold and short_term both show only the last five history items; they differ in
    what the prompt tells the agent (a new user vs. a known user's recent taste).
    item_cold keeps tasks whose target has at most five interactions in `fit`, the
    interactions models may use for these tasks. long_term keeps the full history and
    asks the agent to summarise it.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {SCENARIOS}")
    if scenario == "classic":
        return tasks
    if scenario == "item_cold":
        counts = fit["item"].value_counts()
        kept = [t for t in tasks if counts.get(t.target, 0) <= COLD_ITEM_MAX_INTERACTIONS]
    else:
        kept = tasks
    short = scenario in ("user_cold", "short_term")
    return [
        Task(
            task_id=f"{t.split}-{scenario}-{t.user_id}",
            user_id=t.user_id,
            scenario=scenario,
            history=t.history[-SHORT_HISTORY:] if short else list(t.history),
            candidates=list(t.candidates),
            target=t.target,
            split=t.split,
            cutoff=t.cutoff,
            cutoff_time=t.cutoff_time,
        )
        for t in kept
    ]


def eval_users(tasks: list[Task], n: int = EVAL_USERS, seed: int = EVAL_SEED) -> set[str]:
    """eval-200's users: `n` test users drawn with `seed` from the sorted user ids."""
    users = sorted_ids(t.user_id for t in tasks)
    if len(users) <= n:
        return set(users)
    picks = np.random.default_rng(seed).choice(len(users), size=n, replace=False)
    return {users[i] for i in picks}


def write_tasks(tasks: Iterable[Task], path: Path) -> tuple[int, str]:
    """Write JSON lines; return (count, sha256 of the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(t.to_json() + "\n" for t in tasks)
    write_text_atomic(path, text)
    return text.count("\n"), hashlib.sha256(text.encode()).hexdigest()


TASK_FIELDS = ("task_id", "user_id", "scenario", "history", "candidates", "target")
OPTIONAL_FIELDS = ("split", "cutoff", "cutoff_time", "extra")


def manifest_beside(path: str | Path) -> dict | None:
    """The manifest of the folder a task file is in, or None if there is none."""
    manifest = Path(path).parent / "manifest.json"
    if not manifest.exists():
        return None
    try:
        record = json.loads(manifest.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"not valid JSON ({error.msg})", path=manifest, line=error.lineno) from None
    if not isinstance(record, dict):
        raise DataError("expected a JSON object", path=manifest)
    return record


def _is_id(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _id_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_id(v) for v in value)


def parse_task(record: Any, path: str | Path, line: int, n_candidates: int | None = None) -> Task:
    """A task from one JSON record, every field checked, errors naming file and line.

    `n_candidates` is the count every task must have (the manifest's); None requires only
    `MIN_CANDIDATES`, since a hand-written file may use any list length.
    """

    def fail(message: str) -> DataError:
        return DataError(message, path=path, line=line)

    if not isinstance(record, dict):
        raise fail(f"a JSON {type(record).__name__}, expected one task object a line")
    missing = [f for f in TASK_FIELDS if f not in record]
    if missing:
        raise fail(f"missing field(s) {missing}; a task has {list(TASK_FIELDS)} "
                   f"(and optionally {list(OPTIONAL_FIELDS)})")
    unknown = sorted(set(record) - set(TASK_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise fail(f"unknown field(s) {unknown}; expected {list(TASK_FIELDS + OPTIONAL_FIELDS)}")
    for name in ("task_id", "user_id", "target"):
        if not _is_id(record[name]):
            raise fail(f"{name} must be a non-empty string, got {record[name]!r}")
    for name in ("history", "candidates"):
        if not _id_list(record[name]):
            raise fail(f"{name} must be a list of non-empty string ids")
    split = record.get("split", "test")
    if split not in SPLITS:
        raise fail(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if record["scenario"] not in SCENARIOS:
        raise fail(f"unknown scenario {record['scenario']!r}; expected one of {list(SCENARIOS)}")
    candidates = record["candidates"]
    if n_candidates is not None and len(candidates) != n_candidates:
        raise fail(f"{len(candidates)} candidates; the manifest beside this file says "
                   f"{n_candidates}")
    if len(candidates) < MIN_CANDIDATES:
        raise fail(f"{len(candidates)} candidate(s); a ranking needs at least {MIN_CANDIDATES}")
    repeated = sorted({c for c in candidates if candidates.count(c) > 1})
    if repeated:
        raise fail(f"candidates must be distinct; repeated: {repeated}")
    if record["target"] not in candidates:
        raise fail(f"candidates must contain the target {record['target']!r}")
    cutoff = record.get("cutoff")
    if cutoff is not None and (isinstance(cutoff, bool) or not isinstance(cutoff, int)
                               or cutoff < len(record["history"])):
        raise fail(f"cutoff must be an integer position at or after the history's end "
                   f"({len(record['history'])}), got {cutoff!r}")
    cutoff_time = record.get("cutoff_time")
    if cutoff_time is not None:
        if isinstance(cutoff_time, bool) or not isinstance(cutoff_time, int | float):
            raise fail(f"cutoff_time must be a number (seconds) or null, got {cutoff_time!r}")
        record = {**record, "cutoff_time": float(cutoff_time)}
    if not isinstance(record.get("extra", {}), dict):
        raise fail("extra must be a JSON object")
    return Task(**record)


def iter_tasks(path: str | Path, n_candidates: int | None = None) -> Iterator[Task]:
    """Tasks of a JSON lines file, each checked (`parse_task`); ids must be unique.

    The candidate count is `n_candidates` if given, else the `n_candidates` of a
    `manifest.json` beside the file (a prepared folder), else any count of at least
    `MIN_CANDIDATES` (said in the log, so a short list in a hand-written file is seen).
    """
    path = Path(path)
    if not path.exists():
        raise DataError("task file not found (run `star data prepare` first?)", path=path)
    if n_candidates is None:
        manifest = manifest_beside(path)
        n_candidates = manifest.get("n_candidates") if manifest else None
        if n_candidates is None:
            log.info("%s: no manifest with n_candidates beside it; candidate lists only need "
                     "at least %d items", path, MIN_CANDIDATES)
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"not a task record: {error}", path=path, line=number) from None
            task = parse_task(record, path, number, n_candidates)
            if task.task_id in seen:
                raise DataError(f"task id {task.task_id!r} repeats the task of line "
                                f"{seen[task.task_id]}", path=path, line=number)
            seen[task.task_id] = number
            task._line = number  # for `validate_tasks` messages; not a field, never written
            yield task


def load_tasks(path: str | Path, limit: int | None = None,
               n_candidates: int | None = None) -> list[Task]:
    tasks = []
    for task in iter_tasks(path, n_candidates):
        if limit is not None and len(tasks) >= limit:
            break
        tasks.append(task)
    if not tasks:
        raise DataError("no tasks in file", path=path)
    return tasks


def validate_tasks(tasks: Iterable[Task], dataset: Dataset, path: str | Path | None = None) -> None:
    """Check tasks against the data they will be scored on; DataError naming file:line.

    Every user and item must be known, and the history must be the user's sequence just
    before the task's cutoff, with the target at the cutoff in the position its split
    puts it (DESIGN.md 3.2). A task file prepared from other data (a newer interaction
    appended, say) fails here instead of being scored with its target inside the fit
    data. A cutoff past the user's last interaction is accepted: the target was removed
    from the data (AgentRecBench's block set), which leaks nothing.
    """
    where = str(path) if path is not None else "tasks"
    frame = dataset.interactions
    grouped = frame.groupby("user", sort=False)
    sequences = grouped["item"].agg(list).to_dict()
    times = grouped["timestamp"].agg(list).to_dict()
    known_users = set(sequences) | (set(dataset.users.index.astype(str))
                                    if dataset.users is not None else set())
    items = dataset.items.index
    for index, task in enumerate(tasks):
        line = getattr(task, "_line", index + 1)

        def fail(message: str) -> DataError:
            return DataError(f"task {task.task_id}: {message}", path=where, line=line)

        if task.user_id not in known_users:
            raise fail(f"unknown user {task.user_id!r}: not in the dataset {dataset.name!r}")
        ids = [*task.history, *task.candidates]
        unknown = [i for i in dict.fromkeys(ids) if i not in items]
        if unknown:
            raise fail(f"unknown item(s) {unknown[:5]}: not in the items of {dataset.name!r}")
        sequence = sequences.get(task.user_id, [])
        cutoff = task.cutoff if task.cutoff is not None else locate_cutoff(sequence, task.history)
        if cutoff is None or cutoff > len(sequence):
            raise fail("the history is not a run of the user's interactions; the task file "
                       "does not match the data")
        if task.scenario not in SHORT_SCENARIOS and len(task.history) != cutoff:
            raise fail(f"a {task.scenario} task shows the whole history before its cutoff "
                       f"({cutoff} interaction(s)), this one {len(task.history)}")
        if sequence[cutoff - len(task.history):cutoff] != task.history:
            raise fail(f"the history is not the user's {len(task.history)} interaction(s) before "
                       f"the cutoff {cutoff}; the task file does not match the data")
        if cutoff == len(sequence):
            continue
        if sequence[cutoff] != task.target:
            raise fail(f"the target {task.target!r} is not the user's interaction at the cutoff "
                       f"{cutoff} ({sequence[cutoff]!r})")
        expected = len(sequence) - TARGET_OFFSET[task.split]
        if cutoff != expected:
            raise fail(f"a {task.split} target sits at position {expected} of this user's "
                       f"{len(sequence)} interactions, this task's at {cutoff}: the task file was "
                       "prepared from other data (run `star data prepare` again)")
        if task.cutoff_time is not None and float(times[task.user_id][cutoff]) != task.cutoff_time:
            raise fail(f"cutoff_time {task.cutoff_time:g} differs from the target's timestamp "
                       f"{float(times[task.user_id][cutoff]):g} in the data")


def target_time_ties(dataset: Dataset, tasks: Iterable[Task]) -> float | None:
    """Share of tasks whose target has the same timestamp as the interaction before it.

    Tied timestamps keep file order (DESIGN.md 3.2), so for these targets which item came
    "last" is the file's choice, not the user's: worth knowing when reading the numbers.
    """
    times = dataset.interactions.groupby("user", sort=False)["timestamp"].agg(list).to_dict()
    ties = total = 0
    for task in tasks:
        sequence = times.get(task.user_id, [])
        cutoff = task.cutoff
        if cutoff is None or not 0 < cutoff < len(sequence):
            continue
        total += 1
        ties += sequence[cutoff] == sequence[cutoff - 1]
    return round(ties / total, 4) if total else None


def prepare(dataset: Dataset, out: Path, seed: int = 0, scenarios: Iterable[str] = SCENARIOS) -> dict:
    """Write every split's task files, eval-200, valid-200, scenario variants and a manifest.

    valid-200 holds the valid tasks of eval-200's users, so design choices are made on the
    same users without touching their test targets (DESIGN.md 3.2). Returns the manifest.
    Running it twice on the same data and seed writes identical files (the manifest
    records their hashes, the data's fingerprint and the protocol, so a folder is reused
    only for the data and protocol it was written for: `starrec.data.prepared`).
    """
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict] = {}

    def emit(name: str, tasks: list[Task]) -> None:
        count, digest = write_tasks(tasks, out / name)
        files[name] = {"count": count, "sha256": digest}

    by_split = {split: build_split_tasks(dataset, split, seed) for split in SPLITS}
    for split, tasks in by_split.items():
        emit(f"{split}.jsonl", tasks)
    chosen = eval_users(by_split["test"])
    subsets = {"test": "eval-200", "valid": "valid-200"}
    for split, subset in subsets.items():
        emit(f"{subset}.jsonl", [t for t in by_split[split] if t.user_id in chosen])
    for split, subset in subsets.items():
        fit = fit_interactions(dataset, split)
        for scenario in scenarios:
            if scenario == "classic":
                continue
            variant = scenario_tasks(by_split[split], scenario, fit)
            emit(f"{split}-{scenario}.jsonl", variant)
            emit(f"{subset}-{scenario}.jsonl", [t for t in variant if t.user_id in chosen])
    manifest = {
        "dataset": dataset.name,
        "data_fingerprint": dataset.fingerprint(),
        "task_format": TASK_FORMAT,
        "seed": seed,
        "n_candidates": N_CANDIDATES,
        "eval_seed": EVAL_SEED,
        "n_users": dataset.n_users,
        "n_items": dataset.n_items,
        "n_interactions": len(dataset.interactions),
        "target_time_ties": {split: target_time_ties(dataset, tasks)
                             for split, tasks in by_split.items()},
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
