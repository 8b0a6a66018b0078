"""How many epochs SASRec needs on ML-100K, chosen on the VALIDATION tasks (never test).

Fits on what the validation split allows, scores the validation tasks after every
`--every` epochs, and prints AvgHR and seconds so far. The best epoch count goes into
configs/default.yaml (baselines.sasrec.epochs); the output is committed as
benchmarks/results/sasrec_epochs.json.

    python benchmarks/sasrec_epochs.py --epochs 100 --every 10
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from starrec.baselines.base import FitData
from starrec.latent.sasrec import SASRec
from starrec.config import load_config
from starrec.data.movielens import load_movielens_100k
from starrec.data.splits import fit_interactions
from starrec.data.tasks import build_split_tasks
from starrec.evaluation.metrics import complete_ranking, summarize
from starrec.evaluation.runner import machine_description


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "sasrec_epochs.json")
    args = parser.parse_args()

    dataset = load_movielens_100k("recbole")
    tasks = build_split_tasks(dataset, "valid")
    params = load_config().baselines.sasrec.model_dump() | {"epochs": args.epochs}
    model = SASRec(**params)
    curve = []
    started = time.perf_counter()

    def on_epoch(epoch: int, fitted: SASRec) -> None:
        if epoch % args.every:
            return
        ranks = []
        for task, scores in zip(tasks, fitted.score_many(tasks)):
            order = sorted(range(len(scores)), key=lambda i: -scores[i])
            ranking = complete_ranking([task.candidates[i] for i in order], task.candidates).ranking
            ranks.append(ranking.index(task.target) + 1)
        metrics, _ = summarize(ranks, [True] * len(ranks), n_resamples=10)
        point = {"epoch": epoch, "valid_AvgHR": metrics["AvgHR"], "valid_NDCG@10": metrics["NDCG@10"],
                 "loss": round(fitted.losses[-1], 4), "seconds": round(time.perf_counter() - started, 1)}
        curve.append(point)
        print(json.dumps(point), flush=True)

    model.fit(FitData(fit_interactions(dataset, "valid"), dataset.items, "valid"), on_epoch=on_epoch)
    best = max(curve, key=lambda p: p["valid_AvgHR"])
    payload = {"machine": machine_description(), "params": params, "n_valid_tasks": len(tasks),
               "curve": curve, "best": best}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"best: {best}")


if __name__ == "__main__":
    main()
