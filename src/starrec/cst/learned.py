"""The learned `cst` ranker: LightGBM LambdaRank over the evidence features, fitted on the
tasks of the split before the store's own and kept in the store.

Why LambdaRank and not a logistic model: the task is a ranking of 20 candidates judged at
the top (HR@1/3/5), which a listwise objective optimises directly; and a linear model
over these features was measured (issue 16) to add nothing to SASRec's own rank when
that rank is a feature, since it cannot use margins, missing values or interactions of
signals (a strong sequence score means more for a long history than for a cold one).
Gradient-boosted trees use all three, need no feature scaling, and the model is a few
hundred kilobytes of text that the store keeps beside its signals.

Where it is fitted (DESIGN.md 3.3): a store serving test tasks gets a ranker fitted on
the valid tasks, with their features from the store serving the valid tasks, which never
saw a valid target; the valid store's ranker is fitted on the train tasks the same way.
A train store has no split before it, and its `cst` ranker keeps the hand-set weights.
No ranker is ever fitted on test tasks, and the fit refuses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from starrec.config import CSTConfig
from starrec.core import Task
from starrec.core.files import building
from starrec.cst.evidence import BATCH_TASKS
from starrec.cst.features import FEATURE_NAMES, FEATURES, GROUPS, task_features_many
from starrec.cst.store import RANKER_SETTINGS, EvidenceStore
from starrec.progress import progress_bar

log = logging.getLogger(__name__)

# the split whose tasks fit the ranker of a store serving the key's split
RANKER_FIT_SPLIT = {"test": "valid", "valid": "train"}
ALGORITHM = "lightgbm-lambdarank"
EARLY_STOPPING_ROUNDS = 30


@dataclass
class LearnedRanker:
    """A fitted ranker as the store keeps it: its key (what it was fitted from and with),
    what the fit reported, and the LightGBM model text."""

    key: str
    meta: dict[str, Any]
    model_text: str

    @cached_property
    def booster(self):
        import lightgbm

        return lightgbm.Booster(model_str=self.model_text)

    def score(self, features: np.ndarray) -> np.ndarray:
        if list(self.meta["features"]) != list(FEATURE_NAMES):
            raise ValueError("the stored ranker was fitted on other features; rebuild it "
                             "(star cst build)")
        return np.asarray(self.booster.predict(features, num_threads=1), dtype=np.float64)

    def score_many(self, features: Sequence[np.ndarray]) -> list[np.ndarray]:
        """`score` of several tasks' features in one predict call: trees score each row
        on its own, so each task's scores are those it gets alone."""
        if not features:
            return []
        scores = self.score(np.vstack(features))
        return np.split(scores, np.cumsum([len(f) for f in features])[:-1])


def tasks_digest(tasks: list[Task]) -> str:
    """A hash of what a fit reads of its tasks: ids, histories, candidates, targets."""
    digest = hashlib.sha256()
    for task in tasks:
        digest.update(json.dumps([task.task_id, task.user_id, task.history, task.candidates,
                                  task.target]).encode())
    return digest.hexdigest()[:16]


def ranker_settings(config: CSTConfig) -> dict[str, Any]:
    dumped = config.model_dump()
    return {name: dumped[name] for name in sorted(RANKER_SETTINGS) if name != "ranker"}


def ranker_key(fit_store: EvidenceStore, fit_tasks: list[Task], config: CSTConfig) -> str:
    payload = json.dumps({"algorithm": ALGORITHM, "features": FEATURE_NAMES,
                          "fit_store": fit_store.meta["version"],
                          "fit_tasks": tasks_digest(fit_tasks),
                          "settings": ranker_settings(config)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def fit_split_of(store: EvidenceStore) -> str | None:
    """The split whose tasks fit this store's ranker, None when there is none."""
    return RANKER_FIT_SPLIT.get(store.meta.get("split", ""))


def check_fit_tasks(store: EvidenceStore, fit_store: EvidenceStore, fit_tasks: list[Task]) -> str:
    """The fit split, after checking that the tasks are those of the split before the
    store's, and that their features come from the store serving them (ValueError)."""
    served = store.meta.get("split", "")
    wanted = RANKER_FIT_SPLIT.get(served)
    if wanted is None:
        raise ValueError(f"a store serving {served or 'unnamed'} tasks has no split before it "
                         f"to fit a ranker on (expected one of {sorted(RANKER_FIT_SPLIT)})")
    splits = sorted({t.split for t in fit_tasks})
    if splits != [wanted]:
        raise ValueError(f"the ranker of the {served} store is fitted on {wanted} tasks only, "
                         f"not {', '.join(splits) or 'none'}")
    if fit_store.meta.get("split") != wanted:
        raise ValueError(f"the {wanted} tasks' features must come from the store serving "
                         f"them, not one serving {fit_store.meta.get('split') or 'unnamed'} tasks")
    return wanted


def task_matrix(store: EvidenceStore, tasks: list[Task],
                progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features, labels, group sizes) of `tasks`, candidates in presented order."""
    rows, labels = [], []
    bar = progress_bar("ranker features", total=len(tasks), unit="task", enabled=progress)
    for start in range(0, len(tasks), BATCH_TASKS):
        batch = tasks[start:start + BATCH_TASKS]
        rows += task_features_many(store, batch)
        labels += [np.array([c == t.target for c in t.candidates], dtype=np.float64)
                   for t in batch]
        bar.update(len(batch))
    bar.close()
    sizes = np.array([len(t.candidates) for t in tasks], dtype=np.int64)
    if not rows:
        return np.zeros((0, len(FEATURES))), np.zeros(0), sizes
    return np.vstack(rows), np.concatenate(labels), sizes


def lightgbm_params(config: CSTConfig) -> dict[str, Any]:
    return {
        "objective": "lambdarank",
        "metric": "ndcg",
        "eval_at": [5],  # the top the task is judged on (HR@1/3/5)
        "num_leaves": config.ranker_leaves,
        "learning_rate": config.ranker_learning_rate,
        "min_data_in_leaf": config.ranker_min_data,
        "min_sum_hessian_in_leaf": 1e-3,
        "feature_pre_filter": False,
        # the same model on every machine and every run
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": 1,
        "seed": config.ranker_seed,
        "verbose": -1,
    }


def _holdout_positions(n_tasks: int, share: float, seed: int) -> np.ndarray:
    """Positions of the tasks whose users choose the number of trees (none when too few)."""
    n = int(round(share * n_tasks))
    if n < 5 or n_tasks - n < 5:
        return np.zeros(0, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(n_tasks)
    return np.sort(order[:n])


def _rows(sizes: np.ndarray, picked: np.ndarray) -> np.ndarray:
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    return np.concatenate([np.arange(starts[i], starts[i] + sizes[i]) for i in picked]) \
        if len(picked) else np.zeros(0, dtype=np.int64)


def fit_booster(x: np.ndarray, y: np.ndarray, sizes: np.ndarray, config: CSTConfig):
    """(LightGBM booster, held-out NDCG@5 or None, held-out task count): trees grown on
    the feature rows `x` of tasks of `sizes` candidates (labels `y`), their number chosen
    by NDCG@5 on held-out tasks' users, then refitted on all. A feature column that is
    all NaN is one the trees cannot use: how the ablation drops a signal group."""
    import lightgbm

    params = lightgbm_params(config)
    n_tasks = len(sizes)
    held = _holdout_positions(n_tasks, config.ranker_holdout, config.ranker_seed)
    trees, held_ndcg = config.ranker_trees, None
    if len(held):
        kept = np.setdiff1d(np.arange(n_tasks), held)
        train_rows, held_rows = _rows(sizes, kept), _rows(sizes, held)
        train = lightgbm.Dataset(x[train_rows], y[train_rows], group=sizes[kept],
                                 feature_name=list(FEATURE_NAMES), free_raw_data=False)
        valid = lightgbm.Dataset(x[held_rows], y[held_rows], group=sizes[held], reference=train)
        probe = lightgbm.train(params, train, num_boost_round=config.ranker_trees,
                               valid_sets=[valid], valid_names=["held"],
                               callbacks=[lightgbm.early_stopping(EARLY_STOPPING_ROUNDS,
                                                                  verbose=False)])
        trees = max(int(probe.best_iteration or config.ranker_trees), 1)
        held_ndcg = round(float(probe.best_score["held"]["ndcg@5"]), 4)
    full = lightgbm.Dataset(x, y, group=sizes, feature_name=list(FEATURE_NAMES))
    return lightgbm.train(params, full, num_boost_round=trees), held_ndcg, len(held)


def fit_ranker(fit_store: EvidenceStore, fit_tasks: list[Task], config: CSTConfig, *,
               progress: bool = False) -> tuple[str, dict[str, Any]]:
    """(LightGBM model text, what the fit reported): `fit_booster` on the fit tasks'
    features from the store serving them."""
    import lightgbm

    started = time.perf_counter()
    x, y, sizes = task_matrix(fit_store, fit_tasks, progress)
    booster, held_ndcg, n_held = fit_booster(x, y, sizes, config)
    gain = booster.feature_importance("gain").astype(np.float64)
    share = gain / gain.sum() if gain.sum() > 0 else gain
    by_feature = {f.name: round(float(s), 4) for f, s in zip(FEATURES, share)}
    by_group = {g: round(float(sum(s for f, s in zip(FEATURES, share) if f.group == g)), 4)
                for g in GROUPS}
    meta = {
        "algorithm": ALGORITHM,
        "lightgbm": lightgbm.__version__,
        "fit_split": sorted({t.split for t in fit_tasks}),
        "fit_tasks": len(fit_tasks),
        "fit_tasks_digest": tasks_digest(fit_tasks),
        "fit_store": fit_store.meta.get("version"),
        "trees": booster.num_trees(),
        "held_out_tasks": int(n_held),
        "held_out_ndcg@5": held_ndcg,
        "settings": ranker_settings(config),
        "features": list(FEATURE_NAMES),
        "importance_gain": by_feature,
        "importance_by_group": by_group,
        "fit_s": round(time.perf_counter() - started, 3),
    }
    return booster.model_to_string(), meta


def read_ranker(store: EvidenceStore) -> LearnedRanker | None:
    row = store.ranker_row()
    return None if row is None else LearnedRanker(*row)


def write_ranker(path: Path, ranker: LearnedRanker) -> None:
    """Replace the store's ranker (one per store) in one transaction."""
    db = sqlite3.connect(path)
    try:
        with db:
            db.execute("DELETE FROM ranker")
            db.execute("INSERT INTO ranker VALUES (?,?,?)",
                       (ranker.key, json.dumps(ranker.meta), ranker.model_text))
    finally:
        db.close()


def ensure_learned_ranker(path: Path, fit_store: EvidenceStore, fit_tasks: list[Task],
                          config: CSTConfig, *, progress: bool = False) -> LearnedRanker:
    """The ranker of the store at `path`, fitted on `fit_tasks` (the split before the
    store's, with features from `fit_store`, the store serving them) unless the store
    already holds one fitted from the same inputs with the same settings."""
    with building(path):  # one process fits it; another waiting for it then reuses it
        store = EvidenceStore(path)
        try:
            split = check_fit_tasks(store, fit_store, fit_tasks)
            key = ranker_key(fit_store, fit_tasks, config)
            existing = read_ranker(store)
        finally:
            store.close()
        if existing is not None and existing.key == key:
            log.info("cst: reusing the ranker %s of %s", key, path.name)
            return existing
        log.info("cst: fitting the ranker of %s on %d %s tasks", path.name, len(fit_tasks),
                 split)
        text, meta = fit_ranker(fit_store, fit_tasks, config, progress=progress)
        ranker = LearnedRanker(key, meta, text)
        write_ranker(path, ranker)
        return ranker


def ranker_lines(ranker: LearnedRanker | None, config: CSTConfig, served: str) -> list[str]:
    """What `star cst show` prints about the ranker that orders a store's candidates."""
    if ranker is None:
        why = ("a train store has no split before it to fit one on" if served == "train"
               else "none fitted" if config.ranker == "learned" else "cst.ranker=manual")
        weights = ", ".join(f"{name.removeprefix('weight_')} {value:g}"
                            for name, value in config.model_dump().items()
                            if name.startswith("weight_"))
        return [f"ranker: hand-set weights ({why}): {weights}"]
    meta = ranker.meta
    lines = [f"ranker: learned ({meta['algorithm']}, {meta['trees']} trees) on "
             f"{meta['fit_tasks']} {'/'.join(meta['fit_split'])} tasks, features from store "
             f"{meta['fit_store']}; key {ranker.key}"]
    groups = sorted(meta["importance_by_group"].items(), key=lambda pair: -pair[1])
    lines.append("  weight by signal group (share of split gain): "
                 + ", ".join(f"{g} {100 * s:.0f}%" for g, s in groups))
    top = sorted(meta["importance_gain"].items(), key=lambda pair: -pair[1])
    lines.append("  by feature: " + ", ".join(f"{n} {100 * s:.1f}%" for n, s in top if s > 0))
    return lines
