"""Sparse user-item matrices shared by the latent models and ItemKNN."""

from __future__ import annotations

from collections.abc import Sequence

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass
class InteractionMatrix:
    """Binary user x item matrix with the id <-> column maps that go with it."""

    matrix: sp.csr_matrix
    user_index: dict[str, int]
    item_index: dict[str, int]

    @classmethod
    def from_interactions(cls, interactions: pd.DataFrame, items: pd.Index) -> InteractionMatrix:
        """Columns cover every catalogue item, so unseen items score as cold, not as errors."""
        item_ids = pd.Index(items).append(pd.Index(interactions["item"].unique())).unique()
        item_index = {item: i for i, item in enumerate(item_ids)}
        users = pd.Index(interactions["user"].unique())
        user_index = {user: i for i, user in enumerate(users)}
        rows = users.get_indexer(interactions["user"])
        cols = item_ids.get_indexer(interactions["item"])
        matrix = sp.csr_matrix(
            (np.ones(len(rows), dtype=np.float32), (rows, cols)),
            shape=(len(users), len(item_ids)),
        )
        matrix.sum_duplicates()
        matrix.data[:] = 1.0
        return cls(matrix, user_index, item_index)

    @classmethod
    def for_items(cls, items: list[str]) -> InteractionMatrix:
        """No users, only the item columns: what a model rebuilt from its state needs to
        place a task's history."""
        matrix = sp.csr_matrix((0, len(items)), dtype=np.float32)
        return cls(matrix, {}, {item: i for i, item in enumerate(items)})

    def columns(self, items: list[str]) -> np.ndarray:
        """Column of each item, -1 for items outside the matrix."""
        return np.array([self.item_index.get(item, -1) for item in items], dtype=np.int64)

    def history_rows(self, histories: Sequence[Sequence[str]]) -> sp.csr_matrix:
        """One row per history (`history_row` of each, stacked), built at once."""
        indptr, indices = [0], []
        for history in histories:
            cols = self.columns(list(history))
            cols = np.unique(cols[cols >= 0])
            indices.append(cols)
            indptr.append(indptr[-1] + len(cols))
        flat = np.concatenate(indices) if indices else np.zeros(0, dtype=np.int64)
        return sp.csr_matrix((np.ones(len(flat), dtype=np.float32), flat, np.array(indptr)),
                             shape=(len(histories), self.matrix.shape[1]))

    def history_row(self, history: list[str]) -> sp.csr_matrix:
        """A one-row matrix of a history, for models that fold in a user from a task."""
        cols = self.columns(history)
        cols = np.unique(cols[cols >= 0])
        data = np.ones(len(cols), dtype=np.float32)
        return sp.csr_matrix((data, (np.zeros(len(cols), dtype=np.int64), cols)),
                             shape=(1, self.matrix.shape[1]))
