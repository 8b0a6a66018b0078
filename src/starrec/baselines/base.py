"""The interface every score-based recommender implements: `starrec.core.Recommender`.

It lives in `starrec.core` because the `cst` ranker implements it too, and the CST is a
layer below the baselines (whose registry builds the `cst` ranker by name); the names
stay importable from here.
"""

from starrec.core import FitData, Recommender  # noqa: F401
