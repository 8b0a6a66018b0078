"""AgentRecBench, the paper's benchmark, in the AgentSociety Challenge simulator's format.

A data folder holds `item.json`, `user.json` and `review.json` (JSON lines); a task folder
holds `tasks/task_N.json` and `groundtruth/groundtruth_N.json` (DESIGN.md 3.1). Reviews
become interactions. As in the simulator, the ground-truth review of every task (the
"block set") is removed from the data, so that no system can look the answer up.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from starrec.data.errors import DataError
from starrec.data.generic import read_json_lines
from starrec.data.schema import Dataset, TableSource, build_dataset
from starrec.data.tasks import SCENARIOS, Task

log = logging.getLogger(__name__)

SOURCES = ("amazon", "goodreads", "yelp")
TITLE_FIELD = {"amazon": "title", "goodreads": "title", "yelp": "name"}
# item fields kept as text beside the title (lists are joined with ", ")
TEXT_FIELDS = ("main_category", "categories", "genres", "description")
TASK_FILE = re.compile(r"task_(\d+)\.json")


@dataclass(frozen=True)
class TaskFile:
    """One validated task of a task folder."""

    number: int
    path: Path
    user: str
    candidates: list[str]
    target: str
    record: dict


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise DataError("file not found", path=path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"not valid JSON ({error.msg})", path=path, line=error.lineno) from None
    if not isinstance(record, dict):
        raise DataError("expected one JSON object", path=path)
    return record


def read_task_files(task_dir: str | Path) -> list[TaskFile]:
    """Every task of `task_dir` with its ground truth, ordered by N, checked for use."""
    task_dir = Path(task_dir)
    numbered = []
    for path in (task_dir / "tasks").glob("task_*.json"):
        match = TASK_FILE.fullmatch(path.name)
        if match:
            numbered.append((int(match.group(1)), path))
    if not numbered:
        raise DataError("no tasks/task_N.json files", path=task_dir)
    tasks = []
    for number, path in sorted(numbered):
        record = _read_json(path)
        if record.get("type", "recommendation") != "recommendation":
            raise DataError(f"task type {record['type']!r}, expected 'recommendation'", path=path)
        user, candidates = record.get("user_id"), record.get("candidate_list")
        if user is None or not isinstance(candidates, list) or not candidates:
            raise DataError("expected 'user_id' and a non-empty 'candidate_list'", path=path)
        candidates = [str(c) for c in candidates]
        repeated = sorted({c for c in candidates if candidates.count(c) > 1})
        if repeated:
            raise DataError(f"duplicate candidate(s) {repeated}", path=path,
                            column="candidate_list")
        truth_path = task_dir / "groundtruth" / f"groundtruth_{number}.json"
        target = _read_json(truth_path).get("ground truth")
        if target is None:
            raise DataError("no 'ground truth' item", path=truth_path)
        if str(target) not in candidates:
            raise DataError(
                f"ground truth {str(target)!r} is not in the candidate list of {path}",
                path=truth_path,
            )
        tasks.append(TaskFile(number, path, str(user), candidates, str(target), record))
    return tasks


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(str(v) for v in value if isinstance(v, (str, int, float)))
    return str(value)


def _of_source(
    records: list[dict], lines: np.ndarray, source: str | None, path: Path
) -> tuple[list[dict], np.ndarray]:
    """Keep the records of one source when the folder mixes sources (they carry `source`)."""
    if source is None:
        return records, lines
    keep = np.array([r.get("source", source) == source for r in records], dtype=bool)
    if records and not keep.any():
        raise DataError(f"no records of source {source!r}", path=path)
    if not keep.all():
        log.info("%s: skipped %d record(s) of sources other than %s", path, int((~keep).sum()),
                 source)
    return [r for r, k in zip(records, keep) if k], lines[keep]


def _items(path: Path, source: str | None) -> tuple[pd.DataFrame, TableSource]:
    records, lines = _of_source(*read_json_lines(path), source, path)

    def title(record: dict) -> object:
        if source is not None:
            return record.get(TITLE_FIELD[source])
        return record.get("title") or record.get("name")

    table = {"item": [r.get("item_id") for r in records], "title": [title(r) for r in records]}
    for name in TEXT_FIELDS:
        if any(name in r for r in records):
            table[name] = [_text(r.get(name)) for r in records]
    return pd.DataFrame(table), TableSource(str(path), lines=lines)


def _users(path: Path, source: str | None) -> pd.DataFrame | None:
    if not path.exists():
        return None
    records, lines = _of_source(*read_json_lines(path), source, path)
    if not records:
        return None
    missing = [line for r, line in zip(records, lines) if r.get("user_id") is None]
    if missing:
        raise DataError("user without 'user_id'", path=path, line=int(missing[0]))
    users = pd.DataFrame.from_records(records).rename(columns={"user_id": "user"})
    users["user"] = users["user"].astype(str)
    return users.set_index("user")


# Yelp reviews carry `date`; the challenge's Goodreads files `date_added`; its Amazon files
# a numeric `timestamp` in milliseconds.
DATE_FIELDS = ("date", "date_added", "timestamp")


def _review_date(review: dict) -> str | None:
    """The review's date as text, numeric epoch values (seconds or milliseconds) as ISO."""
    for name in DATE_FIELDS:
        value = review.get(name)
        if value in (None, ""):
            continue
        if isinstance(value, (int, float)):
            seconds = value / 1000 if value > 1e11 else value
            return pd.Timestamp(seconds, unit="s", tz="UTC").isoformat()
        return str(value)
    return None


def load_agentrecbench(
    data_dir: str | Path, task_dir: str | Path | None = None, source: str | None = None
) -> Dataset:
    """The reviews of `data_dir` as a Dataset; with `task_dir`, minus the block set.

    `source` (amazon, goodreads, yelp) picks the title field and, in a folder that mixes
    sources, that source's records; without it an item's title is `title`, else `name`.
    """
    if source is not None and source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
    data_dir = Path(data_dir)
    items, items_source = _items(data_dir / "item.json", source)
    review_path = data_dir / "review.json"
    reviews, lines = _of_source(*read_json_lines(review_path), source, review_path)
    dates = [_review_date(r) for r in reviews]
    undated = [line for date, line in zip(dates, lines) if date is None]
    if undated:
        raise DataError(
            f"review has no date ({len(undated)} such review(s)); expected every review to "
            f"carry one of {list(DATE_FIELDS)}",
            path=review_path,
            line=int(undated[0]),
        )
    interactions = pd.DataFrame(
        {
            "user": [r.get("user_id") for r in reviews],
            "item": [r.get("item_id") for r in reviews],
            "timestamp": dates,
            "rating": [r.get("stars") for r in reviews],
        }
    )
    if task_dir is not None:
        blocked = {(t.user, t.target) for t in read_task_files(task_dir)}
        pairs = list(zip(interactions["user"].astype(str), interactions["item"].astype(str)))
        hit = np.array([pair in blocked for pair in pairs], dtype=bool)
        log.info("%s: block set removed %d ground-truth review(s) of %d task(s)", review_path,
                 int(hit.sum()), len(blocked))
        missing = len(blocked - {p for p, h in zip(pairs, hit) if h})
        if missing:
            log.warning("%s: %d task(s) have no ground-truth review to remove", review_path,
                        missing)
        interactions = interactions[~hit].reset_index(drop=True)
        lines = lines[~hit]
    return build_dataset(
        f"agentrecbench-{source}" if source else "agentrecbench",
        interactions,
        TableSource(str(review_path), lines=lines),
        items,
        items_source,
        users=_users(data_dir / "user.json", source),
    )


def load_agentrecbench_tasks(
    task_dir: str | Path, dataset: Dataset, scenario: str = "classic"
) -> list[Task]:
    """The benchmark's own tasks, candidates as given; `scenario` names the task set.

    History is the user's interactions in `dataset`, which must be loaded with the same
    `task_dir` so the ground-truth reviews are blocked; a target still in its user's
    history is refused as a leak.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {SCENARIOS}")
    sequences = dataset.interactions.groupby("user", sort=False)["item"].agg(list)
    # a user whose only review is blocked is known (from user.json) with an empty history
    known = set(sequences.index) | set(() if dataset.users is None else dataset.users.index)
    tasks = []
    for task in read_task_files(task_dir):
        if task.user not in known:
            raise DataError(f"unknown user {task.user!r}: not in user.json nor review.json",
                            path=task.path, column="user_id")
        unknown = [c for c in task.candidates if c not in dataset.items.index]
        if unknown:
            raise DataError(f"candidate(s) {unknown} not in item.json", path=task.path,
                            column="candidate_list")
        history = sequences.get(task.user, [])
        if task.target in history:
            raise DataError(
                f"ground truth {task.target!r} is in the user's history; load the dataset "
                "with this task folder so that the block set is removed",
                path=task.path,
            )
        tasks.append(
            Task(
                task_id=f"arb-{task.number}",
                user_id=task.user,
                scenario=scenario,
                history=list(history),
                candidates=task.candidates,
                target=task.target,
                split="test",
                extra={k: task.record[k] for k in ("candidate_category", "loc", "data type")
                       if k in task.record},
            )
        )
    return tasks
