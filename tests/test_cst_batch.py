"""The vectorised CST evidence and the batched rankers (issue 17's speed work) against a
straightforward reference: the per-candidate evidence as it was computed before (pandas
look-ups, one product per task), the features and scores read from its records. Every
record, feature and score must be the same, task by task, alone and in batches, on
tasks with odd corners (ids outside the store, no known history, repeated items). Tiny
data; the stores are built once."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from starrec.config import CSTConfig
from starrec.core import Task
from starrec.cst.evidence import (
    CandidateEvidence,
    candidate_evidence,
    similar_users,
    task_evidence_many,
)
from starrec.cst.features import FEATURE_NAMES, task_features, task_features_many
from starrec.cst.latent import FACTORS, SEQUENCE, LatentScores, latent_scores
from starrec.cst.learned import ensure_learned_ranker, task_matrix
from starrec.cst.ranker import CSTRanker, ManualCSTRanker
from starrec.cst.store import EvidenceStore, build_store
from starrec.data.splits import task_interactions
from starrec.data.tasks import build_split_tasks
from tests.conftest import make_dataset

# small models: what is tested is that the fast path computes what the reference does
CONFIG = CSTConfig(content=False, latent_sasrec={"epochs": 2, "hidden": 16},
                   latent_als={"factors": 8, "iterations": 3}, ranker_trees=30)


# --- the reference: the evidence as it was computed before, candidate by candidate -------


def reference_similar_users(store: EvidenceStore, history: list[str], exclude_user: str | None,
                            k: int) -> tuple[np.ndarray, np.ndarray]:
    graph = store.graph
    cols = graph.items.get_indexer(history)
    cols = np.unique(cols[cols >= 0])
    if len(cols) == 0:
        return np.zeros(0, dtype=int), np.zeros(0)
    overlap = np.asarray(graph.matrix[:, cols].sum(axis=1)).ravel()
    degree = np.asarray(graph.matrix.getnnz(axis=1)).ravel()
    score = overlap / np.sqrt(np.maximum(degree, 1) * len(cols))
    own = graph.users.get_indexer([exclude_user])[0] if exclude_user is not None else -1
    candidates = np.flatnonzero(overlap > 0)
    candidates = candidates[candidates != own]
    if len(candidates) == 0:
        return np.zeros(0, dtype=int), np.zeros(0)
    top = candidates[np.lexsort((candidates, -score[candidates]))][:k]
    return top, overlap[top]


def reference_latent(store: EvidenceStore, task: Task) -> dict[str, LatentScores]:
    return {kind: latent_scores(model, task) for kind, model in store.latent_models.items()}


def reference_evidence(store: EvidenceStore, task: Task) -> list[CandidateEvidence]:
    config = store.config
    graph = store.graph
    cand = graph.items.get_indexer(task.candidates)
    hist_all = graph.items.get_indexer(task.history)
    hist = np.unique(hist_all[hist_all >= 0])
    popularity = graph.popularity
    norms = np.sqrt(np.maximum(popularity, 1.0))
    by_item = graph.matrix.T.tocsr()
    known = cand >= 0
    safe = np.where(known, cand, 0)
    co = np.zeros((len(cand), len(hist)))
    if len(hist):
        co = (by_item[safe] @ by_item[hist].T).toarray()
        co[~known] = 0
    cosine = co / (norms[safe][:, None] * norms[hist][None, :]) if len(hist) else co
    recent = [c for c in hist_all[::-1] if c >= 0][: config.recent_items]
    trans = (graph.transitions[recent][:, safe].toarray() if recent else np.zeros((0, len(cand))))
    trans[:, ~known] = 0
    next_totals = np.asarray(graph.transitions.sum(axis=1)).ravel()
    neighbours, _ = reference_similar_users(store, task.history, task.user_id,
                                            config.similar_users)
    votes = (np.asarray(graph.matrix[neighbours][:, safe].sum(axis=0)).ravel()
             if len(neighbours) else np.zeros(len(cand)))
    votes[~known] = 0
    recent_pct = store.recent_percentiles(task.cutoff_time)
    vectors = store.embeddings
    content = vectors[safe] @ vectors[hist].T if vectors is not None and len(hist) else None
    latent = reference_latent(store, task)
    records = []
    for j, item in enumerate(task.candidates):
        stats = store.items.loc[item] if item in store.items.index else None
        best = int(np.argmax(cosine[j])) if len(hist) and co[j].max() > 0 else None
        t_best = int(np.argmax(trans[:, j])) if len(recent) and trans[:, j].max() > 0 else None
        c_best = int(np.argmax(content[j])) if content is not None and known[j] else None
        fields = {}
        for prefix, kind, share in (("sequence", SEQUENCE, True), ("factor", FACTORS, False)):
            scores = latent.get(kind)
            if scores is None:
                continue
            fields[f"{prefix}_of"] = scores.n_scored
            if scores.ranks[j] > 0:
                fields[f"{prefix}_rank"] = int(scores.ranks[j])
                fields[f"{prefix}_score"] = float(scores.scores[j])
                if share:
                    fields[f"{prefix}_share"] = float(scores.shares[j])
        records.append(CandidateEvidence(
            item=item, title=store.title(item),
            known=bool(known[j] and popularity[cand[j]] > 0),
            cooc_score=float(cosine[j].sum()) if len(hist) else 0.0,
            cooc_linked=int((co[j] > 0).sum()),
            cooc_best_item=graph.items[hist[best]] if best is not None else None,
            cooc_best_count=int(co[j, best]) if best is not None else 0,
            cooc_best_base=int(popularity[hist[best]]) if best is not None else 0,
            transition_count=int(trans[:, j].sum()),
            transition_best_item=graph.items[recent[t_best]] if t_best is not None else None,
            transition_best_count=int(trans[t_best, j]) if t_best is not None else 0,
            transition_best_total=int(next_totals[recent[t_best]]) if t_best is not None else 0,
            user_votes=int(votes[j]), similar_users=len(neighbours),
            pop=int(stats["pop"]) if stats is not None else 0,
            pop_pct=float(stats["pop_pct"]) if stats is not None else 0.0,
            recent_pct=float(recent_pct[cand[j]]) if known[j] else 0.0,
            content_best_item=graph.items[hist[c_best]] if c_best is not None else None,
            content_similarity=float(content[j, c_best]) if c_best is not None else None,
            **fields))
    return records


def reference_features(records: list[CandidateEvidence], n_history: int) -> np.ndarray:
    def column(name: str) -> np.ndarray:
        return np.array([np.nan if getattr(e, name) is None else getattr(e, name)
                         for e in records], dtype=np.float64)

    def scaled(values: np.ndarray) -> np.ndarray:
        top = np.nanmax(values) if len(values) else 0.0
        return values / top if top > 0 else np.zeros_like(values)

    def share(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    def margin(scores: np.ndarray) -> np.ndarray:
        return scores if np.isnan(scores).all() else scores - np.nanmax(scores)

    values = {
        "cooc_score": column("cooc_score"), "cooc_scaled": scaled(column("cooc_score")),
        "cooc_linked_share": column("cooc_linked") / max(n_history, 1),
        "cooc_best_share": share(column("cooc_best_count"), column("cooc_best_base")),
        "transition_count": column("transition_count"),
        "transition_scaled": scaled(column("transition_count")),
        "transition_best_share": share(column("transition_best_count"),
                                       column("transition_best_total")),
        "user_votes_share": share(column("user_votes"), column("similar_users")),
        "user_votes_scaled": scaled(column("user_votes")),
        "pop_pct": column("pop_pct"), "recent_pct": column("recent_pct"),
        "log_pop": np.log1p(column("pop")), "content_similarity": column("content_similarity"),
        "sequence_score": column("sequence_score"),
        "sequence_margin": margin(column("sequence_score")),
        "sequence_share": column("sequence_share"), "sequence_rank": column("sequence_rank"),
        "factor_score": column("factor_score"), "factor_margin": margin(column("factor_score")),
        "factor_rank": column("factor_rank"),
        "history_length": np.full(len(records), np.log1p(n_history)),
    }
    return np.column_stack([values[name] for name in FEATURE_NAMES])


def reference_manual(config: CSTConfig, records: list[CandidateEvidence]) -> np.ndarray:
    def feature(name: str) -> np.ndarray:
        return np.array([getattr(e, name) or 0.0 for e in records], dtype=float)

    def scaled(values: np.ndarray) -> np.ndarray:
        return values / values.max() if values.max() > 0 else values

    c = config
    return (c.weight_cooccurrence * scaled(feature("cooc_score"))
            + c.weight_transition * scaled(feature("transition_count"))
            + c.weight_similar_users * scaled(feature("user_votes"))
            + c.weight_popularity * feature("pop_pct") / 100
            + c.weight_content * feature("content_similarity"))


# --- stores and tasks ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(test tasks, test store path with a learned ranker, a store path without latent
    models)."""
    data = make_dataset(n_users=30, n_items=50, per_user=10)
    folder = tmp_path_factory.mktemp("batch")
    paths, tasks = {}, {}
    for split in ("valid", "test"):
        tasks[split] = build_split_tasks(data, split)
        allowed = task_interactions(data, tasks[split], split)
        paths[split] = build_store(allowed, data.items, folder / f"{split}.sqlite", CONFIG,
                                   split=split, progress=False)
    valid_store = EvidenceStore(paths["valid"])
    ensure_learned_ranker(paths["test"], valid_store, tasks["valid"], CONFIG)
    allowed = task_interactions(data, tasks["test"], "test")
    plain = build_store(allowed, data.items, folder / "plain.sqlite",
                        CONFIG.model_copy(update={"latent": False}), split="test", progress=False)
    return tasks["test"], paths["test"], plain


def opened(path, content: bool) -> EvidenceStore:
    """The store at `path`; with `content`, random unit content vectors stand in for
    MiniLM's (the content signal's arithmetic is what is compared)."""
    store = EvidenceStore(path)
    if content:
        vectors = np.random.default_rng(1).normal(size=(len(store.item_ids), 8)).astype(np.float32)
        store.__dict__["embeddings"] = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return store


def odd_tasks(tasks: list[Task], store: EvidenceStore) -> list[Task]:
    """The test tasks and variants at the corners: a candidate outside the store and one
    without interactions, no known history, an empty history, repeated history items,
    an unknown user."""
    pop = store.items["pop"]
    unseen = [item for item in store.items.index if pop[item] == 0]
    base = tasks[0]
    odd_candidates = ["nowhere", *unseen[:1], *base.candidates[2:]]
    return [
        *tasks,
        dataclasses.replace(base, task_id="odd-candidates", candidates=odd_candidates),
        dataclasses.replace(base, task_id="unknown-history", history=["ghost", "nowhere"]),
        dataclasses.replace(base, task_id="empty-history", history=[], cutoff=0),
        dataclasses.replace(base, task_id="repeats",
                            history=[*base.history, base.history[0], "ghost", base.history[-1]]),
        dataclasses.replace(base, task_id="stranger", user_id="stranger"),
    ]


# --- the fast path against the reference -------------------------------------------------


@pytest.mark.parametrize("content", [False, True])
def test_evidence_records_equal_the_reference(built, content):
    tasks, path, plain = built
    for store_path in (path, plain):
        store = opened(store_path, content)
        for task in odd_tasks(tasks, store):
            assert [e.to_dict() for e in candidate_evidence(store, task)] == \
                [e.to_dict() for e in reference_evidence(store, task)], task.task_id


def close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to float rounding: a batch of histories runs the sequence model on other
    shapes than one history alone, and some CPUs' kernels round those differently."""
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("content", [False, True])
def test_batched_features_and_scores_equal_the_reference(built, content):
    tasks, path, plain = built
    store = opened(path, content)
    everything = odd_tasks(tasks, store)
    learned, manual = CSTRanker.on_store(store, CONFIG), ManualCSTRanker.on_store(store, CONFIG)
    assert learned.kind == "learned" and manual.kind == "manual"
    references = [reference_evidence(store, task) for task in everything]
    features = [reference_features(r, len(t.history)) for r, t in zip(references, everything)]
    wanted = {"cst": [learned.model.score(x) for x in features],
              "cst-manual": [reference_manual(CONFIG, r) for r in references]}
    for x, task in zip(features, everything):
        close(task_features(store, task), x)
    for size in (1, 3, len(everything)):  # alone, mixed small batches, all at once
        batches = [everything[i:i + size] for i in range(0, len(everything), size)]
        got = [x for batch in batches for x in task_features_many(store, batch)]
        for x, y in zip(got, features):
            close(x, y)
        for ranker in (learned, manual):
            scores = [s for batch in batches for s in ranker.score_many(batch)]
            for got_scores, want in zip(scores, wanted[ranker.name]):
                close(got_scores, want)
    for ranker in (learned, manual):
        for task, want in zip(everything, wanted[ranker.name]):
            close(ranker.score(task), want)
    # a store without latent models: no sequence or factor features, the same scores
    bare = opened(plain, content)
    bare_tasks = odd_tasks(tasks, bare)
    rows = [reference_features(reference_evidence(bare, t), len(t.history)) for t in bare_tasks]
    assert np.isnan(np.vstack(rows)[:, FEATURE_NAMES.index("sequence_score")]).all()
    for x, y in zip(task_features_many(bare, bare_tasks), rows):
        close(x, y)
    assert [s.tolist() for s in ManualCSTRanker.on_store(bare, CONFIG).score_many(bare_tasks)] == \
        [reference_manual(CONFIG, reference_evidence(bare, t)).tolist() for t in bare_tasks]


def test_the_fit_matrix_is_the_reference_features(built):
    tasks, path, _ = built
    store = opened(path, False)
    x, y, sizes = task_matrix(store, tasks)
    close(
        x, np.vstack([reference_features(reference_evidence(store, t), len(t.history))
                      for t in tasks]))
    assert sizes.tolist() == [len(t.candidates) for t in tasks] and y.sum() == len(tasks)


def test_similar_users_equal_the_reference(built):
    tasks, path, _ = built
    store = opened(path, False)
    for task in odd_tasks(tasks, store):
        for k in (1, 5, 50):
            got = similar_users(store, task.history, task.user_id, k)
            want = reference_similar_users(store, task.history, task.user_id, k)
            assert got[0].tolist() == want[0].tolist() and got[1].tolist() == want[1].tolist()
            assert got[1].dtype == want[1].dtype


def test_batches_larger_than_one_product_block_are_split(built, monkeypatch):
    """Many tasks are computed a block of tasks at a time, with the same results."""
    import starrec.cst.evidence as evidence

    tasks, path, _ = built
    store = opened(path, False)
    whole = [e.cooc_score.tolist() for e in task_evidence_many(store, tasks)]
    monkeypatch.setattr(evidence, "BATCH_TASKS", 4)
    assert [e.cooc_score.tolist() for e in task_evidence_many(store, tasks)] == whole
    assert task_evidence_many(store, []) == []


def test_store_arrays_are_read_once_in_store_order(built):
    _, path, _ = built
    store = EvidenceStore(path)
    assert store.arrays is store.arrays
    assert store.arrays.item_ids == store.item_ids.tolist()
    assert store.arrays.pop.tolist() == store.items["pop"].tolist()
    assert [store.arrays.title(i, store.arrays.items.get(i, -1)) for i in ("i3", "nowhere")] == \
        [store.title("i3"), store.title("nowhere")]
