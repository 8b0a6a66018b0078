"""The non-LLM `cst` rankers: candidates scored from the same evidence the LLM reads.

They tell how much signal the evidence carries before any model reasons over it. `cst`
scores with the ranker learned for the store (`starrec.cst.learned`: LightGBM over the
evidence features, fitted on the split before the store's) where the store holds one;
`cst-manual`, and `cst` on a store without a learned ranker, score a weighted sum of the
evidence features, each scaled to a comparable range within the task, with the weights
of the config (`cst.weight_*`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from starrec.config import CandidateOrder, CSTConfig
from starrec.core import FitData, Recommender, Task
from starrec.cst.evidence import TaskEvidence, task_evidence_many
from starrec.cst.features import evidence_features
from starrec.cst.learned import LearnedRanker, read_ranker
from starrec.cst.store import EvidenceStore, ensure_store


def _scaled(values: np.ndarray) -> np.ndarray:
    top = values.max()
    return values / top if top > 0 else values


def manual_scores(config: CSTConfig, evidence: TaskEvidence) -> np.ndarray:
    """The hand-set weighted sum over a task's evidence (a missing content similarity
    counts as 0)."""
    c = config
    content = evidence.column("content_similarity")
    return (
        c.weight_cooccurrence * _scaled(evidence.column("cooc_score"))
        + c.weight_transition * _scaled(evidence.column("transition_count"))
        + c.weight_similar_users * _scaled(evidence.column("user_votes"))
        + c.weight_popularity * evidence.column("pop_pct") / 100
        + c.weight_content * np.where(np.isnan(content), 0.0, content)
    )


class CSTRanker(Recommender):
    """`learned`: use the store's learned ranker when it holds one (None: when the config
    says `ranker: learned`); False: the hand-set weights always."""

    name = "cst"

    def __init__(self, config: CSTConfig | None = None, dataset: str = "dataset",
                 progress: bool = True, learned: bool | None = None) -> None:
        self.config = config or CSTConfig()
        self.dataset = dataset
        self.progress = progress
        self.learned = self.config.ranker == "learned" if learned is None else learned
        self.model: LearnedRanker | None = None

    @classmethod
    def on_store(cls, store: EvidenceStore, config: CSTConfig | None = None,
                 learned: bool | None = None) -> CSTRanker:
        """A ranker over a store already built (all a fitted ranker holds); the weights
        of `config` (default: the store's own)."""
        ranker = cls(config or store.config, progress=False, learned=learned)
        ranker._bind(store)
        return ranker

    def _bind(self, store: EvidenceStore) -> None:
        self.store = store
        self.model = read_ranker(store) if self.learned else None

    @property
    def kind(self) -> str:
        """What orders the candidates: `learned` or `manual` weights."""
        return "learned" if self.model is not None else "manual"

    def fit(self, data: FitData) -> CSTRanker:
        """Build (or reuse) the store of the fit data. A learned ranker is fitted on the
        tasks of the split before, which fit data does not carry: it comes from
        `starrec.experiment.make_system('cst', ...)` (what `star eval` uses)."""
        if self.learned:
            raise ValueError("the learned cst ranker is fitted on the tasks of the split before "
                             "the store's; make it with starrec.experiment.make_system (star "
                             "eval does), or set cst.ranker=manual")
        path = ensure_store(data.interactions, data.items, self.config, dataset=self.dataset,
                            split=data.split, progress=self.progress)
        self._bind(EvidenceStore(path))
        return self

    def score(self, task: Task) -> np.ndarray:
        return self.score_many([task])[0]

    def score_many(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        """The scores of each task, as `score` gives them alone: the evidence of the batch
        computed together (`task_evidence_many`), a learned ranker's in one predict call."""
        if self.model is not None:
            evidence = task_evidence_many(self.store, tasks)
            return self.model.score_many([evidence_features(e) for e in evidence])
        # the hand-set weights read no latent model
        return [manual_scores(self.config, e)
                for e in task_evidence_many(self.store, tasks, latent=False)]


class ManualCSTRanker(CSTRanker):
    """`cst-manual`: the hand-set weights, whatever ranker the store holds."""

    name = "cst-manual"

    def __init__(self, config: CSTConfig | None = None, dataset: str = "dataset",
                 progress: bool = True, learned: bool | None = None) -> None:
        super().__init__(config, dataset, progress, learned=False)


def present(task: Task, store: EvidenceStore, order: CandidateOrder) -> Task:
    """The task as an LLM is shown it: its candidates in `order`, numbered in that order.
    A ranking of the result's candidate items is a ranking of the task's."""
    if order == "presented":
        return task
    if order != "cst":
        raise ValueError(f"unknown candidate order {order!r}; expected 'cst' or 'presented'")
    return replace(task, candidates=CSTRanker.on_store(store).rank(task))
