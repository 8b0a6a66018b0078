"""Score-based recommenders by name, built from their config section."""

from __future__ import annotations

from starrec.config import StarConfig
from starrec.core import Recommender

BASELINES = ("random", "presented", "pop", "itemknn", "als", "sasrec")
# cst: the learned evidence ranker (needs a task set: `starrec.experiment.make_system`);
# cst-manual: the same evidence under the hand-set weights
CST_RANKERS = ("cst", "cst-manual")
RANKERS = (*BASELINES, *CST_RANKERS)


def make_recommender(name: str, config: StarConfig | None = None, dataset: str = "dataset") -> Recommender:
    """Imports are per name: torch (sasrec) and transformers (cst content signals) cost
    seconds of start-up that the other rankers never need."""
    config = config or StarConfig()
    b = config.baselines
    if name == "random":
        from starrec.baselines.simple import RandomRecommender

        return RandomRecommender(**b.random.model_dump())
    if name == "presented":
        from starrec.baselines.simple import PresentedOrder

        return PresentedOrder()
    if name == "pop":
        from starrec.baselines.simple import PopularityRecommender

        return PopularityRecommender()
    if name == "itemknn":
        from starrec.baselines.itemknn import ItemKNN

        return ItemKNN(**b.itemknn.model_dump())
    if name == "als":
        from starrec.latent.als import ALS

        return ALS(**b.als.model_dump())
    if name == "sasrec":
        from starrec.latent.sasrec import SASRec

        return SASRec(**b.sasrec.model_dump())
    if name == "cst":
        from starrec.cst.ranker import CSTRanker

        return CSTRanker(config.cst, dataset=dataset)
    if name == "cst-manual":
        from starrec.cst.ranker import ManualCSTRanker

        return ManualCSTRanker(config.cst, dataset=dataset)
    raise ValueError(f"unknown system {name!r}; expected one of {list(RANKERS)}")
