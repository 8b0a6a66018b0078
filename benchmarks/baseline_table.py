"""Every baseline and both evidence rankers on one dataset's test tasks, in one table with
95% intervals and paired differences to SASRec (issue 16).

Systems: random, presented, pop, itemknn, als, sasrec, cst-manual (hand-set weights),
cst (weights learned on the valid tasks, latent signals on) and cst without the latent
signals (`cst.latent=false`, its own store). With `--config` (the output of
`benchmarks/tune_baselines.py`) the baselines run with the settings chosen on the valid
tasks. Each system is fitted once and run on all test users, and eval-200 is the same run
restricted to its users (`starrec.evaluate_with_subset`, as `star pipeline` does); both
are written as results JSON with their per-task files under
benchmarks/results/<dataset>/, and kept: a rerun evaluates only what is missing
(`--fresh` all again). The table goes to benchmarks/results/<dataset>/<dataset>-table.md.

    python benchmarks/baseline_table.py --dataset ml-100k --config configs/baselines-tuned-ml-100k.yaml
    python benchmarks/baseline_table.py --dataset amazon-games \\
        --config configs/baselines-tuned-amazon-games.yaml
    python benchmarks/baseline_table.py --dataset tiny-folder --out-dir /tmp/t
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from starrec.config import load_config
from starrec.data.registry import dataset_slug
from starrec.evaluation.paired import compare_rows, read_task_rows
from starrec.evaluation.report import load_result
from starrec.experiment import Evaluation, evaluate_with_subset, load_task_set

ROOT = Path(__file__).resolve().parents[1]
# (file name, system, config overrides, what the table calls it)
SYSTEMS = (
    ("random", "random", [], "random"),
    ("presented", "presented", [], "presented (task file's order)"),
    ("pop", "pop", [], "pop"),
    ("itemknn", "itemknn", [], "itemknn"),
    ("als", "als", [], "als"),
    ("sasrec", "sasrec", [], "sasrec"),
    ("cst-manual", "cst-manual", [], "cst-manual (hand-set weights)"),
    ("cst", "cst", [], "cst (learned on valid, latent signals)"),
    ("cst-nolatent", "cst", ["cst.latent=false"], "cst (learned on valid, no latent signals)"),
)
REFERENCE = "sasrec"
USERS = ("all", "eval-200")  # the test tasks of every user; eval-200 is part of them


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--config", type=Path, default=None,
                        help="a config file (the tuned baselines' settings)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a config override, as star --set section.key=value")
    parser.add_argument("--systems", nargs="+", default=[s[0] for s in SYSTEMS],
                        choices=[s[0] for s in SYSTEMS])
    parser.add_argument("--out-dir", type=Path, default=None,
                        help="default: benchmarks/results/<dataset>")
    parser.add_argument("--fresh", action="store_true", help="evaluate every system again")
    return parser.parse_args(argv)


def fmt(value: float) -> str:
    return f"{value:.1f}"


def paired_cell(path: Path, reference: Path | None) -> str:
    """`path`'s paired AvgHR difference to `reference` on their shared tasks: mean
    [95% interval], wins / ties / losses."""
    if reference is None:
        return "n/a"
    if reference == path:
        return "(the reference)"
    c = compare_rows(read_task_rows(path), read_task_rows(reference)).metric("AvgHR")
    return f"{c.difference:+.1f} [{c.ci95[0]:+.1f}, {c.ci95[1]:+.1f}], {c.wins} / {c.ties} / {c.losses}"


def evaluate_or_keep(name: str, paths: dict[str, Path], fresh: bool,
                     run: Callable[[], Sequence[Evaluation]]) -> None:
    """Writes `run()`'s evaluations to `paths` (users -> results JSON, in order) unless
    all of them exist and `fresh` is off; prints what it did."""
    if not fresh and all(path.exists() for path in paths.values()):
        print(f"{name}: kept {', '.join(p.name for p in paths.values())}", flush=True)
        return
    started = time.perf_counter()
    for evaluation, path in zip(run(), paths.values()):
        evaluation.write(path)
    print(f"{name}: " + ", ".join(
        f"test {users} AvgHR {load_result(path)['metrics']['AvgHR']:.1f}"
        for users, path in paths.items()) + f" ({time.perf_counter() - started:.0f} s)",
        flush=True)


def table(rows: list[tuple[str, str, Path]], references: dict[str, Path]) -> str:
    """One line per (system, users): metrics, interval, paired AvgHR difference to SASRec
    on the same tasks with its interval and win / tie / loss."""
    lines = ["| system | tasks | n | AvgHR [95% CI] | HR@1 | HR@5 | NDCG@10 | MRR | "
             f"paired AvgHR vs {REFERENCE} [95% CI], W/T/L | median ms/task |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for label, users, path in rows:
        result = load_result(path)
        m, ci = result["metrics"], result["ci95"]["AvgHR"]
        paired = paired_cell(path, references.get(users))
        seconds = result["efficiency"].get("median_s")
        lines.append(f"| {label} | test {users} | {result['n_tasks']} | {fmt(m['AvgHR'])} "
                     f"[{fmt(ci[0])}, {fmt(ci[1])}] | {fmt(m['HR@1'])} | {fmt(m['HR@5'])} | "
                     f"{fmt(m['NDCG@10'])} | {fmt(m['MRR'])} | {paired} | "
                     f"{'' if seconds is None else f'{1000 * seconds:.2f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    slug = dataset_slug(args.dataset)
    out_dir = args.out_dir or ROOT / "benchmarks" / "results" / slug
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, Path]] = []
    references: dict[str, Path] = {}
    for file_name, system, overrides, label in SYSTEMS:
        if file_name not in args.systems:
            continue
        paths = {users: out_dir / f"{slug}-{file_name}-test-{users}.json" for users in USERS}

        def run() -> tuple:  # called at once, in this iteration
            config = load_config(args.config, [*args.overrides, *overrides])
            sets = [load_task_set(args.dataset, config, users=users) for users in USERS]
            return evaluate_with_subset(system, *sets, config)

        evaluate_or_keep(file_name, paths, args.fresh, run)
        for users, path in paths.items():
            rows.append((label, users, path))
            if file_name == REFERENCE:
                references[users] = path
    rows.sort(key=lambda row: USERS.index(row[1]))  # all users first, then eval-200
    text = table(rows, references)
    config = args.config
    shown = (config.resolve().relative_to(ROOT) if config and config.resolve().is_relative_to(ROOT)
             else config or "the defaults")
    source = f"Settings: {shown}" + (f", {' '.join(args.overrides)}" if args.overrides else "") + "."
    (out_dir / f"{slug}-table.md").write_text(
        f"# {slug}: baselines and evidence rankers on the test tasks\n\n{source} Written by "
        f"benchmarks/baseline_table.py.\n\n{text}\n", encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
