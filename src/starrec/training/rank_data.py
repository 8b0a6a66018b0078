"""Training tasks for the ranking head: every train position of every user, without leakage.

One task per user (the train target) is a few hundred examples on ML-100K; a user's
earlier positions are many more. The task at position t of a user's sequence has
history = sequence[:t], target = sequence[t], 19 negatives drawn as the protocol's
(DESIGN.md 3.2: items the user never interacted with, seeded per user and position) and
candidates shuffled per example. Positions run up to the train target (the last
`TARGET_OFFSET["train"]` position from the end), so no valid or test target is ever a
training target.

Evidence (DESIGN.md 3.3): the task at position t may hold nothing of its user at or
after t. A store cut per position would be one store build per task (about 100k on
ML-100K); instead users are split into `folds` groups by a hash of their id and each
group's tasks read a store built **without any row of that group's users** (leave the
users out), from the train split's fit data (so no valid or test interaction of anyone).
A task then sees nothing at all of its own user in the store: nothing at or after t by
construction, and the evidence does not depend on the user's later rows, which a test
proves. The cost is that the user's own earlier rows are missing too (an item of their
history counts one consumer fewer than it would at inference, where the store holds the
user's rows before the cutoff); the similar-users signal excludes the task's own user
either way. `folds` stores are built once and cached like any store.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from starrec.config import CSTConfig
from starrec.core import Task
from starrec.cst.store import EvidenceStore, ensure_store
from starrec.data.schema import Dataset
from starrec.data.splits import MIN_INTERACTIONS, TARGET_OFFSET, fit_interactions, sorted_ids
from starrec.data.tasks import N_CANDIDATES, sample_candidates, task_rng

log = logging.getLogger(__name__)


def user_fold(user: str, folds: int, seed: int = 0) -> int:
    """The fold of a user: a hash of its id, so it depends on nothing in the data."""
    digest = hashlib.sha256(f"{seed}:{user}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % folds


def position_tasks(dataset: Dataset, *, seed: int = 0, min_history: int = 1,
                   max_per_user: int | None = None, users: Iterable[str] | None = None,
                   n_candidates: int = N_CANDIDATES) -> list[Task]:
    """A task per train position t (history = sequence[:t], t >= `min_history`, up to and
    including the train target), candidates sampled as the protocol's and shuffled;
    with `max_per_user`, each user's latest positions only (closest to the evaluated
    ones). Users in sorted order, positions ascending."""
    universe = np.array(sorted_ids(dataset.interactions["item"]), dtype=object)
    grouped = dataset.interactions.groupby("user", sort=False)
    sequences = grouped["item"].agg(list)
    times = grouped["timestamp"].agg(list)
    chosen = sorted_ids(sequences.index) if users is None else sorted_ids(users)
    tasks: list[Task] = []
    for user in chosen:
        sequence = sequences[user]
        if len(sequence) < MIN_INTERACTIONS:
            continue
        last = len(sequence) - TARGET_OFFSET["train"]
        positions = list(range(max(min_history, 1), last + 1))
        if max_per_user is not None:
            positions = positions[-max_per_user:] if max_per_user > 0 else []
        seen = set(sequence)
        for t in positions:
            candidates = sample_candidates(sequence[t], seen, universe,
                                           task_rng(seed, f"rank-{t}", user), n_candidates)
            if candidates is None:
                continue
            tasks.append(Task(task_id=f"rank-{user}-{t}", user_id=user, scenario="classic",
                              history=list(sequence[:t]), candidates=candidates,
                              target=sequence[t], split="train", cutoff=t,
                              cutoff_time=float(times[user][t])))
    return tasks


def leave_out_interactions(dataset: Dataset, users: Iterable[str]) -> pd.DataFrame:
    """The train split's fit data without any row of `users`."""
    frame = fit_interactions(dataset, "train")
    return frame[~frame["user"].isin(set(users))].reset_index(drop=True)


@dataclass
class FoldStores:
    """One leave-the-users-out store per fold; `store_for(user)` is the one a task of that
    user reads, checked to hold no row of the user."""

    folds: int
    seed: int
    stores: list[EvidenceStore]
    paths: list[Path] = field(default_factory=list)

    def store_for(self, user: str) -> EvidenceStore:
        store = self.stores[user_fold(user, self.folds, self.seed)]
        if store.knows_user(user):
            raise RuntimeError(f"{store.path} holds rows of user {user!r}, whose tasks read it")
        return store


def build_fold_stores(dataset: Dataset, config: CSTConfig, folds: int = 5, seed: int = 0,
                      folder: Path | None = None, progress: bool = True) -> FoldStores:
    """Build (or reuse) the `folds` leave-the-users-out stores of `dataset`'s train split."""
    if folds < 2:
        raise ValueError("leave-the-users-out evidence needs at least 2 folds")
    users = sorted_ids(dataset.interactions["user"])
    stores, paths = [], []
    for k in range(folds):
        left_out = [u for u in users if user_fold(u, folds, seed) == k]
        frame = leave_out_interactions(dataset, left_out)
        path = ensure_store(frame, dataset.items, config, dataset=dataset.name,
                            split=f"rank-fold{k}of{folds}",
                            path=None if folder is None else folder / f"fold{k}of{folds}.sqlite",
                            progress=progress)
        paths.append(path)
        stores.append(EvidenceStore(path))
    log.info("rank: %d leave-the-users-out stores: %s", folds, ", ".join(map(str, paths)))
    return FoldStores(folds, seed, stores, paths)
