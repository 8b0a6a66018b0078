"""Leave-one-out positions and the interactions a model may be fit on (DESIGN.md 3.2-3.3).

A user's sequence (time order, ties in file order) ends with the test target; the
validation target comes just before it, and the training target before that. A model
used on the tasks of a split may only see, for each user, what came before that user's
target of the split.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Literal

import numpy as np
import pandas as pd

from starrec.core import Task
from starrec.data.errors import LeakError
from starrec.data.schema import Dataset

Split = Literal["train", "valid", "test"]
SPLITS: tuple[Split, ...] = ("train", "valid", "test")

# How many interactions from the end of a sequence each split's target sits.
TARGET_OFFSET: dict[str, int] = {"test": 1, "valid": 2, "train": 3}
MIN_INTERACTIONS = 3


def natural_key(identifier: str) -> tuple[int, int | str]:
    """Sort numeric ids as numbers ("2" before "10") and the rest as text."""
    return (0, int(identifier)) if identifier.isdigit() else (1, identifier)


def sorted_ids(ids) -> list[str]:
    return sorted(set(ids), key=natural_key)


def sequence_positions(dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
    """For every interaction row: its 0-based position in its user's sequence, and that
    user's sequence length."""
    grouped = dataset.interactions.groupby("user", sort=False)
    position = grouped.cumcount().to_numpy()
    length = grouped["item"].transform("size").to_numpy()
    return position, length


def target_mask(dataset: Dataset, split: Split) -> np.ndarray:
    """Rows that are a target of `split` (users with too few interactions have none)."""
    position, length = sequence_positions(dataset)
    return (length >= MIN_INTERACTIONS) & (position == length - TARGET_OFFSET[split])


def fit_interactions(dataset: Dataset, split: Split) -> pd.DataFrame:
    """The interactions a model may be fit on when it serves tasks of `split`.

    For every user with tasks, the rows strictly before that user's target of the split;
    users too short to have tasks keep all their rows (they hold no target to leak).
    """
    position, length = sequence_positions(dataset)
    has_tasks = length >= MIN_INTERACTIONS
    keep = ~has_tasks | (position < length - TARGET_OFFSET[split])
    return dataset.interactions[keep].reset_index(drop=True)


def locate_cutoff(sequence: Sequence[str], history: Sequence[str]) -> int | None:
    """The earliest position `p` with `sequence[p - len(history):p] == history`, or None.

    For tasks that do not carry their cutoff (files written before cutoffs existed): a
    shortened history is found as a run of the sequence by position, never by the item id
    of its last entry, which a repeated item would move to a later row.
    """
    n = len(history)
    history = list(history)
    for end in range(n, len(sequence) + 1):
        if list(sequence[end - n:end]) == history:
            return end
    return None


def task_cutoff(task: Task, sequence: Sequence[str]) -> int:
    """The task's cutoff: its own, or found from its history in the user's sequence."""
    if task.cutoff is not None:
        return task.cutoff
    found = locate_cutoff(sequence, task.history)
    if found is None:
        raise ValueError(f"task {task.task_id}: its history is not a run of user "
                         f"{task.user_id!r}'s interactions; the task file does not match the data")
    return found


def task_interactions(dataset: Dataset, tasks: Iterable[Task], split: Split) -> pd.DataFrame:
    """The interactions evidence for a set of tasks may use (DESIGN.md 3.3).

    A user with a task keeps only the rows before the task's cutoff (the target's position
    in the user's sequence), so nothing at or after the target exists for that user, even
    when the target item was also consumed earlier, and removing the target row from the
    raw data changes nothing. Users without a task keep what `fit_interactions` allows for
    the split (never a target of it, so never a test interaction when serving test tasks).
    """
    frame = dataset.interactions
    by_user: dict[str, Task] = {}
    for task in tasks:
        if task.user_id in by_user:
            raise ValueError(f"user {task.user_id!r} has two tasks in one task set")
        by_user[task.user_id] = task
    position, length = sequence_positions(dataset)
    users = frame["user"].to_numpy()
    with_task = frame["user"].isin(by_user.keys()).to_numpy()
    cut: dict[str, int] = {}
    if with_task.any():
        sequences = frame[with_task].groupby("user", sort=False)["item"].agg(list)
        cut = {user: task_cutoff(by_user[user], sequences[user]) for user in sequences.index}
    cut_position = pd.Series(users).map(cut).fillna(-1).to_numpy()
    keep_task_user = with_task & (position < cut_position)
    has_tasks = length >= MIN_INTERACTIONS
    keep_other = ~with_task & (~has_tasks | (position < length - TARGET_OFFSET[split]))
    return frame[keep_task_user | keep_other].reset_index(drop=True)


def check_no_leak(tasks: Iterable[Task], interactions: pd.DataFrame, where: str) -> None:
    """Stop with LeakError if `interactions` hold, for any task's user, the task's target
    row or any row at or after the task's cutoff (DESIGN.md 3.3).

    Call it on the data a model is fit on or a store is built from, just before: a number
    measured on leaked data looks better than it is, and nothing downstream can tell.
    `interactions` are rows of the dataset the tasks were built on (a subset of each user's
    sequence, in sequence order), so for a user with cutoff `c`:
    - more than `c` rows means a row at or after the cutoff (a stale task file, or data
      cut for another split);
    - a row later than the task's cutoff time is after the target;
    - with the task's full history known (`len(history) == c`), every row must be one of
      the history's, so the target row (and any later item) is named even when earlier
      rows are missing. A repeated item is only counted as often as the history has it.
    `where` names the data in the message (e.g. "fit data of pop").
    """
    tasks = list(tasks)
    if not tasks:
        return
    users = {t.user_id for t in tasks}
    mine = interactions[interactions["user"].isin(users)]
    grouped = mine.groupby("user", sort=False)
    items = grouped["item"].agg(list).to_dict()
    times = grouped["timestamp"].agg(list).to_dict() if "timestamp" in mine.columns else {}
    for task in tasks:
        rows = items.get(task.user_id, [])
        prefix = f"{where}: task {task.task_id} (user {task.user_id!r})"
        cutoff = task.cutoff
        if cutoff is not None and len(rows) > cutoff:
            raise LeakError(
                f"{prefix}: the data holds {len(rows)} of the user's interactions but only the "
                f"{cutoff} before the target may be used; the task file was prepared from other "
                "data or the data was cut for another split (re-run `star data prepare`)")
        if task.cutoff_time is not None:
            late = [t for t in times.get(task.user_id, []) if float(t) > task.cutoff_time]
            if late:
                raise LeakError(
                    f"{prefix}: {len(late)} interaction(s) after the target's time "
                    f"{task.cutoff_time:g} (the first at {float(late[0]):g})")
        if cutoff is None:
            if rows.count(task.target) > task.history.count(task.target):
                raise LeakError(f"{prefix}: the data holds its target {task.target!r}")
        elif len(task.history) == cutoff:
            extra = Counter(rows) - Counter(task.history)
            if extra:
                named = (f"its target {task.target!r}" if task.target in extra else
                         f"item(s) {sorted(extra)[:5]} not in its history")
                raise LeakError(f"{prefix}: the data holds {named}")
