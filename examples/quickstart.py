"""Quick start of the library API: baselines, the cst evidence ranker and, optionally, a
distilled student on one task set, printed as one small table.

    python examples/quickstart.py                        # pop, sasrec, cst on ML-100K eval-200
    python examples/quickstart.py --student runs/student # and a student folder (slow on a CPU)
    python examples/quickstart.py --dataset DIR --set cst.content=false

Every step is a call of `starrec` that the CLI makes too: the task set is prepared from
the data and checked against it, the evidence store is built from the task set (never
from raw interactions, which would leak the test targets), and each system is made by
name and evaluated on the same tasks.
"""

from __future__ import annotations

import argparse
import sys
import time

import starrec
from starrec.config import load_config


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k", help="a dataset spec (default ml-100k)")
    parser.add_argument("--users", default="eval-200", choices=("all", "eval-200"),
                        help="the test users to evaluate (default eval-200)")
    parser.add_argument("--systems", default="pop,sasrec,cst",
                        help="comma-separated systems by name (default pop,sasrec,cst)")
    parser.add_argument("--sasrec-epochs", type=int, default=5,
                        help="SASRec epochs: few, so the example finishes in minutes")
    parser.add_argument("--student", default=None,
                        help="also evaluate this distilled student folder (star)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N tasks")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a config override, e.g. cst.content=false")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    config = load_config(None, [f"baselines.sasrec.epochs={args.sasrec_epochs}",
                                *args.overrides])
    tasks = starrec.load_task_set(args.dataset, config, users=args.users, limit=args.limit)
    print(f"{len(tasks)} {tasks.split} tasks of {args.dataset} ({args.users}) from {tasks.path}")
    store = starrec.evidence_store(tasks, config)  # built once, shared by cst and the student
    rows = []
    for name in [s.strip() for s in args.systems.split(",") if s.strip()]:
        start = time.perf_counter()
        rows.append((name, starrec.evaluate(name, tasks, config), time.perf_counter() - start))
    if args.student:
        start = time.perf_counter()
        student = starrec.make_system("star", tasks, config, args.student, store=store)
        rows.append(("star", starrec.evaluate(student, tasks, config),
                     time.perf_counter() - start))
    print(f"\n| system | n | AvgHR | HR@1 | NDCG@10 | valid % | seconds |\n|---|---|---|---|---|---|---|")
    for name, evaluation, seconds in rows:
        m = evaluation.metrics
        print(f"| {name} | {evaluation.result['n_tasks']} | {m['AvgHR']:.1f} | {m['HR@1']:.1f} "
              f"| {m['NDCG@10']:.1f} | {m['valid_rate']:.0f} | {seconds:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
