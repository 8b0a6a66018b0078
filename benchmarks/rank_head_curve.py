"""A ranking head's valid curve paired with the evidence ranker and SASRec on the same
valid tasks (issue 15: development on valid only).

`star distill rank` writes, at each evaluation point, the head's rank of the target on
each of the first `rank.eval_tasks` valid-200 tasks (`loss.json`). This script runs the
reference systems on valid-200 (`cst`: the evidence ranker learned on the train tasks;
`sasrec`), keeps their results JSON and per-task files, and pairs every point of the
curve with each of them on the same tasks: mean AvgHR difference, paired bootstrap 95%
interval, wins / ties / losses. Writes `<dataset>-rank-head-valid-curve.json` and a
markdown table under `--out-dir`. No test task is read.

    python benchmarks/rank_head_curve.py --head runs/rank-full
    python benchmarks/rank_head_curve.py --head DIR --dataset tiny-folder --out-dir /tmp/t
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from starrec.config import load_config
from starrec.data.registry import dataset_slug
from starrec.evaluation.paired import read_task_rows
from starrec.evaluation.report import load_result
from starrec.experiment import evaluate, load_task_set
from starrec.training.rank import avg_hr
from starrec.training.reward import paired_ranks

ROOT = Path(__file__).resolve().parents[1]
REFERENCES = ("cst", "sasrec")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", type=Path, required=True,
                        help="a `star distill rank --out` folder (its loss.json)")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--config", type=Path,
                        default=ROOT / "configs" / "baselines-tuned-ml-100k.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="default: benchmarks/results/<dataset>/rank-head")
    args = parser.parse_args(argv)
    if not (args.head / "loss.json").is_file():
        parser.error(f"--head {args.head}: no loss.json (not a `star distill rank` folder)")
    return args


def reference_ranks(system: str, args: argparse.Namespace, out_dir: Path, slug: str
                    ) -> dict[str, int]:
    """The target's rank per valid-200 task id under `system`, run once and kept."""
    path = out_dir / f"{slug}-{system}-valid-200.json"
    if not path.exists():
        config = load_config(args.config, args.overrides)
        evaluate(system, load_task_set(args.dataset, config, users="valid-200"),
                 config).write(path)
    print(f"{system}: valid-200 AvgHR {load_result(path)['metrics']['AvgHR']:.1f}", flush=True)
    return {row["task_id"]: int(row["rank"]) for row in read_task_rows(path)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    slug = dataset_slug(args.dataset)
    out_dir = args.out_dir or ROOT / "benchmarks" / "results" / slug / "rank-head"
    out_dir.mkdir(parents=True, exist_ok=True)
    curve = json.loads((args.head / "loss.json").read_text(encoding="utf-8"))
    points = [p for p in curve["eval"] if p.get("ranks")]
    if not points:
        raise SystemExit(f"{args.head}/loss.json has no valid point with per-task ranks")
    config = load_config(args.config, args.overrides)
    tasks = load_task_set(args.dataset, config, users="valid-200").tasks
    n = len(points[0]["ranks"])
    ids = [t.task_id for t in tasks[:n]]  # the hook scores the first n, in file order
    references = {name: reference_ranks(name, args, out_dir, slug) for name in REFERENCES}
    rows = []
    for point in points:
        if len(point["ranks"]) != n:
            continue
        row = {"step": point["step"], "AvgHR": round(point["AvgHR"], 2),
               "HR@1": round(point["HR@1"], 2), "n_tasks": n}
        for name, ranks in references.items():
            row[f"vs_{name}"] = paired_ranks(point["ranks"], [ranks[i] for i in ids])
        rows.append(row)
    reference_hr = {name: round(avg_hr([ranks[i] for i in ids]), 2)
                    for name, ranks in references.items()}
    head = args.head.resolve()
    summary = {"head": str(head.relative_to(ROOT)) if head.is_relative_to(ROOT) else head.name,
               "dataset": slug, "n_tasks": n, "references_AvgHR": reference_hr,
               "train": curve["train"], "points": rows}
    (out_dir / f"{slug}-rank-head-valid-curve.json").write_text(
        json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    lines = [f"| step | valid AvgHR (n={n}) | HR@1 | "
             + " | ".join(f"paired vs {name} [95% CI], W/T/L" for name in REFERENCES) + " |",
             "|---|---|---|" + "---|" * len(REFERENCES)]
    for row in rows:
        cells = [f"{row[f'vs_{name}']['difference']:+.1f} [{row[f'vs_{name}']['ci95'][0]:+.1f}, "
                 f"{row[f'vs_{name}']['ci95'][1]:+.1f}], {row[f'vs_{name}']['wins']} / "
                 f"{row[f'vs_{name}']['ties']} / {row[f'vs_{name}']['losses']}"
                 for name in REFERENCES]
        lines.append(f"| {row['step']} | {row['AvgHR']:.1f} | {row['HR@1']:.1f} | "
                     + " | ".join(cells) + " |")
    text = "\n".join(lines)
    (out_dir / f"{slug}-rank-head-valid-curve.md").write_text(
        f"# {slug}: the ranking head's valid curve, paired with "
        f"{' and '.join(REFERENCES)} on the same {n} valid-200 tasks\n\n"
        f"Head: {summary['head']}. References on these tasks: "
        + ", ".join(f"{k} {v:.1f}" for k, v in reference_hr.items())
        + ". Written by benchmarks/rank_head_curve.py.\n\n" + text + "\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
