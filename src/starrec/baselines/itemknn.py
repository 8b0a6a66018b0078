"""Item-based k-nearest-neighbours on cosine similarity of binary item vectors."""

from __future__ import annotations

import numpy as np

from starrec.core import FitData, Recommender, Task
from starrec.latent.matrix import InteractionMatrix


class ItemKNN(Recommender):
    """Score = sum over history items of cos(candidate, item), keeping per candidate only
    its `k` most similar history items (all when k is None).

    Similarities are computed per task for candidates x history only, so memory stays
    linear in the data instead of quadratic in the catalogue. A tiny popularity term
    breaks ties among candidates with no co-occurrence at all.
    """

    name = "itemknn"

    def __init__(self, k: int | None = None, shrink: float = 0.0) -> None:
        self.k = k
        self.shrink = shrink

    def fit(self, data: FitData) -> ItemKNN:
        self.ui = InteractionMatrix.from_interactions(data.interactions, data.items.index)
        self.item_users = self.ui.matrix.T.tocsr()
        self.popularity = np.asarray(self.item_users.sum(axis=1)).ravel()
        self.norms = np.sqrt(self.popularity)
        return self

    def score(self, task: Task) -> np.ndarray:
        cand = self.ui.columns(task.candidates)
        hist = self.ui.columns(task.history)
        hist = np.unique(hist[hist >= 0])
        scores = np.zeros(len(cand))
        known = cand >= 0
        if len(hist) and known.any():
            overlap = (self.item_users[cand[known]] @ self.item_users[hist].T).toarray()
            denom = np.outer(self.norms[cand[known]], self.norms[hist]) + self.shrink
            sim = np.divide(overlap, denom, out=np.zeros_like(overlap), where=denom > 0)
            if self.k is not None and self.k < sim.shape[1]:
                sim = -np.partition(-sim, self.k - 1, axis=1)[:, : self.k]
            scores[known] = sim.sum(axis=1)
        pop = np.where(known, self.popularity[np.maximum(cand, 0)], 0.0)
        return scores + 1e-9 * pop / (pop.max() + 1.0)
