import math

import numpy as np
import pytest

from starrec.evaluation.metrics import bootstrap_ci, complete_ranking, per_task_metrics, summarize

CANDS = ["a", "b", "c", "d", "e", "f"]


def test_hand_computed_metrics():
    m = per_task_metrics(3)
    assert (m["HR@1"], m["HR@3"], m["HR@5"]) == (0.0, 1.0, 1.0)
    assert m["AvgHR"] == pytest.approx(2 / 3)
    assert m["NDCG@5"] == pytest.approx(1 / math.log2(4)) == m["NDCG@10"]
    assert m["MRR"] == pytest.approx(1 / 3)
    far = per_task_metrics(7)
    assert far["AvgHR"] == 0 and far["NDCG@5"] == 0 and far["NDCG@10"] == pytest.approx(1 / 3)


def test_summary_is_x100_means():
    means, ci = summarize([1, 2, 6, 20], [True, True, False, True], n_resamples=200)
    assert means["HR@1"] == 25.0
    assert means["HR@3"] == 50.0
    assert means["AvgHR"] == pytest.approx(100 * (1 + 2 / 3 + 0 + 0) / 4, abs=0.01)
    assert means["MRR"] == pytest.approx(100 * (1 + 0.5 + 1 / 6 + 0.05) / 4, abs=0.01)
    assert means["valid_rate"] == 75.0
    assert ci["HR@1"][0] <= 25.0 <= ci["HR@1"][1]


def test_complete_permutation_is_valid():
    out = complete_ranking(["f", "e", "d", "c", "b", "a"], CANDS)
    assert out.valid and out.ranking == ["f", "e", "d", "c", "b", "a"]


def test_partial_output_is_completed_in_presented_order():
    out = complete_ranking(["d", "b"], CANDS)
    assert not out.valid
    assert out.ranking == ["d", "b", "a", "c", "e", "f"]


def test_duplicates_and_foreign_items_are_dropped_and_invalid():
    out = complete_ranking(["c", "c", "zz", "a", "b", "d", "e", "f"], CANDS)
    assert not out.valid
    assert out.ranking == ["c", "a", "b", "d", "e", "f"]
    # right length but one duplicate replacing an item is still invalid
    assert not complete_ranking(["a", "a", "b", "c", "d", "e"], CANDS).valid


def test_unparsable_output_keeps_presented_order():
    out = complete_ranking(None, CANDS)
    assert not out.valid and out.ranking == CANDS


def test_bootstrap_interval_brackets_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = rng.random(50) < 0.3
    large = rng.random(5000) < 0.3
    lo_s, hi_s = bootstrap_ci(small)
    lo_l, hi_l = bootstrap_ci(large)
    assert lo_s <= small.mean() <= hi_s
    assert lo_l <= large.mean() <= hi_l
    assert hi_l - lo_l < hi_s - lo_s
