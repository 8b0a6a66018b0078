import numpy as np
import pandas as pd
import pytest

from starrec.baselines.registry import BASELINES, make_recommender
from starrec.config import load_config
from starrec.core import FitData, Recommender
from starrec.data.schema import TableSource, build_dataset
from starrec.data.splits import target_mask
from starrec.data.tasks import Task, build_split_tasks
from starrec.evaluation.runner import evaluate_baseline

FAST = load_config(overrides=["baselines.sasrec.epochs=2", "baselines.als.iterations=3",
                              "eval.bootstrap_resamples=50"])


def two_cluster_dataset():
    """Users 0-19 consume items a0-a9, users 20-39 items b0-b9, in random order."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(40):
        prefix = "a" if u < 20 else "b"
        for k, i in enumerate(rng.permutation(10)[:7]):
            rows.append((f"u{u}", f"{prefix}{i}", k))
    inter = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    ids = [f"{p}{i}" for p in "ab" for i in range(10)] + [f"c{i}" for i in range(20)]
    items = pd.DataFrame({"item": ids, "title": ids})
    return build_dataset("clusters", inter, TableSource("i", 2), items, TableSource("t", 2))


def task(history, candidates, target=None):
    return Task("t", "u", "classic", history, candidates, target or candidates[0])


@pytest.mark.parametrize("name", ["itemknn", "als"])
def test_cf_baselines_prefer_the_users_cluster(name):
    dataset = two_cluster_dataset()
    model = make_recommender(name, load_config(overrides=["baselines.als.factors=2"]))
    model.fit(FitData(dataset.interactions, dataset.items, "test"))
    scores = model.score(task(["a1", "a2", "a3"], ["b4", "a5", "b6", "a7"]))
    assert min(scores[1], scores[3]) > max(scores[0], scores[2])


def test_pop_counts_users_in_the_fit_data():
    inter = pd.DataFrame({"user": ["1", "2", "3", "1"], "item": ["x", "x", "x", "y"]})
    model = make_recommender("pop").fit(FitData(inter, pd.DataFrame(index=["x", "y", "z"]), "test"))
    assert list(model.score(task([], ["z", "y", "x"]))) == [0, 1, 3]


def test_ties_keep_presented_order():
    class Flat(Recommender):
        name = "flat"

        def fit(self, data):
            return self

        def score(self, task):
            return np.array([0.0, 1.0, 0.0, 1.0])

    assert Flat().rank(task([], ["a", "b", "c", "d"])) == ["b", "d", "a", "c"]


def test_random_is_reproducible_per_task():
    model = make_recommender("random")
    t = task([], [str(i) for i in range(20)])
    assert model.rank(t) == model.rank(t)
    assert model.rank(t) != t.candidates


def test_unknown_baseline_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown system 'svd'"):
        make_recommender("svd")


@pytest.mark.parametrize("name", BASELINES)
def test_no_baseline_fit_contains_a_test_interaction(name, tiny, monkeypatch):
    """Spy on what each baseline is fit on when it serves test tasks."""
    seen: list[FitData] = []
    model = make_recommender(name, FAST)
    original = type(model).fit

    def spy(self, data):
        seen.append(data)
        return original(self, data)

    monkeypatch.setattr(type(model), "fit", spy)
    monkeypatch.setattr("starrec.baselines.registry.make_recommender", lambda *a, **k: model)
    tasks = build_split_tasks(tiny, "test")
    result, records = evaluate_baseline(name, tiny, tasks, FAST)
    assert len(seen) == 1 and result["n_tasks"] == len(tasks) == len(records)
    test_rows = tiny.interactions[target_mask(tiny, "test")]
    test_pairs = set(zip(test_rows["user"], test_rows["item"]))
    fit_pairs = set(zip(seen[0].interactions["user"], seen[0].interactions["item"]))
    assert test_pairs and not test_pairs & fit_pairs
    # and for validation tasks, validation targets are out too
    valid_rows = tiny.interactions[target_mask(tiny, "valid")]
    seen.clear()
    evaluate_baseline(name, tiny, build_split_tasks(tiny, "valid"), FAST)
    fit_pairs = set(zip(seen[0].interactions["user"], seen[0].interactions["item"]))
    assert not set(zip(valid_rows["user"], valid_rows["item"])) & fit_pairs


@pytest.mark.slow
def test_ml100k_baselines_are_ordered_as_expected(ml100k):
    tasks = build_split_tasks(ml100k, "test")
    avg = {}
    for name in ("random", "pop", "itemknn"):
        result, _ = evaluate_baseline(name, ml100k, tasks, FAST)
        avg[name] = result["metrics"]["AvgHR"]
    assert 12 < avg["random"] < 19
    assert avg["pop"] > avg["random"] + 15
    assert avg["itemknn"] > avg["pop"]


@pytest.mark.parametrize("negatives,sampling", [(None, "uniform"), (4, "uniform"),
                                                (4, "popularity")])
def test_sasrec_learns_an_obvious_sequential_pattern(negatives, sampling):
    """Every user walks the same cycle a0 -> a1 -> ... -> a9 -> a0 from a random start, so
    the next item is fully determined by the last one; co-occurrence alone cannot tell
    which of the cycle's items comes next, order can."""
    from starrec.latent.sasrec import SASRec

    rng = np.random.default_rng(0)
    rows = []
    for u in range(60):
        start = int(rng.integers(0, 10))
        rows += [(f"u{u}", f"a{(start + k) % 10}", k) for k in range(8)]
    frame = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    items = pd.DataFrame({"title": [f"A {i}" for i in range(10)]}, index=[f"a{i}" for i in range(10)])
    # full softmax, or a sampled one against 4 of the 10 items per batch
    model = SASRec(max_len=8, hidden=32, blocks=1, heads=1, dropout=0.0, lr=5e-3, epochs=40,
                   batch_size=32, progress=False, negatives=negatives,
                   negative_sampling=sampling)
    model.fit(FitData(frame, items, "test"))
    hits = 0
    for last in range(10):
        history = [f"a{(last - 2) % 10}", f"a{(last - 1) % 10}", f"a{last}"]
        nxt = f"a{(last + 1) % 10}"
        candidates = [f"a{i}" for i in range(10) if f"a{i}" not in history]
        hits += model.rank(task(history, candidates, nxt))[0] == nxt
    assert hits >= 9


def test_presented_order_keeps_the_task_file_order():
    t = task([], ["z", "y", "x", "w"])
    assert make_recommender("presented").fit(None).rank(t) == ["z", "y", "x", "w"]


def test_sasrec_trimmed_batches_compute_what_full_width_ones_do():
    """Cutting the columns that are padding in every row changes nothing at the kept
    positions (positions stay right-aligned), so short-sequence logs train and score on
    a fraction of the width."""
    import torch

    from starrec.latent.sasrec import PAD, _SASRecNet, trim

    torch.manual_seed(0)
    net = _SASRecNet(n_tokens=30, max_len=12, hidden=16, blocks=2, heads=2, dropout=0.2).eval()
    seq = torch.full((3, 12), PAD, dtype=torch.long)
    seq[0, -4:] = torch.tensor([3, 5, 7, 9])
    seq[1, -2:] = torch.tensor([2, 4])
    seq[2, -5:] = torch.tensor([1, 8, 6, 4, 2])
    cut = trim(seq)
    assert cut.shape == (3, 5) and torch.equal(cut, seq[:, -5:])
    with torch.no_grad():
        full, short = net(seq)[:, -5:], net(cut)
    real = (cut != PAD)
    assert torch.allclose(full[real], short[real], atol=1e-5)
    assert trim(torch.full((2, 6), PAD)).shape == (2, 1)  # nothing to keep: one column


def test_sasrec_length_batches_cover_every_row_once_grouped_by_length():
    from starrec.latent.sasrec import length_batches

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 51, size=1000)
    batches = length_batches(lengths, batch_size=32, rng=np.random.default_rng(1), pool=10)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(1000))
    assert all(len(b) <= 32 for b in batches)
    # within a batch, lengths are close (sorted in pools of 320 rows of 50 lengths)
    spread = np.median([lengths[b].max() - lengths[b].min() for b in batches])
    assert spread <= 10
    # the batch order is shuffled, not sorted by length
    firsts = [lengths[b].min() for b in batches]
    assert firsts != sorted(firsts)


def test_sasrec_sampled_softmax_settings():
    from starrec.config import CSTConfig
    from starrec.cst.store import versioned_settings
    from starrec.latent.sasrec import SASRec

    with pytest.raises(ValueError, match="negatives"):
        SASRec(negatives=0)
    with pytest.raises(ValueError, match="negative_sampling"):
        SASRec(negatives=8, negative_sampling="hard")
    # the store's own SASRec trained another way is another store
    uniform = versioned_settings(CSTConfig(latent_sasrec={"negatives": 64}))
    assert uniform != versioned_settings(CSTConfig())
    assert versioned_settings(CSTConfig(latent_sasrec={
        "negatives": 64, "negative_sampling": "popularity"})) != uniform
    # a setting added later leaves the version of the stores built before it alone
    assert b"negative_sampling" not in uniform
    assert versioned_settings(CSTConfig(latent_sasrec={
        "negatives": 64, "negative_sampling": "uniform"})) == uniform


def test_later_settings_of_one_section_each_leave_the_version_alone(monkeypatch):
    from starrec.config import CSTConfig
    from starrec.cst import store

    before = store.versioned_settings(CSTConfig())
    monkeypatch.setattr(store, "LATER_SETTINGS", {
        ("latent_sasrec", "negative_sampling"): "uniform",
        ("latent_sasrec", "negatives"): CSTConfig().latent_sasrec.negatives})
    both = store.versioned_settings(CSTConfig())
    assert b"negative_sampling" not in both and b'"negatives"' not in both
    assert both != before  # one more setting left out than before


def test_sampled_softmax_loss_against_every_item_is_the_full_softmax():
    """Drawing every item once, the sampled loss is the full cross-entropy (the target's
    own draw does not count twice); with a draw distribution q every logit is lowered by
    log q, the target's too."""
    import torch
    import torch.nn.functional as F

    from starrec.latent.sasrec import sampled_softmax_loss

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(7, 4, generator=generator)  # id 0 is padding, items 1..6
    states = torch.randn(5, 4, generator=generator)
    targets = torch.tensor([1, 3, 6, 2, 3])
    every = torch.arange(1, 7)
    full = F.cross_entropy(states @ weight[1:].T, targets - 1)
    assert torch.allclose(sampled_softmax_loss(states, weight, targets, every), full, atol=1e-5)
    log_q = torch.log(torch.tensor([0.4, 0.2, 0.1, 0.1, 0.1, 0.1]))
    corrected = F.cross_entropy(states @ weight[1:].T - log_q, targets - 1)
    assert torch.allclose(sampled_softmax_loss(states, weight, targets, every, log_q), corrected,
                          atol=1e-5)
    assert not torch.allclose(corrected, full, atol=1e-3)


def test_popularity_negatives_are_drawn_in_proportion_to_frequency():
    """The draw's log-probabilities follow the fit data's item counts (plus one, so a
    catalogue-only item can be drawn); a uniform draw needs none."""
    from starrec.latent.sasrec import SASRec

    model = SASRec(negatives=2, negative_sampling="popularity")
    log_q = model._draw_log_probabilities(np.array([1, 1, 1, 2, 3, 3]), 4)
    assert np.allclose(log_q.exp().numpy(), np.array([4, 2, 3, 1]) / 10)
    assert SASRec(negatives=2)._draw_log_probabilities(np.array([1, 2]), 4) is None
    assert SASRec(negatives=8, negative_sampling="popularity")._draw_log_probabilities(
        np.array([1, 2]), 4) is None  # more negatives than items: the full softmax


def test_popularity_loss_draws_real_items_and_corrects_with_their_probabilities(monkeypatch):
    """`_loss` draws ids 1..n (never the padding id 0) from q and passes log q on: the
    loss equals `sampled_softmax_loss` on the same draw with the correction."""
    import torch

    import starrec.latent.sasrec as sasrec_module
    from starrec.latent.sasrec import SASRec, _SASRecNet, sampled_softmax_loss

    model = SASRec(negatives=3, negative_sampling="popularity")
    # item 4 is by far the most frequent: nearly every draw is id 4
    model._log_q = model._draw_log_probabilities(np.array([1, 2, 3] + [4] * 500), 4)
    net = _SASRecNet(5, 4, 8, 1, 1, 0.0)
    states, targets = torch.randn(6, 8), torch.tensor([1, 2, 3, 4, 1, 2])
    drawn_seen = []
    real = sasrec_module.sampled_softmax_loss

    def spy(states_, weight, targets_, drawn, log_q=None):
        drawn_seen.append(drawn)
        assert log_q is model._log_q
        return real(states_, weight, targets_, drawn, log_q)

    monkeypatch.setattr(sasrec_module, "sampled_softmax_loss", spy)
    torch.manual_seed(0)
    loss = model._loss(net, states, targets)
    drawn = drawn_seen[0]
    assert drawn.shape == (3,) and int(drawn.min()) >= 1 and int(drawn.max()) <= 4
    assert (drawn == 4).sum() >= 2
    assert torch.allclose(loss, sampled_softmax_loss(states, net.item.weight, targets, drawn,
                                                     model._log_q))
    with pytest.raises(ValueError, match="needs negatives"):
        SASRec(negative_sampling="popularity")


def test_one_rule_turns_scores_into_a_ranking():
    """Descending score, ties in the order given: every ranker, the service and the
    benchmarks rank through `starrec.core.score_order`."""
    from starrec.core import ranked, score_order, target_rank

    assert score_order([1.0, 2.0, 2.0, 0.5]).tolist() == [1, 2, 0, 3]
    assert score_order([1.0, 2.0, 1.0, 2.0]).tolist() == [1, 3, 0, 2]
    assert score_order([0.0] * 5).tolist() == [0, 1, 2, 3, 4]
    assert ranked(["a", "b", "c", "d"], [1.0, 2.0, 2.0, 0.5]) == ["b", "c", "a", "d"]
    assert target_rank(["a", "b", "c", "d"], "a", [1.0, 2.0, 2.0, 0.5]) == 3
    assert ranked(["a", "b"], [float("-inf"), 0.0]) == ["b", "a"]
