"""Reference points: random order and global popularity."""

from __future__ import annotations

import numpy as np

from starrec.core import FitData, Recommender, Task
from starrec.data.tasks import task_rng


class RandomRecommender(Recommender):
    """Uniformly random order, reproducible per task (expected AvgHR = 15 on 20 candidates)."""

    name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def fit(self, data: FitData) -> RandomRecommender:
        return self

    def score(self, task: Task) -> np.ndarray:
        return task_rng(self.seed, "random", task.task_id).random(len(task.candidates))


class PresentedOrder(Recommender):
    """The candidates as the task file presents them: what an LLM shown that order scores
    if it keeps it, the reference of its paired difference (DESIGN.md 3.7)."""

    name = "presented"

    def fit(self, data: FitData) -> PresentedOrder:
        return self

    def score(self, task: Task) -> np.ndarray:
        return -np.arange(len(task.candidates), dtype=float)


class PopularityRecommender(Recommender):
    """Number of users who interacted with the item in the fit data."""

    name = "pop"

    def fit(self, data: FitData) -> PopularityRecommender:
        self.counts = data.interactions["item"].value_counts()
        return self

    def score(self, task: Task) -> np.ndarray:
        return np.array([self.counts.get(c, 0) for c in task.candidates], dtype=float)
