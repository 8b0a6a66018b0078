"""What a system is and what it answers: the protocols every recommender implements.

A `System` turns a `Task` into a `Recommendation`; a `Recommender` is the score-based
kind (the baselines and the `cst` ranker), fit once per split. They sit at the bottom of
the layers so that the packages implementing them (baselines, cst, agents, inference)
and the one running them (evaluation) depend on this module, not on each other.
`complete_ranking` is here for the same reason: it is the rule (DESIGN.md 3.4) by which
any system's answer becomes a full ranking, used by the student, the trajectory
filters and the evaluation alike.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import pandas as pd

from starrec.core.task import Task


@dataclass
class Recommendation:
    """A system's answer to one task. `ranking` holds item ids in the system's order as it
    produced them (possibly partial or malformed); None when nothing could be parsed.

    The other fields say how the answer came about, so that what an LLM adds to the order
    it was shown can be told from what a mask, a repair or a fallback did (DESIGN.md 3.4):
    `shown` the candidates in the order the system was shown them (None: the task file's);
    `well_formed` whether the output was complete and correct as the model wrote it, with
    no repair, re-ask or fallback (None for a non-generative system, which counts as well
    formed when valid); `repaired` whether a repair, re-ask, re-decode under a mask or a
    fallback completed it; `constrained` whether the ranking was decoded under a
    permutation mask; `generation_requests` the LLM generation requests it took."""

    ranking: list[str] | None
    fallback: bool = False  # the ranking is a fallback, not the system's own answer: invalid
    llm_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    shown: list[str] | None = None
    well_formed: bool | None = None
    repaired: bool = False
    constrained: bool = False
    generation_requests: int = 0


class System(Protocol):
    """Anything named that answers a task: a fitted `Recommender` (seen through
    `starrec.evaluation.runner.RecommenderSystem`), the teacher (`starrec.agents.system`),
    the student (`starrec.inference.system`)."""

    name: str

    def recommend(self, task: Task) -> Recommendation: ...


@dataclass
class FitData:
    """What a recommender may learn from: the split's allowed interactions and item texts."""

    interactions: pd.DataFrame
    items: pd.DataFrame
    split: str


class Recommender(ABC):
    """Scores candidates; higher is better. Ties keep presented order when ranked.

    A recommender is fit once per split on the interactions that split allows
    (`starrec.data.splits.fit_interactions`), then scores each task's candidates from the
    task's own history, so scenario variants (shortened histories) are honoured."""

    name: ClassVar[str]

    @abstractmethod
    def fit(self, data: FitData) -> Recommender:
        ...

    @abstractmethod
    def score(self, task: Task) -> np.ndarray:
        """One float per candidate, in presented order."""

    def rank(self, task: Task) -> list[str]:
        scores = np.asarray(self.score(task), dtype=float)
        if scores.shape != (len(task.candidates),):
            raise ValueError(f"{self.name}: expected {len(task.candidates)} scores, got {scores.shape}")
        return ranked(task.candidates, scores)


def score_order(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Positions by descending score; ties keep the order given (DESIGN.md 7). The one
    rule every ranker, the service and the benchmarks turn scores into a ranking by."""
    return np.argsort(-np.asarray(scores, dtype=float), kind="stable")


def ranked(candidates: Sequence[str], scores: Sequence[float] | np.ndarray) -> list[str]:
    """`candidates` best first by `scores` (`score_order`)."""
    return [candidates[i] for i in score_order(scores)]


def target_rank(candidates: Sequence[str], target: str,
                scores: Sequence[float] | np.ndarray) -> int:
    """1-based rank of `target` when `scores` order `candidates` (`score_order`)."""
    return ranked(candidates, scores).index(target) + 1


@dataclass(frozen=True)
class CompletedRanking:
    ranking: list[str]
    valid: bool


def complete_ranking(output: Sequence[str] | None, candidates: Sequence[str]) -> CompletedRanking:
    """Candidates the system ranked, in its order (first mention wins), then the rest in
    presented order. Valid only if the output was exactly a permutation of the candidates."""
    if output is None:
        return CompletedRanking(list(candidates), valid=False)
    allowed = set(candidates)
    ranked: list[str] = []
    seen: set[str] = set()
    for item in output:
        if item in allowed and item not in seen:
            seen.add(item)
            ranked.append(item)
    valid = len(output) == len(candidates) and len(ranked) == len(candidates)
    ranked.extend(c for c in candidates if c not in seen)
    return CompletedRanking(ranked, valid)
