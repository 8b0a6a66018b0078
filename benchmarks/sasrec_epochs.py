"""How SASRec's validation AvgHR grows with its epochs, and what an epoch costs: one
training run scored on the VALIDATION tasks (never test) every `--every` epochs.

It chose `baselines.sasrec.epochs` on ML-100K, and it compares the full softmax with a
sampled one (`--set baselines.sasrec.negatives=256`) on a large catalogue. Prints a point
per checkpoint and writes the curve as JSON.

    python benchmarks/sasrec_epochs.py --epochs 100 --every 10
    python benchmarks/sasrec_epochs.py --dataset amazon-games --limit 5000 --epochs 20 --every 2 \\
        --set baselines.sasrec.negatives=256 --out benchmarks/results/amazon-games/sasrec_epochs-neg256.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from starrec.config import load_config
from starrec.core import FitData, target_rank
from starrec.data.registry import dataset_slug
from starrec.data.splits import check_no_leak, fit_interactions
from starrec.evaluation.metrics import summarize
from starrec.evaluation.runner import machine_description
from starrec.experiment import load_task_set
from starrec.latent.sasrec import SASRec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--limit", type=int, default=None, help="score the first N valid tasks")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a config override, e.g. baselines.sasrec.negatives=256")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/sasrec_epochs.json (ml-100k), else "
                        "benchmarks/results/<dataset>/sasrec_epochs.json")
    args = parser.parse_args(argv)
    if args.every < 1 or args.epochs < 1:
        parser.error("--epochs and --every must be at least 1")
    slug = dataset_slug(args.dataset)
    results = Path(__file__).parent / "results"
    out = args.out or (results / "sasrec_epochs.json" if slug == "ml-100k"
                       else results / slug / "sasrec_epochs.json")

    config = load_config(args.config, args.overrides)
    task_set = load_task_set(args.dataset, config, split="valid", limit=args.limit)
    tasks = task_set.tasks
    interactions = fit_interactions(task_set.dataset, "valid")
    check_no_leak(tasks, interactions, where="SASRec's fit data")
    params = config.baselines.sasrec.model_dump() | {"epochs": args.epochs}
    model = SASRec(**params, progress=False)
    curve: list[dict] = []
    started = time.perf_counter()
    scoring = 0.0

    def on_epoch(epoch: int, fitted: SASRec) -> None:
        nonlocal scoring
        if epoch % args.every and epoch != args.epochs:
            return
        began = time.perf_counter()
        ranks = []
        for task, scores in zip(tasks, fitted.score_many(tasks)):
            ranks.append(target_rank(task.candidates, task.target, scores))
        metrics, _ = summarize(ranks, [True] * len(ranks), n_resamples=10)
        scoring += time.perf_counter() - began
        point = {"epoch": epoch, "valid_AvgHR": metrics["AvgHR"],
                 "valid_NDCG@10": metrics["NDCG@10"], "loss": round(fitted.losses[-1], 4),
                 "train_s": round(time.perf_counter() - started - scoring, 1)}
        curve.append(point)
        print(json.dumps(point), flush=True)

    model.fit(FitData(interactions, task_set.dataset.items, "valid"), on_epoch=on_epoch)
    best = max(curve, key=lambda p: p["valid_AvgHR"])
    payload = {"dataset": slug, "machine": machine_description(), "params": params,
               "overrides": args.overrides, "n_valid_tasks": len(tasks), "curve": curve,
               "train_s_per_epoch": round(curve[-1]["train_s"] / curve[-1]["epoch"], 2),
               "best": best}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"best: {best}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
