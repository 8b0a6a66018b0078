"""The interface every score-based recommender implements.

A recommender is fit once per split on the interactions that split allows
(`starrec.data.splits.fit_interactions`), then scores each task's candidates from the
task's own history, so scenario variants (shortened histories) are honoured.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pandas as pd

from starrec.data.tasks import Task


@dataclass
class FitData:
    """What a recommender may learn from: the split's allowed interactions and item texts."""

    interactions: pd.DataFrame
    items: pd.DataFrame
    split: str


class Recommender(ABC):
    """Scores candidates; higher is better. Ties keep presented order when ranked."""

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
        order = np.argsort(-scores, kind="stable")
        return [task.candidates[i] for i in order]
