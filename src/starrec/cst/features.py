"""The evidence of a task as numbers: one row of features per candidate, for the learned
`cst` ranker (`starrec.cst.learned`).

Every feature is read from the same evidence an LLM reads as sentences (`TaskEvidence`,
written out as `CandidateEvidence` records), so the ranker measures the signal in the
evidence, nothing beside it. Raw values sit beside their within-task scalings, margins
and shares because a ranker over ranks alone cannot tell a clear first from a near tie.
A value the evidence does not have (no content vector, a candidate a latent model cannot
score) is NaN, which the ranker treats as missing rather than as zero. Each feature
belongs to one signal group, the unit of the drop-one-group ablation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from starrec.core import Task
from starrec.cst.evidence import TaskEvidence, task_evidence, task_evidence_many
from starrec.cst.store import EvidenceStore


@dataclass(frozen=True)
class Feature:
    name: str
    group: str


FEATURES: tuple[Feature, ...] = (
    Feature("cooc_score", "cooccurrence"),  # sum of cosines with the history's items
    Feature("cooc_scaled", "cooccurrence"),  # ... over the task's largest
    Feature("cooc_linked_share", "cooccurrence"),  # history items linked at all
    Feature("cooc_best_share", "cooccurrence"),  # share of the best-linked item's users
    Feature("transition_count", "transition"),
    Feature("transition_scaled", "transition"),
    Feature("transition_best_share", "transition"),
    Feature("user_votes_share", "similar_users"),
    Feature("user_votes_scaled", "similar_users"),
    Feature("pop_pct", "popularity"),
    Feature("recent_pct", "popularity"),
    Feature("log_pop", "popularity"),
    Feature("content_similarity", "content"),
    Feature("sequence_score", "sequence"),
    Feature("sequence_margin", "sequence"),  # its score minus the task's best
    Feature("sequence_share", "sequence"),
    Feature("sequence_rank", "sequence"),
    Feature("factor_score", "factors"),
    Feature("factor_margin", "factors"),
    Feature("factor_rank", "factors"),
    Feature("history_length", "context"),  # log of it: how much the evidence rests on
)
FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
GROUPS: tuple[str, ...] = tuple(dict.fromkeys(f.group for f in FEATURES))


def _scaled(values: np.ndarray) -> np.ndarray:
    top = np.nanmax(values) if len(values) else 0.0
    return values / top if top > 0 else np.zeros_like(values)


def _share(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros_like(numerator),
                     where=denominator > 0)


def evidence_features(evidence: TaskEvidence) -> np.ndarray:
    """(candidates x FEATURES) for one task's evidence, in presented order."""
    column = evidence.column
    n_history = evidence.n_history
    cooc, transitions = column("cooc_score"), column("transition_count")
    votes = column("user_votes")
    sequence, factor = column("sequence_score"), column("factor_score")
    values = {
        "cooc_score": cooc,
        "cooc_scaled": _scaled(cooc),
        "cooc_linked_share": column("cooc_linked") / max(n_history, 1),
        "cooc_best_share": _share(column("cooc_best_count"), column("cooc_best_base")),
        "transition_count": transitions,
        "transition_scaled": _scaled(transitions),
        "transition_best_share": _share(column("transition_best_count"),
                                        column("transition_best_total")),
        "user_votes_share": _share(votes, column("similar_users")),
        "user_votes_scaled": _scaled(votes),
        "pop_pct": column("pop_pct"),
        "recent_pct": column("recent_pct"),
        "log_pop": np.log1p(column("pop")),
        "content_similarity": column("content_similarity"),
        "sequence_score": sequence,
        "sequence_margin": _margin(sequence),
        "sequence_share": column("sequence_share"),
        "sequence_rank": column("sequence_rank"),
        "factor_score": factor,
        "factor_margin": _margin(factor),
        "factor_rank": column("factor_rank"),
        "history_length": np.full(len(evidence.candidates), np.log1p(n_history)),
    }
    return np.column_stack([values[name] for name in FEATURE_NAMES])


def _margin(scores: np.ndarray) -> np.ndarray:
    if np.isnan(scores).all():
        return scores
    return scores - np.nanmax(scores)


def task_features(store: EvidenceStore, task: Task) -> np.ndarray:
    """(candidates x FEATURES) of one task, computed from `store` for its own history."""
    return evidence_features(task_evidence(store, task))


def task_features_many(store: EvidenceStore, tasks: Sequence[Task]) -> list[np.ndarray]:
    """`task_features` of each task, the evidence of the batch computed together."""
    return [evidence_features(e) for e in task_evidence_many(store, tasks)]
