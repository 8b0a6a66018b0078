"""Which evidence carries the signal: the learned `cst` ranker with one signal group
dropped at a time, fitted on the train tasks and scored on the valid tasks (never test;
issue 16).

The valid store's ranker is fitted the way `star cst build` fits it (LightGBM LambdaRank
on the train tasks, their features from the train store, the number of trees chosen on
held-out train users); a dropped group's feature columns are set to missing in both the
fit and the scored rows, so the trees cannot use them. Each variant is scored on every
valid task (or the first `--limit`), with its AvgHR, its 95% interval and its paired
difference to the ranker with every group.

    python benchmarks/cst_ablation.py --dataset ml-100k
    python benchmarks/cst_ablation.py --dataset amazon-games --config configs/baselines-tuned-amazon-games.yaml

Writes benchmarks/results/<dataset>/cst_ablation.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from starrec.config import load_config
from starrec.core import score_order
from starrec.cst.features import FEATURES, GROUPS
from starrec.cst.learned import fit_booster, task_matrix
from starrec.data.registry import dataset_slug
from starrec.evaluation.metrics import bootstrap_ci, per_task_metrics, summarize
from starrec.evaluation.runner import machine_description
from starrec.experiment import evidence_store, load_task_set

ROOT = Path(__file__).resolve().parents[1]


def target_ranks(scores: np.ndarray, labels: np.ndarray, sizes: np.ndarray) -> list[int]:
    """1-based rank of each task's target when its scores order its candidates (ties keep
    the presented order, as every evaluation ranks)."""
    ranks, start = [], 0
    for size in sizes:
        task_scores, task_labels = scores[start:start + size], labels[start:start + size]
        order = score_order(task_scores)
        ranks.append(int(np.flatnonzero(task_labels[order] == 1)[0]) + 1)
        start += size
    return ranks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--limit", type=int, default=None, help="first N valid tasks")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/<dataset>/cst_ablation.json")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    slug = dataset_slug(args.dataset)
    out = args.out or ROOT / "benchmarks" / "results" / slug / "cst_ablation.json"

    started = time.perf_counter()
    fit_set = load_task_set(args.dataset, config, split="train")
    scored_set = load_task_set(args.dataset, config, split="valid", limit=args.limit)
    fit_store = evidence_store(fit_set, config, fit_ranker=False)
    scored_store = evidence_store(scored_set, config, fit_ranker=False)
    x_fit, y_fit, sizes_fit = task_matrix(fit_store, fit_set.tasks, progress=True)
    x_scored, y_scored, sizes_scored = task_matrix(scored_store, scored_set.tasks,
                                                   progress=True)
    features_s = time.perf_counter() - started

    variants: dict[str, list[int]] = {}
    rows = []
    for dropped in [None, *GROUPS]:
        columns = [j for j, f in enumerate(FEATURES) if f.group == dropped]
        fit, scored = x_fit.copy(), x_scored.copy()
        fit[:, columns] = np.nan
        scored[:, columns] = np.nan
        began = time.perf_counter()
        booster, held_ndcg, _ = fit_booster(fit, y_fit, sizes_fit, config.cst)
        ranks = target_ranks(booster.predict(scored, num_threads=1), y_scored, sizes_scored)
        name = "all groups" if dropped is None else f"without {dropped}"
        variants[name] = ranks
        metrics, ci = summarize(ranks, [True] * len(ranks), n_resamples=1000, seed=0)
        row = {"variant": name, "dropped": dropped, "features_dropped": len(columns),
               "AvgHR": metrics["AvgHR"], "AvgHR_ci95": ci["AvgHR"],
               "NDCG@10": metrics["NDCG@10"], "trees": booster.num_trees(),
               "held_out_ndcg@5": held_ndcg, "fit_s": round(time.perf_counter() - began, 2)}
        if dropped is not None:
            full = np.array([per_task_metrics(r)["AvgHR"] for r in variants["all groups"]])
            this = np.array([per_task_metrics(r)["AvgHR"] for r in ranks])
            difference = this - full
            low, high = bootstrap_ci(difference, 1000, 0)
            row["paired_AvgHR_vs_all"] = round(100 * float(difference.mean()), 2)
            row["paired_ci95"] = [round(100 * low, 2), round(100 * high, 2)]
            row["wins_ties_losses"] = [int((difference > 0).sum()), int((difference == 0).sum()),
                                       int((difference < 0).sum())]
        rows.append(row)
        print(json.dumps(row), flush=True)

    result = {"benchmark": "cst_ablation", "dataset": slug, "fit_split": "train",
              "fit_tasks": len(fit_set.tasks), "scored_split": "valid",
              "scored_tasks": len(scored_set.tasks), "config": str(args.config),
              "overrides": args.overrides, "features_s": round(features_s, 1),
              "machine": machine_description(), "variants": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print("| variant | valid AvgHR [95% CI] | paired vs all groups [95% CI], W/T/L | trees |")
    print("|---|---|---|---|")
    for row in rows:
        ci = row["AvgHR_ci95"]
        paired = ("(the reference)" if row["dropped"] is None else
                  f"{row['paired_AvgHR_vs_all']:+.1f} [{row['paired_ci95'][0]:+.1f}, "
                  f"{row['paired_ci95'][1]:+.1f}], {'/'.join(map(str, row['wins_ties_losses']))}")
        print(f"| {row['variant']} | {row['AvgHR']:.1f} [{ci[0]:.1f}, {ci[1]:.1f}] | {paired} | "
              f"{row['trees']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
