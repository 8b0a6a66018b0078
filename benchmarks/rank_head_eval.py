"""The ranking head against the evidence it reads and the best baseline, in one run on the
same test tasks (issue 15).

Systems, each run once on all test users with eval-200 as the same run restricted to its
users (`starrec.evaluate_with_subset`): `cst` (the learned evidence ranker, with and
without the latent signals), `cst-manual` (hand-set weights), `sasrec`, the head in the
fast mode, the head with position debiasing (`--debias K` shuffles, on eval-200 unless
`--debias-users all`), and optionally a generation student (`--student DIR`, slow: its
records resume). Results JSON and per-task files go under `--out-dir`; the table (AvgHR
with its interval, paired differences to cst, to SASRec, to cst-manual and to cst without
the latent signals, with win / tie / loss, the rate of rankings equal to the shown order,
median and p95 seconds per task) to `<out-dir>/<dataset>-rank-head-table.md`. A rerun
evaluates only what is missing.

    python benchmarks/rank_head_eval.py --head runs/rank-full
    python benchmarks/rank_head_eval.py --head runs/rank-full --debias 5 --student runs/student
    python benchmarks/rank_head_eval.py --dataset tiny-folder --head DIR --out-dir /tmp/t
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from baseline_table import evaluate_or_keep, paired_cell  # benchmarks/, beside this script
from starrec.config import load_config
from starrec.data.registry import dataset_slug
from starrec.evaluation.report import load_result
from starrec.experiment import evaluate, evaluate_with_subset, load_task_set

ROOT = Path(__file__).resolve().parents[1]
USERS = ("all", "eval-200")
# the evidence ranker over all the head reads (learned), the best baseline, the hand-set
# ranker (the issue's first target is measured against it) and the learned ranker over the
# count evidence alone (what the hand-set one reads)
REFERENCES = ("cst", "sasrec", "cst-manual", "cst-nolatent")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", type=Path, required=True,
                        help="a ranking-head folder (`star distill rank --out`)")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--config", type=Path,
                        default=ROOT / "configs" / "baselines-tuned-ml-100k.yaml",
                        help="the settings of the baseline table (tuned baselines)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a config override, as star --set section.key=value")
    parser.add_argument("--debias", type=int, default=3,
                        help="shuffles of the debiased head row (1: no such row)")
    parser.add_argument("--debias-users", choices=USERS, default="eval-200",
                        help="the debiased row costs K forward passes a task: eval-200 only "
                             "by default")
    parser.add_argument("--student", type=Path, default=None,
                        help="a generation student folder, evaluated on the same tasks")
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="default: benchmarks/results/<dataset>/rank-head")
    parser.add_argument("--records-dir", type=Path, default=ROOT / "runs" / "rank-head-eval",
                        help="where the LLM systems' records are kept (resume)")
    parser.add_argument("--fresh", action="store_true", help="evaluate every system again")
    args = parser.parse_args(argv)
    if not args.head.is_dir():
        parser.error(f"--head {args.head}: not a folder")
    if args.debias < 1:
        parser.error("--debias must be at least 1")
    return args


def systems(args: argparse.Namespace
            ) -> list[tuple[str, str, list[str], Path | None, str, tuple[str, ...]]]:
    """(file name, system, overrides, model, what the table calls it, users), in table
    order."""
    # the head's evidence holds the latent models' ranks; the hand-set weights read none,
    # so the learned ranker without them is the like-for-like reading of the count evidence
    rows = [("cst", "cst", [], None, "cst (learned on valid, latent signals)", USERS),
            ("cst-nolatent", "cst", ["cst.latent=false"], None,
             "cst (learned on valid, no latent signals)", USERS),
            ("cst-manual", "cst-manual", [], None,
             "cst-manual (hand-set weights, no latent signals)", USERS),
            ("sasrec", "sasrec", [], None, "sasrec", USERS),
            ("head-fast", "star", ["student.mode=fast"], args.head, "ranking head, fast", USERS)]
    if args.debias > 1:
        users = USERS if args.debias_users == "all" else ("eval-200",)
        rows.append((f"head-fast-debias{args.debias}", "star",
                     ["student.mode=fast", f"student.debias_shuffles={args.debias}"], args.head,
                     f"ranking head, fast, mean of {args.debias} shuffles", users))
    if args.student is not None:
        rows.append(("student-generate", "star", ["student.mode=generate"], args.student,
                     "generation student", USERS))
    return rows


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "" if value is None else format(value, spec)


def table(rows: list[tuple[str, str, Path]], references: dict[tuple[str, str], Path]) -> str:
    """One line per (system, users)."""
    paired = " | ".join(f"paired AvgHR vs {name} [95% CI], W/T/L" for name in REFERENCES)
    lines = [f"| system | tasks | n | AvgHR [95% CI] | HR@1 | NDCG@10 | {paired} | shown order "
             "kept % | median s/task | p95 s/task |",
             "|---|---|---|---|---|---|" + "---|" * len(REFERENCES) + "---|---|---|"]
    for label, users, path in rows:
        result = load_result(path)
        m, ci, eff = result["metrics"], result["ci95"]["AvgHR"], result["efficiency"]
        cells = [paired_cell(path, references[(name, users)]) for name in REFERENCES]
        lines.append(
            f"| {label} | test {users} | {result['n_tasks']} | {fmt(m['AvgHR'])} "
            f"[{fmt(ci[0])}, {fmt(ci[1])}] | {fmt(m['HR@1'])} | {fmt(m['NDCG@10'])} | "
            f"{' | '.join(cells)} | {fmt(m.get('shown_order_identity'))} | "
            f"{fmt(eff.get('median_s'), '.3f')} | {fmt(eff.get('p95_s'), '.3f')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    slug = dataset_slug(args.dataset)
    out_dir = args.out_dir or ROOT / "benchmarks" / "results" / slug / "rank-head"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, Path]] = []
    references: dict[tuple[str, str], Path] = {}
    for file_name, system, overrides, model, label, on in systems(args):
        paths = {users: out_dir / f"{slug}-{file_name}-test-{users}.json" for users in on}

        def run() -> tuple:  # called at once, in this iteration
            config = load_config(args.config, [*args.overrides, *overrides])
            sets = [load_task_set(args.dataset, config, users=users) for users in on]
            records = None
            if model is not None:
                args.records_dir.mkdir(parents=True, exist_ok=True)
                records = args.records_dir / f"{slug}-{file_name}.records.jsonl"
                if args.fresh:
                    records.unlink(missing_ok=True)
            if len(sets) == 2:
                return evaluate_with_subset(system, *sets, config, model=model, records=records)
            return (evaluate(system, sets[0], config, model=model, records=records),)

        evaluate_or_keep(file_name, paths, args.fresh, run)
        for users, path in paths.items():
            rows.append((label, users, path))
            if file_name in REFERENCES:
                references[(file_name, users)] = path
    rows.sort(key=lambda row: USERS.index(row[1]))
    text = table(rows, references)
    head = args.head.resolve()
    shown_head = head.relative_to(ROOT) if head.is_relative_to(ROOT) else head.name
    (out_dir / f"{slug}-rank-head-table.md").write_text(
        f"# {slug}: the ranking head against the evidence it reads, on the test tasks\n\n"
        f"Head: {shown_head}. Written by benchmarks/rank_head_eval.py: each system evaluated "
        f"once on these tasks (a rerun keeps the results it finds; each JSON's provenance "
        f"gives the code that wrote it); paired differences on the same tasks.\n\n{text}\n",
        encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
