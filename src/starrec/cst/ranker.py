"""The non-LLM `cst` ranker: candidates scored from the same evidence the LLM reads.

It tells how much signal the evidence carries before any model reasons over it. The
score is a weighted sum of the evidence features, each scaled to a comparable range
within the task; the weights are config values (`cst.weight_*`).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from starrec.config import CandidateOrder, CSTConfig
from starrec.core import FitData, Recommender, Task
from starrec.cst.evidence import candidate_evidence
from starrec.cst.store import EvidenceStore, ensure_store


def _scaled(values: np.ndarray) -> np.ndarray:
    top = values.max()
    return values / top if top > 0 else values


class CSTRanker(Recommender):
    name = "cst"

    def __init__(self, config: CSTConfig | None = None, dataset: str = "dataset",
                 progress: bool = True) -> None:
        self.config = config or CSTConfig()
        self.dataset = dataset
        self.progress = progress

    @classmethod
    def on_store(cls, store: EvidenceStore) -> CSTRanker:
        """A ranker over a store already built (all a fitted ranker holds)."""
        ranker = cls(store.config, progress=False)
        ranker.store = store
        return ranker

    def fit(self, data: FitData) -> CSTRanker:
        path = ensure_store(data.interactions, data.items, self.config, dataset=self.dataset,
                            split=data.split, progress=self.progress)
        self.store = EvidenceStore(path)
        return self

    def score(self, task: Task) -> np.ndarray:
        c = self.config
        evidence = candidate_evidence(self.store, task)
        feature = lambda name: np.array([getattr(e, name) or 0.0 for e in evidence], dtype=float)
        return (
            c.weight_cooccurrence * _scaled(feature("cooc_score"))
            + c.weight_transition * _scaled(feature("transition_count"))
            + c.weight_similar_users * _scaled(feature("user_votes"))
            + c.weight_popularity * feature("pop_pct") / 100
            + c.weight_content * feature("content_similarity")
        )


def present(task: Task, store: EvidenceStore, order: CandidateOrder) -> Task:
    """The task as an LLM is shown it: its candidates in `order`, numbered in that order.
    A ranking of the result's candidate items is a ranking of the task's."""
    if order == "presented":
        return task
    if order != "cst":
        raise ValueError(f"unknown candidate order {order!r}; expected 'cst' or 'presented'")
    return replace(task, candidates=CSTRanker.on_store(store).rank(task))
