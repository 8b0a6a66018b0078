"""Latent CF models as evidence: what a sequence model (SASRec) and a latent-factor model
(ALS) make of each candidate for this user's next item.

Counts (co-consumption, transitions, similar users) miss what these models learn: the
order of a history, and taste shared through many weak links. Both are fitted when a
store is built, on exactly the interactions the store holds (so the model serving test
tasks never saw a test target, and the one serving train tasks nothing at or after a
train target: DESIGN.md 3.3), kept in the store as plain arrays, and asked per task with
the task's own history, as every other task-dependent signal is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from starrec.config import CSTConfig
from starrec.core import FitData, Recommender, Task, score_order
from starrec.latent.state import ModelState

if TYPE_CHECKING:
    from starrec.cst.store import EvidenceStore, Laps

log = logging.getLogger(__name__)

# the stored model kinds, by what the evidence calls them
SEQUENCE, FACTORS = "sasrec", "als"
LATENT_KINDS = (SEQUENCE, FACTORS)


def fit_latent_models(interactions: pd.DataFrame, item_ids: pd.Index, config: CSTConfig, *,
                      progress: bool = False, laps: Laps | None = None) -> list[ModelState]:
    """SASRec and ALS fitted on `interactions` (user, item, timestamp; each user's rows in
    sequence order) over the store's items `item_ids`, as plain states."""
    from starrec.latent.als import ALS
    from starrec.latent.sasrec import SASRec

    data = FitData(interactions, pd.DataFrame(index=pd.Index(item_ids, name="item")), "")
    sasrec = SASRec(**config.latent_sasrec.model_dump(), progress=progress).fit(data)
    if laps is not None:
        laps("latent: sasrec")
    als = ALS(**config.latent_als.model_dump()).fit(data)
    if laps is not None:
        laps("latent: als")
    return [sasrec.state(), als.state()]


def load_latent_models(states: dict[str, ModelState]) -> dict[str, Recommender]:
    """Scoring models rebuilt from their stored states, by kind."""
    models: dict[str, Recommender] = {}
    if SEQUENCE in states:
        from starrec.latent.sasrec import SASRec

        models[SEQUENCE] = SASRec.from_state(states[SEQUENCE])
    if FACTORS in states:
        from starrec.latent.als import ALS

        models[FACTORS] = ALS.from_state(states[FACTORS])
    return models


@dataclass
class LatentScores:
    """One model's view of one task's candidates, in presented order. A candidate the
    model cannot score (unknown to it, or a history with no item it knows) has a NaN
    score and rank 0; ranks (1 = first) and shares are among the scored ones."""

    scores: np.ndarray
    ranks: np.ndarray  # int
    shares: np.ndarray  # softmax of the scores among the scored candidates

    @property
    def n_scored(self) -> int:
        return int((self.ranks > 0).sum())


def latent_scores(model: Recommender, task: Task) -> LatentScores:
    return _latent_view(model, task, model.score(task))


def _raw_scores_many(model: Recommender, tasks: Sequence[Task]) -> list[np.ndarray]:
    """`model.score` of each task; in one call where the model scores a batch at once
    (SASRec encodes the histories in one forward pass, to the same floats)."""
    score_many = getattr(model, "score_many", None)
    if callable(score_many):
        return list(score_many(list(tasks)))
    return [model.score(task) for task in tasks]


def _latent_view(model: Recommender, task: Task, raw: np.ndarray) -> LatentScores:
    """The model's raw scores of the task's candidates as evidence."""
    from starrec.latent.sasrec import UNKNOWN_SCORE

    raw = np.asarray(raw, dtype=np.float64)
    scored = raw > UNKNOWN_SCORE / 2
    if not _knows_history(model, task):
        scored[:] = False  # an empty history scores every candidate alike: no evidence
    scores = np.where(scored, raw, np.nan)
    ranks = np.zeros(len(raw), dtype=np.int64)
    shares = np.full(len(raw), np.nan)
    if scored.any():
        index = np.flatnonzero(scored)
        order = index[score_order(raw[index])]  # ties keep presented order
        ranks[order] = np.arange(1, len(order) + 1)
        weights = np.exp(raw[index] - raw[index].max())
        shares[index] = weights / weights.sum()
    return LatentScores(scores, ranks, shares)


def _knows_history(model: Recommender, task: Task) -> bool:
    vocab = getattr(model, "vocab", None)
    if vocab is None:
        vocab = model.ui.item_index  # type: ignore[attr-defined]
    return any(item in vocab for item in task.history)


def latent_scores_many(store: EvidenceStore,
                       tasks: Sequence[Task]) -> dict[str, list[LatentScores]]:
    """Each stored model's scores of each task's candidates, by kind (empty for a store
    built without latent models); each model is asked once for the batch."""
    return {kind: [_latent_view(model, task, raw)
                   for task, raw in zip(tasks, _raw_scores_many(model, tasks))]
            for kind, model in store.latent_models.items()}
