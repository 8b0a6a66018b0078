"""How much a GRPO group can teach a student: the reward spread of its sampled passes on
train prompts, per sampling temperature (issue 14, the CPU preset's temperature and group
size).

GRPO's advantage is a pass's reward minus its group's mean: a group whose passes all
earned the same reward teaches nothing. A student that returns the order it is shown at
every temperature earns one outcome per prompt, however many passes it samples. For each
temperature this samples `--group` passes (seeded as `star distill grpo` seeds them) on
each of `--prompts` train prompts drawn by difficulty as GRPO draws them, through the
rollout code GRPO itself runs (CST tool calls answered from the train store), and
reports:

- `spread_share[G]`: the share of groups of G passes whose rewards are not all equal, for
  every G up to `--group` (for G below it, exactly: the mean over all G-subsets of each
  sampled group), and the same for the outcome alone;
- distinct rankings per group, the share of passes that return the shown order, the share
  whose first label is the first shown, the format rate (well formed as written), the
  mean reward and outcome, and the seconds per pass (median).

Train prompts only (no valid or test target is read). Results JSON and a per-task file
(one row per pass). Passes are appended to the per-task file as they finish, and a rerun
with the same settings samples only the missing ones (`--fresh` starts over):

    python benchmarks/grpo_spread.py --model runs/issue14/sft --temperatures 0.7,1.0

With `--set grpo.explore_ranking=T` the lists are sampled as GRPO's exploration samples
them (under the permutation mask at T), to see whether it gives the groups their spread.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from math import comb
from pathlib import Path
from typing import Any

import numpy as np

from starrec.config import load_config
from starrec.data.prepared import load_task_set, prepared_tasks
from starrec.data.registry import dataset_slug, load_dataset
from starrec.llm.card import read_model_card
from starrec.progress import progress_bar
from starrec.training.grpo import student_format
from starrec.training.grpo_data import draw_prompts, split_store
from starrec.training.reward import outcome_reward, total_reward
from starrec.training.rollout import PolicyModel, pass_seed, run_passes
from starrec.training.sft import load_base, resolve_base_model

ROOT = Path(__file__).resolve().parents[1]


def bench_parser(description: str, temperatures: str, temperatures_help: str,
                 out_name: str) -> argparse.ArgumentParser:
    """The options the GRPO benchmarks share: the student, data, config, temperatures,
    prompts, output and resume."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True,
                        help="the student GRPO would start from (a student folder or model spec)")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--config", type=Path, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a config override, as star --set section.key=value")
    parser.add_argument("--temperatures", default=temperatures, help=temperatures_help)
    parser.add_argument("--prompts", type=int, default=10,
                        help="train prompts, drawn by grpo.difficulty_ratio")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"default: benchmarks/results/<dataset>/{out_name}")
    parser.add_argument("--fresh", action="store_true",
                        help="run everything again instead of resuming")
    return parser


def parse_bench_args(parser: argparse.ArgumentParser, argv: list[str] | None,
                     per_prompt: str) -> argparse.Namespace:
    """Parse and check: temperatures above 0, a prompt at least, and at least 2 of the
    `per_prompt` option (a spread needs two samples)."""
    args = parser.parse_args(argv)
    args.temperatures = parse_temperatures(parser, args.temperatures)
    if args.prompts < 1 or getattr(args, per_prompt) < 2:
        parser.error(f"--prompts must be at least 1 and --{per_prompt} at least 2")
    return args


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__.splitlines()[0], "0.7,1.0", "comma-separated sampling temperatures",
                          "grpo_spread.json")
    parser.add_argument("--group", type=int, default=4, help="passes per prompt")
    return parse_bench_args(parser, argv, "group")


def spread_share(groups: list[list[float]], size: int) -> float:
    """The share of `size`-subsets of the groups whose values are not all equal, over all
    groups (each group weighted alike): 1 - sum over values of C(count, size) / C(n, size)."""
    shares = []
    for values in groups:
        counts = [values.count(v) for v in set(values)]
        shares.append(1 - sum(comb(c, size) for c in counts) / comb(len(values), size))
    return float(np.mean(shares))


def summarise(passes: list[dict[str, Any]], group: int) -> dict[str, Any]:
    by_task: dict[str, list[dict[str, Any]]] = {}
    for row in passes:
        by_task.setdefault(row["task_id"], []).append(row)
    rewards = [[r["reward"] for r in rows] for rows in by_task.values()]
    outcomes = [[r["outcome"] for r in rows] for rows in by_task.values()]
    sizes = range(2, group + 1)
    return {
        "prompts": len(by_task), "passes": len(passes),
        "spread_share": {g: round(spread_share(rewards, g), 4) for g in sizes},
        "outcome_spread_share": {g: round(spread_share(outcomes, g), 4) for g in sizes},
        "distinct_rankings_per_group": float(np.mean(
            [len({tuple(r["ranking"]) for r in rows}) for rows in by_task.values()])),
        "shown_order_share": float(np.mean([r["shown_order"] for r in passes])),
        "first_shown_first_share": float(np.mean([r["first_is_first_shown"] for r in passes])),
        "format_rate": float(np.mean([r["well_formed"] for r in passes])),
        "reward": float(np.mean([r["reward"] for r in passes])),
        "outcome": float(np.mean([r["outcome"] for r in passes])),
        "tool_calls": float(np.mean([r["tool_calls"] for r in passes])),
        "seconds_per_pass_median": float(np.median([r["seconds"] for r in passes])),
    }


def read_rows(rows_file: Path, identity: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows an earlier run with the same settings wrote (a last line cut by a kill is
    dropped: its pass is run again); SystemExit when the file holds another run's."""
    if not rows_file.is_file():
        return []
    lines = [line for line in rows_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue
            raise SystemExit(f"{rows_file}: line {number} is not JSON; --fresh to replace the file")
        if any(row.get(k) != v for k, v in identity.items()):
            raise SystemExit(f"{rows_file} holds rows of other settings; --fresh to replace them")
        rows.append(row)
    return rows


def start_rows(rows_file: Path, identity: dict[str, Any], fresh: bool) -> list[dict[str, Any]]:
    """The rows to resume from (none with `fresh`); the file is emptied when there are none
    (a cut line alone would otherwise stay in front of the new rows)."""
    rows = [] if fresh else read_rows(rows_file, identity)
    rows_file.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        rows_file.write_text("", encoding="utf-8")
    else:
        rows_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return rows


def order_facts(ranking: list[str], shown: list[str]) -> dict[str, bool]:
    """Whether a ranking is the order shown, and whether it puts the first shown first."""
    return {"shown_order": ranking == shown,
            "first_is_first_shown": bool(ranking) and ranking[0] == shown[0]}


@dataclass
class Setup:
    """What a GRPO benchmark samples with: the config, the train store, the prompts drawn
    as GRPO draws them, the student's format and card values, and its live model."""

    cfg: Any
    store: Any
    prompts: Any
    card: Any
    fmt: Any
    plans: list[str]
    cap: int | None
    sampler: PolicyModel


def load_setup(args: argparse.Namespace) -> Setup:
    cfg = load_config(args.config, args.overrides)
    settings = cfg.grpo
    loaded = load_dataset(args.dataset, cfg.data.source, cfg.data.columns)
    folder = prepared_tasks(args.dataset, cfg.data.source, cfg.data.seed, dataset=loaded)
    train = load_task_set(folder / "train.jsonl", loaded)
    store = split_store(loaded, train, cfg.cst, name=args.dataset)
    prompts = draw_prompts(train, store, args.prompts, settings.difficulty_ratio,
                           settings.difficulty_bounds, settings.seed)
    path = resolve_base_model(args.model)
    card = read_model_card(path) if Path(path).is_dir() else None
    model, tokenizer = load_base(path)
    return Setup(cfg=cfg, store=store, prompts=prompts, card=card,
                 fmt=student_format(card, settings),
                 plans=card.plan_choices if card is not None else [],
                 cap=card.max_reflection_tokens if card is not None else None,
                 sampler=PolicyModel(model, tokenizer))


def parse_temperatures(parser: argparse.ArgumentParser, text: str) -> list[float]:
    try:
        temperatures = [float(t) for t in text.split(",")]
    except ValueError:
        parser.error(f"--temperatures {text!r}: not comma-separated numbers")
    if any(t <= 0 for t in temperatures):
        parser.error("--temperatures must be above 0 (GRPO samples)")
    return temperatures


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup = load_setup(args)
    cfg, store, prompts, fmt, sampler = (setup.cfg, setup.store, setup.prompts, setup.fmt,
                                         setup.sampler)
    settings, card = cfg.grpo, setup.card
    out = args.out or ROOT / "benchmarks" / "results" / dataset_slug(args.dataset) / "grpo_spread.json"
    rows_file = out.with_suffix(".tasks.jsonl")
    identity = {"model": args.model, "dataset": args.dataset, "overrides": args.overrides,
                "config": str(args.config) if args.config else None,
                "group": args.group, "prompts": [t.task_id for t in prompts.tasks]}
    done = {(r["temperature"], r["task_id"], r["seed"]): r
            for r in start_rows(rows_file, identity, args.fresh)}
    summary: dict[str, Any] = {}
    total = len(args.temperatures) * len(prompts.tasks) * args.group
    bar = progress_bar("grpo-spread", total=total, unit="pass", initial=len(done))
    for temperature in args.temperatures:
        student = cfg.student.model_copy(update={
            "temperature": temperature, "max_new_tokens": settings.max_completion_length})
        mine = []
        for task in prompts.tasks:
            for i in range(args.group):
                seed = pass_seed(settings.seed, 0, i)
                key = (temperature, task.task_id, seed)
                if key in done:
                    mine.append(done[key])
                    continue
                rollout, = run_passes(sampler, [(task, seed)], store, fmt, student,
                                      plan_choices=setup.plans, reflection_cap=setup.cap,
                                      learn_masked=settings.learn_masked,
                                      explore_ranking=settings.explore_ranking)
                ranking = rollout.answer.completed.ranking
                outcome = outcome_reward(rollout.rank)
                row = {
                    **identity, "temperature": temperature, "task_id": task.task_id,
                    "difficulty": prompts.difficulty[task.task_id],
                    "cst_rank": prompts.ranks[task.task_id], "seed": rollout.seed,
                    "rank": rollout.rank, "outcome": outcome,
                    "well_formed": rollout.verdict.well_formed,
                    "format_reasons": list(rollout.verdict.reasons),
                    "reward": total_reward(rollout.rank, rollout.verdict.well_formed),
                    "ranking": ranking, **order_facts(ranking, list(task.candidates)),
                    "tool_calls": len(rollout.answer.tool_calls),
                    "seconds": round(rollout.seconds, 2)}
                with rows_file.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(row) + "\n")
                mine.append(row)
                bar.update(1)
        summary[str(temperature)] = summarise(mine, args.group)
        print(f"temperature {temperature}: " + json.dumps(summary[str(temperature)]))
    bar.close()
    result = {"model": args.model, "card_stage": card.stage if card else None,
              "dataset": args.dataset, "group": args.group, "prompts": prompts.report,
              "candidate_order": fmt.candidate_order, "overrides": args.overrides,
              "max_completion_length": settings.max_completion_length,
              "by_temperature": summary}
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
