"""Signals that depend on a task: how each candidate links to the user's history.

Computed from the store's graph (and its latent models) for the task's own history, so
a shortened scenario history gets evidence for what it shows, and nothing of the user
beyond the store's cut;
recent popularity is counted in a window ending at the task's own cutoff time, so it
never includes what other users did after this task's target.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from starrec.core import Task
from starrec.cst.latent import FACTORS, SEQUENCE, LatentScores, task_latent_scores
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


def similar_users(store: EvidenceStore, history: list[str], exclude_user: str | None,
                  k: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the k users whose item sets are closest (cosine) to `history`, and their
    overlap counts; the task's own user is excluded."""
    graph = store.graph
    cols = graph.items.get_indexer(history)
    cols = np.unique(cols[cols >= 0])
    if len(cols) == 0:
        return np.zeros(0, dtype=int), np.zeros(0)
    overlap = np.asarray(graph.matrix[:, cols].sum(axis=1)).ravel()
    degree = np.asarray(graph.matrix.getnnz(axis=1)).ravel()
    score = overlap / np.sqrt(np.maximum(degree, 1) * len(cols))
    own = graph.users.get_indexer([exclude_user])[0] if exclude_user is not None else -1
    candidates = np.flatnonzero(overlap > 0)
    candidates = candidates[candidates != own]
    if len(candidates) == 0:
        return np.zeros(0, dtype=int), np.zeros(0)
    top = candidates[np.lexsort((candidates, -score[candidates]))][:k]
    return top, overlap[top]


def candidate_evidence(store: EvidenceStore, task: Task) -> list[CandidateEvidence]:
    """One record per candidate, in presented order."""
    config = store.config
    graph = store.graph
    cand = graph.items.get_indexer(task.candidates)
    hist_all = graph.items.get_indexer(task.history)
    hist = np.unique(hist_all[hist_all >= 0])
    popularity = graph.popularity
    norms = np.sqrt(np.maximum(popularity, 1.0))
    by_item = store.item_users
    known = cand >= 0
    safe = np.where(known, cand, 0)

    co = np.zeros((len(cand), len(hist)))
    if len(hist):
        co = (by_item[safe] @ by_item[hist].T).toarray()
        co[~known] = 0
    cosine = co / (norms[safe][:, None] * norms[hist][None, :]) if len(hist) else co

    recent = [c for c in hist_all[::-1] if c >= 0][: config.recent_items]
    trans = (graph.transitions[recent][:, safe].toarray() if recent else np.zeros((0, len(cand))))
    trans[:, ~known] = 0
    next_totals = np.asarray(graph.transitions.sum(axis=1)).ravel()

    neighbours, _ = similar_users(store, task.history, task.user_id, config.similar_users)
    votes = (np.asarray(graph.matrix[neighbours][:, safe].sum(axis=0)).ravel()
             if len(neighbours) else np.zeros(len(cand)))
    votes[~known] = 0

    recent_pct = store.recent_percentiles(task.cutoff_time)

    vectors = store.embeddings
    content = None
    if vectors is not None and len(hist):
        content = vectors[safe] @ vectors[hist].T

    latent = task_latent_scores(store, task)
    records = []
    for j, item in enumerate(task.candidates):
        stats = store.items.loc[item] if item in store.items.index else None
        best = int(np.argmax(cosine[j])) if len(hist) and co[j].max() > 0 else None
        t_best = int(np.argmax(trans[:, j])) if len(recent) and trans[:, j].max() > 0 else None
        c_best = int(np.argmax(content[j])) if content is not None and known[j] else None
        records.append(
            CandidateEvidence(
                item=item,
                title=store.title(item),
                known=bool(known[j] and popularity[cand[j]] > 0),
                cooc_score=float(cosine[j].sum()) if len(hist) else 0.0,
                cooc_linked=int((co[j] > 0).sum()),
                cooc_best_item=graph.items[hist[best]] if best is not None else None,
                cooc_best_count=int(co[j, best]) if best is not None else 0,
                cooc_best_base=int(popularity[hist[best]]) if best is not None else 0,
                transition_count=int(trans[:, j].sum()),
                transition_best_item=graph.items[recent[t_best]] if t_best is not None else None,
                transition_best_count=int(trans[t_best, j]) if t_best is not None else 0,
                transition_best_total=int(next_totals[recent[t_best]]) if t_best is not None else 0,
                user_votes=int(votes[j]),
                similar_users=len(neighbours),
                pop=int(stats["pop"]) if stats is not None else 0,
                pop_pct=float(stats["pop_pct"]) if stats is not None else 0.0,
                recent_pct=float(recent_pct[cand[j]]) if known[j] else 0.0,
                content_best_item=graph.items[hist[c_best]] if c_best is not None else None,
                content_similarity=float(content[j, c_best]) if c_best is not None else None,
                **_latent_fields("sequence", latent.get(SEQUENCE), j, share=True),
                **_latent_fields("factor", latent.get(FACTORS), j),
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
