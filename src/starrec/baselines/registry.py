"""Baselines by name, built from their config section."""

from __future__ import annotations

from collections.abc import Callable

from starrec.baselines.base import Recommender
from starrec.config import BaselinesConfig


def _sasrec(config: BaselinesConfig) -> Recommender:
    # imported lazily: torch costs seconds of start-up that the other baselines never need
    from starrec.baselines.sasrec import SASRec

    return SASRec(**config.sasrec.model_dump())


def _factories() -> dict[str, Callable[[BaselinesConfig], Recommender]]:
    from starrec.baselines.als import ALS
    from starrec.baselines.itemknn import ItemKNN
    from starrec.baselines.simple import PopularityRecommender, RandomRecommender

    return {
        "random": lambda c: RandomRecommender(**c.random.model_dump()),
        "pop": lambda c: PopularityRecommender(),
        "itemknn": lambda c: ItemKNN(**c.itemknn.model_dump()),
        "als": lambda c: ALS(**c.als.model_dump()),
        "sasrec": _sasrec,
    }


BASELINES = ("random", "pop", "itemknn", "als", "sasrec")


def make_recommender(name: str, config: BaselinesConfig | None = None) -> Recommender:
    factories = _factories()
    if name not in factories:
        raise ValueError(f"unknown baseline {name!r}; expected one of {sorted(factories)}")
    return factories[name](config or BaselinesConfig())
