"""Tune ItemKNN, ALS and SASRec on the VALIDATION tasks (never test), one small grid each,
so that no baseline is compared untuned against a tuned one (issue 16).

Every model is fitted on what the validation split allows (leak-checked against the
valid tasks) and scored on the valid tasks of all users (or the first `--limit`); the
setting with the best valid AvgHR wins, ties going to the one listed first (the grids
list cheaper settings first). SASRec is trained once per size and scored after each
epoch count of its grid, as `benchmarks/sasrec_epochs.py` does.

Writes the grid scores and the chosen settings to
benchmarks/results/<dataset>/tuned_baselines.json and a config with the chosen
`baselines:` section to configs/baselines-tuned-<dataset>.yaml, used as

    star eval --system sasrec --config configs/baselines-tuned-ml-100k.yaml --out r.json

    python benchmarks/tune_baselines.py --dataset ml-100k
    python benchmarks/tune_baselines.py --dataset amazon-games --limit 5000 \\
        --sasrec-hidden 64 --sasrec-epochs 10,15,20,25,30
    python benchmarks/tune_baselines.py --grid smoke --limit 50 --out-dir /tmp/tune  # a check
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from starrec.config import StarConfig, load_config
from starrec.core import FitData, Recommender, Task
from starrec.core import target_rank as core_target_rank
from starrec.data.registry import dataset_slug
from starrec.data.splits import check_no_leak, fit_interactions
from starrec.evaluation.metrics import summarize
from starrec.evaluation.runner import machine_description
from starrec.experiment import load_task_set

ROOT = Path(__file__).resolve().parents[1]

# name -> {setting: values}; SASRec's `epochs` are scored from one training run per size
GRIDS: dict[str, dict[str, dict[str, list[Any]]]] = {
    "full": {
        "itemknn": {"k": [None, 20, 50, 100], "shrink": [0.0, 10.0, 100.0]},
        "als": {"factors": [32, 64, 128], "regularization": [0.01, 0.05, 0.2],
                "iterations": [10, 20]},
        "sasrec": {"hidden": [32, 64], "epochs": [10, 20, 30, 50, 80]},
    },
    "smoke": {
        "itemknn": {"k": [None, 20], "shrink": [0.0]},
        "als": {"factors": [16], "regularization": [0.05], "iterations": [2, 4]},
        "sasrec": {"hidden": [16], "epochs": [1, 2]},
    },
}


def points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    names = list(grid)
    return [dict(zip(names, values)) for values in itertools.product(*grid.values())]


def target_rank(task: Task, scores: np.ndarray) -> int:
    """1-based rank of the target when the scores order the candidates (ties keep the
    presented order, as every evaluation ranks)."""
    return core_target_rank(task.candidates, task.target, scores)


def score_point(ranks: Sequence[int], params: dict[str, Any], seconds: float) -> dict[str, Any]:
    metrics, ci = summarize(list(ranks), [True] * len(ranks), n_resamples=1000, seed=0)
    return {"params": params, "AvgHR": metrics["AvgHR"], "AvgHR_ci95": ci["AvgHR"],
            "NDCG@10": metrics["NDCG@10"], "MRR": metrics["MRR"], "seconds": round(seconds, 1)}


def tune_scored(make: Callable[[dict[str, Any]], Recommender], grid: dict[str, list[Any]],
                fit: FitData, tasks: list[Task], name: str) -> list[dict[str, Any]]:
    """ItemKNN and ALS: one fit per grid point."""
    results = []
    for params in points(grid):
        started = time.perf_counter()
        model = make(params).fit(fit)
        ranks = [target_rank(task, model.score(task)) for task in tasks]
        results.append(score_point(ranks, params, time.perf_counter() - started))
        print(f"{name} {json.dumps(results[-1])}", flush=True)
    return results


def tune_sasrec(base: dict[str, Any], grid: dict[str, list[Any]], fit: FitData,
                tasks: list[Task]) -> list[dict[str, Any]]:
    """One training run per size, scored after each epoch count of the grid."""
    from starrec.latent.sasrec import SASRec

    results = []
    checkpoints = sorted(grid["epochs"])
    sizes = {name: values for name, values in grid.items() if name != "epochs"}
    for size in points(sizes):
        started = time.perf_counter()

        def on_epoch(epoch: int, model: SASRec, size: dict[str, Any] = size) -> None:
            if epoch not in checkpoints:
                return
            ranks = [target_rank(t, s) for t, s in zip(tasks, model.score_many(tasks))]
            results.append(score_point(ranks, {**size, "epochs": epoch},
                                       time.perf_counter() - started))
            print(f"sasrec {json.dumps(results[-1])}", flush=True)

        params = {**base, **size, "epochs": checkpoints[-1], "progress": False}
        SASRec(**params).fit(fit, on_epoch=on_epoch)
    return results


def best(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The first of the best valid AvgHR (max keeps the first of equals)."""
    return max(results, key=lambda r: r["AvgHR"])["params"]


def tune(config: StarConfig, dataset: str, grid: dict[str, dict[str, list[Any]]], grid_name: str,
         limit: int | None) -> dict[str, Any]:
    task_set = load_task_set(dataset, config, split="valid", limit=limit)
    tasks = task_set.tasks
    interactions = fit_interactions(task_set.dataset, "valid")
    check_no_leak(tasks, interactions, where="the fit data of the tuned baselines")
    fit = FitData(interactions, task_set.dataset.items, "valid")
    b = config.baselines

    from starrec.baselines.itemknn import ItemKNN
    from starrec.latent.als import ALS

    grids = {
        "itemknn": tune_scored(lambda p: ItemKNN(**{**b.itemknn.model_dump(), **p}),
                               grid["itemknn"], fit, tasks, "itemknn"),
        "als": tune_scored(lambda p: ALS(**{**b.als.model_dump(), **p}), grid["als"], fit,
                           tasks, "als"),
        "sasrec": tune_sasrec(b.sasrec.model_dump(), grid["sasrec"], fit, tasks),
    }
    chosen = {name: {**getattr(b, name).model_dump(), **best(results)}
              for name, results in grids.items()}
    return {
        "dataset": dataset_slug(dataset),
        "split": "valid",
        "n_tasks": len(tasks),
        "tasks": str(task_set.path.name) if task_set.path else None,
        "grid": grid_name,
        "grids_searched": grid,
        "machine": machine_description(),
        "scores": grids,
        "chosen": chosen,
    }


def write_config(chosen: dict[str, Any], result: dict[str, Any], path: Path) -> None:
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    header = (f"# Baseline settings chosen on the valid tasks of {result['dataset']} "
              f"({result['n_tasks']} tasks, grid {result['grid']})\n"
              "# by benchmarks/tune_baselines.py; scores in "
              f"benchmarks/results/{result['dataset']}/tuned_baselines.json.\n"
              f"# Use: star eval --system sasrec --config {shown} ...\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump({"baselines": chosen}, sort_keys=False),
                    encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="full")
    parser.add_argument("--limit", type=int, default=None,
                        help="Score only the first N valid tasks (a quick check, not a result).")
    parser.add_argument("--config", type=Path, default=None,
                        help="Base settings (default: the built-in defaults).")
    parser.add_argument("--sasrec-epochs", type=lambda text: [int(x) for x in text.split(",")],
                        default=None, help="the SASRec epoch counts scored, e.g. 10,20,30 "
                        "(default: the grid's); a larger log affords fewer")
    parser.add_argument("--sasrec-hidden", type=lambda text: [int(x) for x in text.split(",")],
                        default=None, help="the SASRec sizes trained, e.g. 64 (default: the "
                        "grid's); each size is one training run to the largest epoch count")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a config override of the base settings, as star --set "
                        "section.key=value")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="Where the JSON and the YAML go (default: benchmarks/results/<dataset>/ "
                        "and configs/).")
    args = parser.parse_args(argv)
    config = load_config(args.config, args.overrides)
    grid = {**GRIDS[args.grid]}
    if args.sasrec_epochs:
        grid["sasrec"] = {**grid["sasrec"], "epochs": sorted(args.sasrec_epochs)}
    if args.sasrec_hidden:
        grid["sasrec"] = {**grid["sasrec"], "hidden": args.sasrec_hidden}
    result = tune(config, args.dataset, grid, args.grid, args.limit)
    slug = result["dataset"]
    if args.out_dir is None:
        json_path = ROOT / "benchmarks" / "results" / slug / "tuned_baselines.json"
        yaml_path = ROOT / "configs" / f"baselines-tuned-{slug}.yaml"
    else:
        json_path = args.out_dir / "tuned_baselines.json"
        yaml_path = args.out_dir / f"baselines-tuned-{slug}.yaml"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    write_config(result["chosen"], result, yaml_path)
    print(f"chosen: {json.dumps(result['chosen'])}\nwrote {json_path} and {yaml_path}")


if __name__ == "__main__":
    main()
