"""Signals that depend on a task: how each candidate links to the user's history.

Computed from the store's graph (and its latent models) for the task's own history, so
a shortened scenario history gets evidence for what it shows, and nothing of the user
beyond the store's cut;
recent popularity is counted in a window ending at the task's own cutoff time, so it
never includes what other users did after this task's target.

A task's evidence is computed as arrays over its candidates (`TaskEvidence`), for a
batch of tasks at once (`task_evidence_many`): the rankers score those arrays, and
`candidate_evidence` writes them out as the records an LLM reads. What every task would
otherwise recompute or look up through pandas (id positions, popularity, next-step
totals) is read once per store (`StoreArrays`).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import cache
from itertools import repeat

import numpy as np
import scipy.sparse as sp

from starrec.core import Task
from starrec.cst.latent import FACTORS, SEQUENCE, LatentScores, latent_scores_many
from starrec.cst.store import EvidenceStore


@dataclass
class CandidateEvidence:
    """Everything CST knows that links one candidate to one history."""

    item: str
    title: str
    known: bool  # the item has interactions in the store
    cooc_score: float  # sum over history items of cosine(candidate, item)
    cooc_linked: int  # history items co-consumed with it by at least one user
    cooc_best_item: str | None
    cooc_best_count: int  # users who consumed both it and cooc_best_item
    cooc_best_base: int  # users who consumed cooc_best_item
    transition_count: int  # times it was consumed right after one of the recent items
    transition_best_item: str | None
    transition_best_count: int
    transition_best_total: int  # next-steps recorded after transition_best_item
    user_votes: int  # of the most similar users, how many consumed it
    similar_users: int  # how many similar users were considered
    pop: int
    pop_pct: float
    recent_pct: float  # percentile of popularity just before the task's cutoff time
    content_best_item: str | None
    content_similarity: float | None
    # latent models (`starrec.cst.latent`): rank among the candidates the model scores
    # (1 = first; None where it cannot score this one, or the store has no such model)
    sequence_rank: int | None = None
    sequence_score: float | None = None  # SASRec's logit for the user's next item
    sequence_share: float | None = None  # its softmax share among the scored candidates
    sequence_of: int = 0  # candidates SASRec scored
    factor_rank: int | None = None
    factor_score: float | None = None  # ALS's predicted preference
    factor_of: int = 0  # candidates ALS scored

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class StoreArrays:
    """What the evidence of every task reads of one store, computed once per store
    (`EvidenceStore.arrays`). Positions are dicts because a task looks up a few hundred
    ids, for which pandas' indexers cost far more than the arithmetic that follows."""

    item_ids: list[str]  # store order, the graph's columns
    titles: list[str]
    items: dict[str, int]  # item id -> column
    users: dict[str, int]  # user id -> the graph's row
    by_item: sp.csr_matrix  # items x users, 1.0 where consumed
    transitions: sp.csr_matrix  # items x items, "row item, then column item" counts
    popularity: np.ndarray  # users per item (float64)
    norms: np.ndarray  # sqrt of popularity (at least 1): the cosine's denominators
    next_totals: np.ndarray  # next-steps recorded after each item
    degree: np.ndarray  # items per user
    pop: np.ndarray  # the store's item table, in store order
    pop_pct: np.ndarray
    vectors: np.ndarray | None  # content embeddings, store order

    @classmethod
    def of(cls, store: EvidenceStore) -> StoreArrays:
        graph = store.graph  # its items are the store's, in the same order (checked there)
        popularity = graph.popularity
        return cls(
            item_ids=graph.items.tolist(),
            titles=[str(t) for t in store.items["title"]],
            items={item: i for i, item in enumerate(graph.items)},
            users={user: i for i, user in enumerate(graph.users)},
            by_item=store.item_users,
            transitions=_canonical(graph.transitions),
            popularity=popularity,
            norms=np.sqrt(np.maximum(popularity, 1.0)),
            next_totals=np.asarray(graph.transitions.sum(axis=1)).ravel(),
            degree=np.asarray(graph.matrix.getnnz(axis=1)).ravel(),
            pop=store.items["pop"].to_numpy(dtype=np.int64),
            pop_pct=store.items["pop_pct"].to_numpy(dtype=np.float64),
            vectors=store.embeddings,
        )

    def columns(self, items: Sequence[str]) -> np.ndarray:
        """The column of each item, -1 for one outside the store."""
        return np.fromiter(map(self.items.get, items, repeat(-1)), dtype=np.int64,
                           count=len(items))

    def title(self, item: str, column: int) -> str:
        """`EvidenceStore.title` for an item at `column` (-1: outside the store)."""
        return self.titles[column] if column >= 0 else f"item {item}"

    def overlaps(self, histories: Sequence[np.ndarray]) -> sp.csr_matrix:
        """(histories x users): how many of each history's items each user consumed;
        one sparse product for a batch, reading only the histories' rows."""
        indicator = _indicator([len(h) for h in histories], histories, self.by_item.shape[0])
        return indicator @ self.by_item

    def nearest_users(self, overlaps: sp.csr_matrix, row: int, n_history: int, exclude: int,
                      k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k users closest (cosine of item sets) to a history of `n_history` distinct
        items, given its `row` of `overlaps`, and their overlaps; user `exclude` left out.
        Ties go to the lower row."""
        entries = slice(overlaps.indptr[row], overlaps.indptr[row + 1])
        users, counts = overlaps.indices[entries], overlaps.data[entries]
        keep = (counts > 0) & (users != exclude)
        users, counts = users[keep].astype(np.int64), counts[keep]
        if len(users) == 0:
            return np.zeros(0, dtype=int), np.zeros(0)
        score = counts / np.sqrt(np.maximum(self.degree[users], 1) * n_history)
        top = np.lexsort((users, -score))[:k]
        return users[top], counts[top]


def _canonical(matrix: sp.csr_matrix) -> sp.csr_matrix:
    """`matrix` with each row's columns sorted and distinct (a copy where it is not)."""
    if matrix.has_canonical_format:
        return matrix
    matrix = matrix.copy()
    matrix.sum_duplicates()
    return matrix


def similar_users(store: EvidenceStore, history: list[str], exclude_user: str | None,
                  k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the k users whose item sets are closest (cosine) to `history`, and their
    overlap counts; the task's own user is excluded."""
    arrays = store.arrays
    hist = _distinct_known(arrays.columns(history))
    if len(hist) == 0:
        return np.zeros(0, dtype=int), np.zeros(0)
    own = arrays.users.get(exclude_user, -1) if exclude_user is not None else -1
    return arrays.nearest_users(arrays.overlaps([hist]), 0, len(hist), own, k)


def _distinct_known(columns: np.ndarray) -> np.ndarray:
    return np.unique(columns[columns >= 0])


@dataclass
class TaskEvidence:
    """One task's evidence as arrays over its candidates, in presented order: what the
    rankers score and what `candidate_evidence` writes out. A `*_best` array holds the
    position of the best-linked item in `hist` (co-consumption, content) or `recent`
    (transitions), -1 where there is none."""

    candidates: list[str]
    columns: np.ndarray  # store column of each candidate, -1 outside the store
    hist: np.ndarray  # the history's distinct store columns, ascending
    recent: np.ndarray  # the newest known history items' columns, newest first
    n_history: int  # history items as the task lists them
    known: np.ndarray  # bool: in the store, with interactions
    cooc_score: np.ndarray
    cooc_linked: np.ndarray
    cooc_best: np.ndarray
    cooc_best_count: np.ndarray
    cooc_best_base: np.ndarray
    transition_count: np.ndarray
    transition_best: np.ndarray
    transition_best_count: np.ndarray
    transition_best_total: np.ndarray
    user_votes: np.ndarray
    similar_users: int
    pop: np.ndarray
    pop_pct: np.ndarray
    recent_pct: np.ndarray
    content_best: np.ndarray
    content_similarity: np.ndarray  # NaN where there is none
    latent: dict[str, LatentScores]

    def column(self, name: str) -> np.ndarray:
        """A `CandidateEvidence` field of every candidate as float64, NaN where the
        record holds None: the evidence as the learned ranker reads it."""
        for prefix, kind in (("sequence_", SEQUENCE), ("factor_", FACTORS)):
            if name.startswith(prefix):
                scores = self.latent.get(kind)
                if scores is None:
                    return np.full(len(self.candidates), np.nan)
                values = {"rank": scores.ranks, "score": scores.scores,
                          "share": scores.shares}[name.removeprefix(prefix)]
                return np.where(scores.ranks > 0, values, np.nan).astype(np.float64)
        if name == "similar_users":
            return np.full(len(self.candidates), float(self.similar_users))
        return np.asarray(getattr(self, name), dtype=np.float64)


@dataclass
class _Placed:
    """A task's ids placed in the store."""

    columns: np.ndarray  # of the candidates, -1 outside the store
    known: np.ndarray  # the candidate is in the store
    safe: np.ndarray  # columns, 0 for a candidate outside the store
    hist: np.ndarray  # the history's distinct columns, ascending
    recent: np.ndarray  # the newest known history items' columns, newest first
    own: int  # the task user's row, -1 if none


def _place(arrays: StoreArrays, task: Task, recent_items: int) -> _Placed:
    columns = arrays.columns(task.candidates)
    history = arrays.columns(task.history)
    known = columns >= 0
    newest_first = history[::-1]
    own = arrays.users.get(task.user_id, -1) if task.user_id is not None else -1
    return _Placed(columns, known, np.where(known, columns, 0), _distinct_known(history),
                   newest_first[newest_first >= 0][:recent_items], own)


# tasks computed together: bounds the memory of a batch's products when many tasks are
# scored at once (a ranker's fit)
BATCH_TASKS = 64


def task_evidence(store: EvidenceStore, task: Task) -> TaskEvidence:
    return task_evidence_many(store, [task])[0]


def task_evidence_many(store: EvidenceStore, tasks: Sequence[Task],
                       latent: bool = True) -> list[TaskEvidence]:
    """The evidence of each task, each exactly as for that task alone; each sparse
    product (users' overlaps with the histories, votes, co-consumption, transitions)
    is one call for a batch. `latent` False leaves the latent models out (a reader that
    does not use them is spared their cost)."""
    return [evidence for start in range(0, len(tasks), BATCH_TASKS)
            for evidence in _batch_evidence(store, tasks[start:start + BATCH_TASKS], latent)]


def _batch_evidence(store: EvidenceStore, tasks: Sequence[Task],
                    latent: bool) -> list[TaskEvidence]:
    if not tasks:
        return []
    arrays, config = store.arrays, store.config
    placed = [_place(arrays, task, config.recent_items) for task in tasks]
    candidate_users = arrays.by_item[np.concatenate([p.safe for p in placed])]
    n_similar, votes = _similar_user_votes(arrays, placed, candidate_users,
                                           config.similar_users)
    cooccurrence = _cooccurrence(arrays, placed, candidate_users)
    transitions = _transitions(arrays, placed)
    content = _content(arrays.vectors, placed)
    scores = latent_scores_many(store, tasks) if latent else {}
    return [_evidence(store, arrays, task, p, cooccurrence[b], transitions[b], votes[b],
                      n_similar[b], content[b], {k: v[b] for k, v in scores.items()})
            for b, (task, p) in enumerate(zip(tasks, placed))]


def _offsets(sizes: Sequence[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def _indicator(sizes: Sequence[int], columns: Sequence[np.ndarray], width: int) -> sp.csr_matrix:
    """A 0/1 matrix with a row per entry of `sizes`, holding 1 at that row's `columns`
    (distinct within a row)."""
    indptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    indices = np.concatenate(columns) if len(columns) else np.zeros(0, dtype=np.int64)
    return sp.csr_matrix((np.ones(len(indices), dtype=np.float32), indices, indptr),
                         shape=(len(sizes), width))


def _among(keys: np.ndarray, sorted_keys: np.ndarray) -> np.ndarray:
    """Whether each of `keys` is one of `sorted_keys` (ascending)."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[at] == keys


def _values(matrix: sp.csr_matrix, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """matrix[rows[i], cols[i]] for every i, read from a canonical CSR's arrays (each
    row's columns sorted and distinct): for a few rows, cheaper than sparse indexing."""
    n_columns = matrix.shape[1]
    unique, inverse = np.unique(rows, return_inverse=True)
    starts = matrix.indptr[unique].astype(np.int64)
    lengths = matrix.indptr[unique + 1] - starts
    take = np.repeat(starts - _offsets(lengths), lengths) + np.arange(lengths.sum())
    keys = np.repeat(np.arange(len(unique), dtype=np.int64), lengths) * n_columns \
        + matrix.indices[take]  # ascending: by row, then by column
    wanted = inverse.astype(np.int64) * n_columns + cols
    values = np.zeros(len(wanted), dtype=matrix.dtype)
    if len(keys):
        at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        found = keys[at] == wanted
        values[found] = matrix.data[take[at[found]]]
    return values


def _similar_user_votes(arrays: StoreArrays, placed: Sequence[_Placed],
                        candidate_users: sp.csr_matrix,
                        k: int) -> tuple[list[int], list[np.ndarray]]:
    """Per task, how many similar users it has and how many of them consumed each
    candidate."""
    overlaps = arrays.overlaps([p.hist for p in placed])
    neighbours = [arrays.nearest_users(overlaps, b, len(p.hist), p.own, k)[0]
                  if len(p.hist) else np.zeros(0, dtype=np.int64) for b, p in enumerate(placed)]
    # a vote is an entry (candidate, user) of candidate_users whose user is one of the
    # neighbours of the candidate's task: keyed task * users + user
    n_users = arrays.by_item.shape[1]
    chosen = np.concatenate([b * n_users + np.sort(n) for b, n in enumerate(neighbours)])
    n_candidates = [len(p.columns) for p in placed]
    task_of = np.repeat(np.arange(len(placed), dtype=np.int64), n_candidates)
    row = np.repeat(np.arange(len(task_of)), np.diff(candidate_users.indptr))
    voted = _among(task_of[row] * n_users + candidate_users.indices, chosen)
    votes = np.bincount(row[voted], minlength=len(task_of))
    return [len(n) for n in neighbours], np.split(votes, np.cumsum(n_candidates)[:-1])


def _cooccurrence(arrays: StoreArrays, placed: Sequence[_Placed],
                  candidate_users: sp.csr_matrix) -> list[np.ndarray]:
    """Per task, the users who consumed both each candidate and each history item
    (candidates x hist): one product of block-diagonal operands, so a batch costs what
    its tasks cost alone."""
    n_candidates = [len(p.columns) for p in placed]
    n_hist = [len(p.hist) for p in placed]
    n_users = arrays.by_item.shape[1]
    history_users = arrays.by_item[np.concatenate([p.hist for p in placed])]
    product = (_blocked(candidate_users, n_candidates, n_users)
               @ _blocked(history_users, n_hist, n_users).T).tocoo()
    return _diagonal_blocks(product, n_candidates, n_hist)


def _blocked(rows: sp.csr_matrix, sizes: Sequence[int], width: int) -> sp.csr_matrix:
    """`rows` (`width` columns) with its b-th block of `sizes[b]` rows moved to columns
    b * width + its own: the product of two such matrices pairs each block with the same
    block of the other only."""
    if len(sizes) == 1:
        return rows
    n_columns = len(sizes) * width
    # scipy keeps 32-bit indices where they fit; shifting in 64 bits would cost a copy
    dtype = (rows.indices.dtype.type if n_columns <= np.iinfo(rows.indices.dtype).max
             else np.int64)
    block = np.repeat(np.arange(len(sizes), dtype=dtype), sizes)
    shift = np.repeat(block * dtype(width), np.diff(rows.indptr))
    return sp.csr_matrix((rows.data, rows.indices.astype(dtype, copy=False) + shift,
                          rows.indptr), shape=(rows.shape[0], n_columns))


def _diagonal_blocks(entries: sp.coo_matrix, rows: Sequence[int],
                     cols: Sequence[int]) -> list[np.ndarray]:
    """The diagonal blocks (rows[b] x cols[b], C order) of a block-diagonal sparse
    matrix, dense."""
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    block = np.repeat(np.arange(len(rows)), rows)[entries.row]
    cells = rows * cols
    starts = _offsets(cells)
    flat = np.zeros(int(cells.sum()), dtype=entries.dtype)
    flat[starts[block] + (entries.row - _offsets(rows)[block]) * cols[block]
         + entries.col - _offsets(cols)[block]] = entries.data
    return [flat[starts[b]:starts[b] + cells[b]].reshape(rows[b], cols[b])
            for b in range(len(rows))]


def _transitions(arrays: StoreArrays, placed: Sequence[_Placed]) -> list[np.ndarray]:
    """Per task, how often each candidate was consumed right after each recent item
    (recent x candidates)."""
    rows = np.concatenate([np.repeat(p.recent, len(p.safe)) for p in placed])
    cols = np.concatenate([np.tile(p.safe, len(p.recent)) for p in placed])
    sizes = [len(p.recent) * len(p.safe) for p in placed]
    counts = np.split(_values(arrays.transitions, rows, cols), np.cumsum(sizes)[:-1])
    return [block.reshape(len(p.recent), len(p.safe)) for p, block in zip(placed, counts)]


# OpenBLAS's threads spin after each call; for the small products of one task that
# costs more CPU than the product, and one thread gives the same floats
_BLAS_LOCK = threading.Lock()


@cache
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _content(vectors: np.ndarray | None, placed: Sequence[_Placed]) -> list[np.ndarray | None]:
    """Per task, the content similarity of each candidate to each history item (None
    without vectors or history): the product of the task's own rows, since a float32
    product of other shapes rounds differently."""
    if vectors is None:
        return [None] * len(placed)
    with _BLAS_LOCK, _blas_controller().limit(limits=1, user_api="blas"):
        return [vectors[p.safe] @ vectors[p.hist].T if len(p.hist) else None for p in placed]


def _best(values: np.ndarray, linked: np.ndarray, axis: int) -> np.ndarray:
    """Per candidate, the position of its largest value along `axis` (the first of
    ties) where `linked`, else -1."""
    if values.shape[axis] == 0:
        return np.full(len(linked), -1, dtype=np.int64)
    return np.where(linked, np.argmax(values, axis=axis), -1)


def _at_best(values: np.ndarray, best: np.ndarray, axis: int) -> np.ndarray:
    """Per candidate j, its value at position best[j] along `axis` (0 where best is -1)."""
    if values.shape[axis] == 0:
        return np.zeros(len(best), dtype=values.dtype)
    j = np.arange(len(best))
    safe = np.maximum(best, 0)
    picked = values[j, safe] if axis == 1 else values[safe, j]
    return np.where(best >= 0, picked, 0)


def _of_best(per_item: np.ndarray, positions: np.ndarray, best: np.ndarray) -> np.ndarray:
    """Per candidate j, per_item of the item at positions[best[j]] (0 where best is -1)."""
    if len(positions) == 0:
        return np.zeros(len(best), dtype=per_item.dtype)
    return np.where(best >= 0, per_item[positions[np.maximum(best, 0)]], 0)


def _evidence(store: EvidenceStore, arrays: StoreArrays, task: Task, p: _Placed,
              co: np.ndarray, trans: np.ndarray, votes: np.ndarray, n_similar: int,
              content: np.ndarray | None, latent: dict[str, LatentScores]) -> TaskEvidence:
    """One task's evidence from its parts of the batch's products: co-consumption
    counts (candidates x hist), transition counts (recent x candidates), votes and
    content similarities (candidates x hist)."""
    known, safe, hist = p.known, p.safe, p.hist
    n = len(task.candidates)
    co[~known] = 0
    cosine = co / (arrays.norms[safe][:, None] * arrays.norms[hist][None, :])
    cooc_best = _best(cosine, co.max(axis=1, initial=0) > 0, axis=1)
    trans[:, ~known] = 0
    transition_best = _best(trans, trans.max(axis=0, initial=0) > 0, axis=0)
    content_best = np.full(n, -1, dtype=np.int64)
    content_similarity = np.full(n, np.nan)
    if content is not None:
        content_best = _best(content, known, axis=1)
        similarity = _at_best(content, content_best, axis=1).astype(np.float64)
        content_similarity = np.where(known, similarity, np.nan)
    recent_pct = store.recent_percentiles(task.cutoff_time)
    return TaskEvidence(
        candidates=list(task.candidates),
        columns=p.columns,
        hist=hist,
        recent=p.recent,
        n_history=len(task.history),
        known=known & (arrays.popularity[safe] > 0),
        cooc_score=cosine.sum(axis=1) if len(hist) else np.zeros(n),
        cooc_linked=(co > 0).sum(axis=1),
        cooc_best=cooc_best,
        cooc_best_count=_at_best(co, cooc_best, axis=1).astype(np.int64),
        cooc_best_base=_of_best(arrays.popularity, hist, cooc_best).astype(np.int64),
        transition_count=trans.sum(axis=0).astype(np.int64),
        transition_best=transition_best,
        transition_best_count=_at_best(trans, transition_best, axis=0).astype(np.int64),
        transition_best_total=_of_best(arrays.next_totals, p.recent,
                                       transition_best).astype(np.int64),
        user_votes=np.where(known, votes, 0).astype(np.int64),
        similar_users=n_similar,
        pop=np.where(known, arrays.pop[safe], 0),
        pop_pct=np.where(known, arrays.pop_pct[safe], 0.0),
        recent_pct=np.where(known, recent_pct[safe], 0.0),
        content_best=content_best,
        content_similarity=content_similarity,
        latent=latent,
    )


def candidate_evidence(store: EvidenceStore, task: Task) -> list[CandidateEvidence]:
    """One record per candidate, in presented order."""
    return evidence_records(store.arrays, task_evidence(store, task))


def evidence_records(arrays: StoreArrays, evidence: TaskEvidence) -> list[CandidateEvidence]:
    """The records of a task's evidence, with the ids and titles an LLM reads."""
    e = evidence
    ids = arrays.item_ids

    def item_at(positions: np.ndarray, best: int) -> str | None:
        return ids[positions[best]] if best >= 0 else None

    records = []
    for j, item in enumerate(e.candidates):
        records.append(
            CandidateEvidence(
                item=item,
                title=arrays.title(item, int(e.columns[j])),
                known=bool(e.known[j]),
                cooc_score=float(e.cooc_score[j]),
                cooc_linked=int(e.cooc_linked[j]),
                cooc_best_item=item_at(e.hist, e.cooc_best[j]),
                cooc_best_count=int(e.cooc_best_count[j]),
                cooc_best_base=int(e.cooc_best_base[j]),
                transition_count=int(e.transition_count[j]),
                transition_best_item=item_at(e.recent, e.transition_best[j]),
                transition_best_count=int(e.transition_best_count[j]),
                transition_best_total=int(e.transition_best_total[j]),
                user_votes=int(e.user_votes[j]),
                similar_users=e.similar_users,
                pop=int(e.pop[j]),
                pop_pct=float(e.pop_pct[j]),
                recent_pct=float(e.recent_pct[j]),
                content_best_item=item_at(e.hist, e.content_best[j]),
                content_similarity=(float(e.content_similarity[j]) if e.content_best[j] >= 0
                                    else None),
                **_latent_fields("sequence", e.latent.get(SEQUENCE), j, share=True),
                **_latent_fields("factor", e.latent.get(FACTORS), j),
            )
        )
    return records


def _latent_fields(prefix: str, scores: LatentScores | None, j: int,
                   share: bool = False) -> dict[str, object]:
    if scores is None:
        return {}
    fields: dict[str, object] = {f"{prefix}_of": scores.n_scored}
    if scores.ranks[j] > 0:
        fields[f"{prefix}_rank"] = int(scores.ranks[j])
        fields[f"{prefix}_score"] = float(scores.scores[j])
        if share:
            fields[f"{prefix}_share"] = float(scores.shares[j])
    return fields
