"""Leave-one-out positions and the interactions a model may be fit on (DESIGN.md 3.2-3.3).

A user's sequence (time order, ties in file order) ends with the test target; the
validation target comes just before it, and the training target before that. A model
used on the tasks of a split may only see, for each user, what came before that user's
target of the split.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd

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


def task_interactions(dataset: Dataset, tasks, split: Split) -> pd.DataFrame:
    """The interactions evidence for a set of tasks may use (DESIGN.md 3.3).

    A user with a task keeps only the rows up to the last item of that task's history, in
    sequence order, so nothing at or after the target's time exists for that user, and
    removing the target row from the raw data changes nothing. Users without a task keep
    what `fit_interactions` allows for the split (never a target of it, so never a test
    interaction when serving test tasks).
    """
    cut: dict[str, str | None] = {}
    for task in tasks:
        if task.user_id in cut:
            raise ValueError(f"user {task.user_id!r} has two tasks in one task set")
        cut[task.user_id] = task.history[-1] if task.history else None
    position, length = sequence_positions(dataset)
    frame = dataset.interactions
    with_task = frame["user"].isin(cut.keys()).to_numpy()
    last_item = frame["user"].map(cut)
    is_last = (frame["item"] == last_item).to_numpy()
    cut_position = pd.Series(np.where(is_last, position, -1)).groupby(frame["user"].to_numpy()).transform("max").to_numpy()
    keep_task_user = with_task & (position <= cut_position)
    has_tasks = length >= MIN_INTERACTIONS
    keep_other = ~with_task & (~has_tasks | (position < length - TARGET_OFFSET[split]))
    return frame[keep_task_user | keep_other].reset_index(drop=True)
