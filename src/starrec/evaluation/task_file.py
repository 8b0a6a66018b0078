"""The per-task file beside a results JSON (DESIGN.md 3.4): `x.json` -> `x.tasks.jsonl`.

One row a task: its id, target, the target's rank, the ranking, whether the output was
valid and well formed, its seconds, and a hash of its candidate set (two rows of one task
id are the same task only if target and candidates agree). `star report --paired`
compares two systems from these rows.

A run of more than `COMPACT_OVER` tasks (an Amazon Games run over all 50,546 test users)
is written compact so the file stays a few MB of plain text: a header line names the
columns, each row is a JSON array, and the ranking is a string of letters, one per
candidate, where "A" is the candidate with the smallest id (ids sorted as strings), "B"
the next, and so on. `expand_rankings` turns the letters back into item ids given the
tasks (the task file the results' provenance names by its sha256); paired comparisons
need only the ranks and the candidate hashes, which every row keeps.
"""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from starrec.core import Task
    from starrec.evaluation.runner import TaskRecord

COMPACT_OVER = 10_000
LABELS = string.ascii_uppercase + string.ascii_lowercase + string.digits
COLUMNS = ("task_id", "target", "rank", "ranking", "valid", "well_formed", "seconds",
           "candidates_sha256")
_REQUIRED = ("task_id", "target", "rank", "candidates_sha256")
_LABELS_NOTE = ("letters, one per candidate: A is the candidate with the smallest id (ids "
                "sorted as strings), B the next, ...; starrec.evaluation.task_file."
                "expand_rankings turns them back into ids from the tasks")


def task_file_path(results: Path) -> Path:
    """The per-task file beside a results JSON: `x.json` -> `x.tasks.jsonl`."""
    return Path(results).with_suffix(".tasks.jsonl")


def candidates_sha256(items: Iterable[str]) -> str:
    """16 hex digits of the candidate set (order ignored): two per-task rows of one task id
    are the same task only if their targets and candidate sets agree."""
    return hashlib.sha256("\n".join(sorted(items)).encode()).hexdigest()[:16]


def task_row(record: TaskRecord) -> dict[str, Any]:
    """One task's row: enough to compare two systems task by task."""
    return {"task_id": record.task_id, "target": record.target, "rank": record.rank,
            "ranking": record.ranking, "valid": record.valid,
            "well_formed": record.well_formed_or_valid, "seconds": round(record.seconds, 6),
            # the completed ranking is a permutation of the candidates
            "candidates_sha256": candidates_sha256(record.ranking)}


def ranking_labels(ranking: list[str]) -> str:
    """The ranking as letters of its sorted ids (see the module docstring)."""
    if len(ranking) > len(LABELS) or len(set(ranking)) != len(ranking):
        raise ValueError(f"a compact ranking needs at most {len(LABELS)} distinct items, "
                         f"got {len(ranking)} ({len(set(ranking))} distinct)")
    position = {item: i for i, item in enumerate(sorted(ranking))}
    return "".join(LABELS[position[item]] for item in ranking)


def labels_ranking(labels: str, candidates: Iterable[str]) -> list[str]:
    """The item ids a compact ranking names, given the task's candidates."""
    ordered = sorted(candidates)
    if len(labels) != len(ordered) or len(set(labels)) != len(labels):
        raise ValueError(f"ranking {labels!r} is not a permutation of {len(ordered)} candidates")
    try:
        return [ordered[LABELS.index(label)] for label in labels]
    except (ValueError, IndexError):
        raise ValueError(f"ranking {labels!r} names a label beyond {len(ordered)} candidates") from None


def _compact_lines(rows: list[dict[str, Any]]) -> list[str] | None:
    """The compact form of `rows` (header first), or None when a ranking has more items
    than there are letters."""
    header = {"columns": list(COLUMNS), "ranking": _LABELS_NOTE}
    lines = [json.dumps(header)]
    for row in rows:
        try:
            labels = ranking_labels(row["ranking"])
        except ValueError:
            return None
        values = {**row, "ranking": labels, "valid": int(row["valid"]),
                  "well_formed": int(row["well_formed"])}
        lines.append(json.dumps([values[c] for c in COLUMNS], separators=(",", ":")))
    return lines


def write_task_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """`task_row`s to `path`, one JSON object a line; compact (a header line, then one
    array a row) for more than `COMPACT_OVER` rows."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = _compact_lines(rows) if len(rows) > COMPACT_OVER else None
    if lines is None:
        lines = [json.dumps(row) for row in rows]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def write_task_file(records: list[TaskRecord], path: Path) -> None:
    """One `task_row` per record (see `write_task_rows`)."""
    write_task_rows([task_row(record) for record in records], path)


def read_task_file(path: Path) -> list[dict[str, Any]]:
    """The rows of a per-task file as dicts. A compact file's rows carry the ranking as
    letters under `ranking_labels` (no `ranking`: `expand_rankings` adds it)."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    columns: list[str] | None = None
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
            if number == 1 and isinstance(value, dict) and "columns" in value:
                columns = list(value["columns"])
                continue
            if columns is not None:
                if not isinstance(value, list) or len(value) != len(columns):
                    raise TypeError(f"expected an array of {len(columns)} values")
                row = dict(zip(columns, value))
                row["ranking_labels"] = row.pop("ranking")
                row["valid"], row["well_formed"] = bool(row["valid"]), bool(row["well_formed"])
            else:
                row = value
            for key in _REQUIRED:
                row[key]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not a per-task row ({error})") from None
        rows.append(row)
    return rows


def expand_rankings(rows: list[dict[str, Any]], tasks: Iterable[Task]) -> list[dict[str, Any]]:
    """Compact rows with their `ranking` as item ids, from the tasks they were run on
    (rows that have one already pass through). Raises `ValueError` for a task missing
    from `tasks` or whose candidates do not hash to the row's."""
    candidates = {task.task_id: list(task.candidates) for task in tasks}
    expanded = []
    for row in rows:
        if "ranking" in row:
            expanded.append(row)
            continue
        if row["task_id"] not in candidates:
            raise ValueError(f"task {row['task_id']} is not among the tasks given")
        items = candidates[row["task_id"]]
        if candidates_sha256(items) != row["candidates_sha256"]:
            raise ValueError(f"task {row['task_id']}: the tasks given have other candidates "
                             "than the run's")
        expanded.append({**row, "ranking": labels_ranking(row["ranking_labels"], items)})
    return expanded
