"""Collaborative signals computed from interactions, with sparse algebra that scales.

Everything here is a pure function of the interactions it is given; which interactions
those may be (DESIGN.md 3.3) is decided by the caller (`starrec.data.splits`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp


@dataclass
class Graph:
    """The user-item graph: binary user x item matrix, ids, and the item-to-item
    first-order transition counts of users' sequences."""

    users: pd.Index
    items: pd.Index
    matrix: sp.csr_matrix  # users x items, 1.0 where the user consumed the item
    transitions: sp.csr_matrix  # items x items, count of "row item, then column item"

    @property
    def popularity(self) -> np.ndarray:
        return np.asarray(self.matrix.sum(axis=0), dtype=np.float64).ravel()

    def item_column(self, item: str) -> int:
        position = self.items.get_indexer([item])[0]
        return int(position)


def build_graph(interactions: pd.DataFrame, catalogue: pd.Index) -> Graph:
    """`interactions` rows are in time order per user (as `Dataset` keeps them)."""
    items = pd.Index(catalogue).append(pd.Index(interactions["item"].unique())).unique()
    users = pd.Index(interactions["user"].unique())
    rows = users.get_indexer(interactions["user"])
    cols = items.get_indexer(interactions["item"])
    matrix = sp.csr_matrix(
        (np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(len(users), len(items))
    )
    matrix.sum_duplicates()
    matrix.data[:] = 1.0

    # consecutive rows of the same user are one step of that user's sequence
    order = np.argsort(rows, kind="stable")
    rows_sorted, cols_sorted = rows[order], cols[order]
    same_user = rows_sorted[1:] == rows_sorted[:-1]
    source, target = cols_sorted[:-1][same_user], cols_sorted[1:][same_user]
    transitions = sp.csr_matrix(
        (np.ones(len(source), dtype=np.float32), (source, target)), shape=(len(items), len(items))
    )
    transitions.sum_duplicates()
    return Graph(users, items, matrix, transitions)


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Share of items (0-100) with a strictly smaller value: the top item gets ~100."""
    values = np.asarray(values, dtype=float)
    if len(values) == 0:
        return values
    sorted_values = np.sort(values)
    return 100.0 * np.searchsorted(sorted_values, values, side="left") / len(values)


@dataclass
class Timeline:
    """Interactions in time order, for popularity within a window that ends at a task's
    cutoff: what was popular just before the target, never after it."""

    timestamps: np.ndarray  # sorted ascending
    columns: np.ndarray  # the item column of each interaction, same order
    n_items: int

    @classmethod
    def build(cls, timestamps: np.ndarray, columns: np.ndarray, n_items: int) -> Timeline:
        order = np.argsort(np.asarray(timestamps, dtype=np.float64), kind="stable")
        return cls(np.asarray(timestamps, dtype=np.float64)[order],
                   np.asarray(columns, dtype=np.int64)[order], n_items)

    def recent_popularity(self, fraction: float, cutoff_time: float | None) -> np.ndarray:
        """Interactions per item in the window of length `fraction` x (cutoff - the data's
        first time) that ends at `cutoff_time`, strictly before it.

        The span is measured up to the cutoff, not to the data's end, so interactions after
        the cutoff (any user's) change nothing, and a target's own timestamp is outside
        the window. Without a cutoff (a store queried outside any task), the window ends at
        the last interaction and includes it.
        """
        if len(self.timestamps) == 0:
            return np.zeros(self.n_items)
        start = self.timestamps[0]
        if cutoff_time is None:
            end = self.timestamps[-1]
            low = np.searchsorted(self.timestamps, end - fraction * (end - start), side="left")
            high = len(self.timestamps)
        else:
            begin = cutoff_time - fraction * max(cutoff_time - start, 0.0)
            low = np.searchsorted(self.timestamps, begin, side="left")
            high = np.searchsorted(self.timestamps, cutoff_time, side="left")
        counts = np.bincount(self.columns[low:high], minlength=self.n_items)
        return counts[: self.n_items].astype(float)


@dataclass
class Neighbours:
    """Top-k neighbours of every item as flat aligned arrays (one row per pair)."""

    item: np.ndarray
    rank: np.ndarray
    neighbour: np.ndarray
    count: np.ndarray
    strength: np.ndarray


def _top_k_rows(
    matrix: sp.csr_matrix, k: int, row_offset: int, payload: np.ndarray | None = None
) -> list[tuple[np.ndarray, ...]]:
    """Per row, the k largest entries (ties by column) as (item, rank, column, payload,
    value) arrays; `payload` is aligned with `matrix.data` (defaults to the values).

    The kept set is the first k in the order (value descending, column ascending), also
    when ties straddle the k-th place, so that any engine ranking by that order
    (`starrec.cst.sql`) keeps the same neighbours."""
    payload = matrix.data if payload is None else payload
    out = []
    for r in range(matrix.shape[0]):
        start, end = matrix.indptr[r], matrix.indptr[r + 1]
        if start == end:
            continue
        values, cols, extra = matrix.data[start:end], matrix.indices[start:end], payload[start:end]
        if len(values) > k:
            keep = _first_k(values, cols, k)
            values, cols, extra = values[keep], cols[keep], extra[keep]
        order = np.lexsort((cols, -values))
        n = len(order)
        out.append((np.full(n, row_offset + r), np.arange(1, n + 1), cols[order], extra[order],
                    values[order]))
    return out


def _first_k(values: np.ndarray, cols: np.ndarray, k: int) -> np.ndarray:
    """Positions of the first `k` entries by (value descending, column ascending), in no
    particular order: a partition finds the k-th value, and of the entries tied with it
    only the lowest columns are kept (a bare partition keeps an arbitrary subset)."""
    kth = np.partition(values, len(values) - k)[len(values) - k]
    above = np.flatnonzero(values > kth)
    tied = np.flatnonzero(values == kth)
    tied = tied[np.argsort(cols[tied], kind="stable")[: k - len(above)]]
    return np.concatenate([above, tied])


def cooccurrence_neighbours(graph: Graph, k: int = 20, block: int = 512) -> Neighbours:
    """For every item, its `k` strongest co-consumed items by cosine of user sets.

    Computed in blocks of items (`X[:, B]^T X`), so memory is bounded by a block's
    co-occurrence rows rather than the full item x item matrix.
    """
    by_item = graph.matrix.T.tocsr()
    norms = np.sqrt(np.maximum(graph.popularity, 1.0))
    parts: list[tuple[np.ndarray, ...]] = []
    for start in range(0, len(graph.items), block):
        stop = min(start + block, len(graph.items))
        counts = (by_item[start:stop] @ graph.matrix).tocoo()
        off_diagonal = counts.row + start != counts.col
        rows, cols = counts.row[off_diagonal], counts.col[off_diagonal]
        counts = sp.csr_matrix((counts.data[off_diagonal], (rows, cols)),
                               shape=(stop - start, len(graph.items)))
        counts.sort_indices()
        row_of_entry = np.repeat(np.arange(stop - start), np.diff(counts.indptr))
        cosine = counts.data.astype(np.float64) / (norms[row_of_entry + start] * norms[counts.indices])
        strength = sp.csr_matrix((cosine, counts.indices, counts.indptr), shape=counts.shape)
        parts.extend(_top_k_rows(strength, k, start, payload=counts.data))
    return _stack(parts)


def transition_neighbours(graph: Graph, k: int = 20) -> Neighbours:
    """For every item, the `k` items most often consumed right after it; strength is the
    share of that item's next-steps."""
    totals = np.asarray(graph.transitions.sum(axis=1)).ravel()
    parts = _top_k_rows(graph.transitions, k, 0)
    # strength = share of the item's next-steps
    parts = [(i, r, c, counts, counts / totals[i]) for i, r, c, counts, _ in parts]
    return _stack(parts)


def embedding_neighbours(vectors: np.ndarray, k: int = 20, block: int = 2048) -> Neighbours:
    """Top-k cosine neighbours of L2-normalised vectors, blocked."""
    parts = []
    for start in range(0, len(vectors), block):
        sims = vectors[start : start + block] @ vectors.T
        for local in range(len(sims)):
            sims[local, start + local] = -np.inf
        take = min(k, vectors.shape[0] - 1)
        if take <= 0:
            break
        top = np.argpartition(-sims, take - 1, axis=1)[:, :take]
        for local, cols in enumerate(top):
            values = sims[local, cols]
            order = np.lexsort((cols, -values))
            item = start + local
            parts.append((np.full(take, item), np.arange(1, take + 1), cols[order],
                          np.zeros(take), values[order]))
    return _stack(parts)


def _stack(parts: list[tuple[np.ndarray, ...]]) -> Neighbours:
    if not parts:
        empty = np.zeros(0)
        return Neighbours(empty.astype(int), empty.astype(int), empty.astype(int), empty, empty)
    columns = [np.concatenate(column) for column in zip(*parts)]
    return Neighbours(
        columns[0].astype(np.int64),
        columns[1].astype(np.int64),
        columns[2].astype(np.int64),
        columns[3].astype(np.float64),
        columns[4].astype(np.float64),
    )
