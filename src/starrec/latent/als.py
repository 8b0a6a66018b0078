"""Implicit-feedback matrix factorisation (Hu, Koren & Volinsky) via the `implicit` library."""

from __future__ import annotations

from collections.abc import Sequence

import os

import numpy as np
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

from starrec.core import FitData, Recommender, Task
from starrec.latent.matrix import InteractionMatrix
from starrec.latent.state import ModelState


# Folding a task's user in is one small solve per user: a second thread only adds the
# cost of waking it, which on busy cores is most of the call (docs/experiment-log.md).
FOLD_IN_THREADS = 1


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

    def _solver(self) -> AlternatingLeastSquares:
        return AlternatingLeastSquares(**self.params, random_state=self.seed,
                                       num_threads=min(os.cpu_count() or 1, 4),
                                       calculate_training_loss=False)

    def fit(self, data: FitData) -> ALS:
        self.ui = InteractionMatrix.from_interactions(data.interactions, data.items.index)
        # implicit parallelises itself; a second BLAS thread pool inside it only thrashes
        with threadpool_limits(1, "blas"):
            self.model = self._solver()
            self.model.fit(self.ui.matrix, show_progress=False)
        self.model.num_threads = FOLD_IN_THREADS
        return self

    def state(self) -> ModelState:
        """The item factors and the solver's settings: all that folding a user in needs."""
        items = sorted(self.ui.item_index, key=self.ui.item_index.__getitem__)
        factors = np.asarray(self.model.item_factors, dtype=np.float32)
        return ModelState("als", {**self.params, "seed": self.seed}, items,
                          {"item_factors": factors})

    @classmethod
    def from_state(cls, state: ModelState) -> ALS:
        """A model that scores as the fitted one did (users are folded in per task)."""
        if state.kind != "als":
            raise ValueError(f"not an ALS state: {state.kind!r}")
        model = cls(**state.params)
        model.ui = InteractionMatrix.for_items(state.items)
        with threadpool_limits(1, "blas"):  # as in `fit`: the solver checks it when made
            model.model = model._solver()
        model.model.num_threads = FOLD_IN_THREADS
        model.model.item_factors = np.ascontiguousarray(state.arrays["item_factors"],
                                                        dtype=np.float32)
        return model

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

    def score_many(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        """`score` of each task, the users folded in by one solver call over a matrix of
        all the histories (each row is solved on its own, so each task gets the scores
        it gets alone)."""
        rows = self.ui.history_rows([task.history for task in tasks])
        folded = np.flatnonzero(np.diff(rows.indptr) > 0)
        users = np.zeros((len(tasks), self.model.item_factors.shape[1]), dtype=np.float32)
        if len(folded):
            users[folded] = np.asarray(self.model.recalculate_user(
                np.arange(len(folded)), rows[folded])).reshape(len(folded), -1)
        results = []
        for row, task in enumerate(tasks):
            cand = self.ui.columns(task.candidates)
            if rows.indptr[row + 1] == rows.indptr[row]:
                results.append(np.zeros(len(cand)))
                continue
            known = cand >= 0
            scores = np.full(len(cand), -1e9)
            scores[known] = self.model.item_factors[cand[known]] @ users[row]
            results.append(scores)
        return results
