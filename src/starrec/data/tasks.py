"""Ranking tasks: a user's history, 20 shuffled candidates, one hidden target.

Tasks are built once, written to disk with content hashes, and read back by every
system, so that all numbers of the project are measured on identical candidate lists in
identical order (DESIGN.md 3.2).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from starrec.data.errors import DataError
from starrec.data.schema import Dataset
from starrec.data.splits import (
    MIN_INTERACTIONS,
    SPLITS,
    TARGET_OFFSET,
    Split,
    fit_interactions,
    sorted_ids,
)

log = logging.getLogger(__name__)

N_CANDIDATES = 20
EVAL_USERS = 200
EVAL_SEED = 2026
SCENARIOS = ("classic", "user_cold", "item_cold", "long_term", "short_term")
SHORT_HISTORY = 5
COLD_ITEM_MAX_INTERACTIONS = 5


@dataclass
class Task:
    """One ranking request. `candidates` are in presented order (the task file's; an LLM
    may be shown them reordered, `starrec.cst.ranker.present`); `target` is among them."""

    task_id: str
    user_id: str
    scenario: str
    history: list[str]
    candidates: list[str]
    target: str
    split: str = "test"
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        record = asdict(self)
        if not record["extra"]:
            del record["extra"]
        return json.dumps(record, ensure_ascii=False)

    @property
    def target_index(self) -> int:
        return self.candidates.index(self.target)


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
    sequences = dataset.interactions.groupby("user", sort=False)["item"].agg(list)
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
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return text.count("\n"), hashlib.sha256(text.encode()).hexdigest()


def iter_tasks(path: str | Path) -> Iterator[Task]:
    path = Path(path)
    if not path.exists():
        raise DataError("task file not found (run `star data prepare` first?)", path=path)
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                task = Task(**record)
            except (json.JSONDecodeError, TypeError) as error:
                raise DataError(f"not a task record: {error}", path=path, line=number) from None
            if task.target not in task.candidates or len(set(task.candidates)) != len(
                task.candidates
            ):
                raise DataError(
                    "candidates must be distinct and contain the target", path=path, line=number
                )
            yield task


def load_tasks(path: str | Path, limit: int | None = None) -> list[Task]:
    tasks = []
    for task in iter_tasks(path):
        if limit is not None and len(tasks) >= limit:
            break
        tasks.append(task)
    if not tasks:
        raise DataError("no tasks in file", path=path)
    return tasks


def prepare(dataset: Dataset, out: Path, seed: int = 0, scenarios: Iterable[str] = SCENARIOS) -> dict:
    """Write every split's task files, eval-200, scenario variants and a manifest.

    Returns the manifest. Running it twice on the same data and seed writes identical
    files (the manifest records their hashes).
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
    emit("eval-200.jsonl", [t for t in by_split["test"] if t.user_id in chosen])
    fit = fit_interactions(dataset, "test")
    for scenario in scenarios:
        if scenario == "classic":
            continue
        variant = scenario_tasks(by_split["test"], scenario, fit)
        emit(f"test-{scenario}.jsonl", variant)
        emit(f"eval-200-{scenario}.jsonl", [t for t in variant if t.user_id in chosen])
    manifest = {
        "dataset": dataset.name,
        "data_fingerprint": dataset.fingerprint(),
        "seed": seed,
        "n_candidates": N_CANDIDATES,
        "eval_seed": EVAL_SEED,
        "n_users": dataset.n_users,
        "n_items": dataset.n_items,
        "n_interactions": len(dataset.interactions),
        "files": files,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
