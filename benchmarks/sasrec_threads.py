"""What an epoch of SASRec costs with 1 or more torch threads, for the full softmax and a
sampled one, on a dataset's valid fit data (the store's and the baseline's training rows).

A model of hidden size 64 runs many small operations per batch, where the threads' own
coordination can cost more than it saves; this measures it instead of assuming. Run it
alone on the cores. Prints one line per case and writes JSON.

    python benchmarks/sasrec_threads.py --dataset amazon-games \\
        --out benchmarks/results/amazon-games/sasrec_threads.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from starrec.config import load_config
from starrec.core import FitData
from starrec.data.registry import dataset_slug
from starrec.data.splits import fit_interactions
from starrec.evaluation.runner import machine_description
from starrec.experiment import open_dataset
from starrec.latent.sasrec import SASRec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--threads", default="1,2", help="thread counts, e.g. 1,2")
    parser.add_argument("--negatives", default="full,1024",
                        help="'full' (the full softmax) or N popularity-drawn negatives")
    parser.add_argument("--epochs", type=int, default=2, help="epochs timed per case")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be at least 1")
    try:
        threads = [int(t) for t in args.threads.split(",")]
        negatives = [None if n == "full" else int(n) for n in args.negatives.split(",")]
    except ValueError:
        parser.error("--threads takes integers, --negatives 'full' or integers")

    config = load_config(args.config, [])
    dataset, _ = open_dataset(args.dataset)
    interactions = fit_interactions(dataset, "valid")
    fit = FitData(interactions, dataset.items, "valid")
    base = config.baselines.sasrec.model_dump()
    cases = []
    for negative in negatives:
        for count in threads:
            params = base | {"epochs": args.epochs, "negatives": negative,
                             "negative_sampling": "uniform" if negative is None else "popularity"}
            model = SASRec(**params, threads=count, progress=False)
            started = time.perf_counter()
            model.fit(fit)
            seconds = (time.perf_counter() - started) / args.epochs
            case = {"negatives": negative or "full softmax", "threads": count,
                    "s_per_epoch": round(seconds, 2), "loss": round(model.losses[-1], 4)}
            cases.append(case)
            print(json.dumps(case), flush=True)
    payload = {"dataset": dataset_slug(args.dataset), "machine": machine_description(),
               "rows": len(interactions), "params": base, "epochs_timed": args.epochs,
               "cases": cases}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
