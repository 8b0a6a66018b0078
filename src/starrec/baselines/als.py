"""Implicit-feedback matrix factorisation (Hu, Koren & Volinsky) via the `implicit` library."""

from __future__ import annotations

import os

import numpy as np
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

from starrec.baselines.matrix import InteractionMatrix
from starrec.core import FitData, Recommender, Task


class ALS(Recommender):
    """Users are folded in from the task's history (one least-squares solve), so the
    score reflects exactly what the task shows, including shortened scenario histories."""

    name = "als"

    def __init__(
        self,
        factors: int = 64,
        regularization: float = 0.05,
        alpha: float = 2.0,
        iterations: int = 20,
        seed: int = 0,
    ) -> None:
        self.params = dict(factors=factors, regularization=regularization, alpha=alpha,
                           iterations=iterations)
        self.seed = seed

    def fit(self, data: FitData) -> ALS:
        self.ui = InteractionMatrix.from_interactions(data.interactions, data.items.index)
        # implicit parallelises itself; a second BLAS thread pool inside it only thrashes
        with threadpool_limits(1, "blas"):
            self.model = AlternatingLeastSquares(
                **self.params,
                random_state=self.seed,
                num_threads=min(os.cpu_count() or 1, 4),
                calculate_training_loss=False,
            )
            self.model.fit(self.ui.matrix, show_progress=False)
        return self

    def score(self, task: Task) -> np.ndarray:
        cand = self.ui.columns(task.candidates)
        known = cand >= 0
        scores = np.full(len(cand), -1e9)
        history = self.ui.history_row(task.history)
        if history.nnz == 0:
            return np.zeros(len(cand))
        user = self.model.recalculate_user(0, history)
        scores[known] = self.model.item_factors[cand[known]] @ np.asarray(user).ravel()
        return scores
