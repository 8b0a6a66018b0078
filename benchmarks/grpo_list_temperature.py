"""How far GRPO's exploration of orders moves a student's list from the order it is
shown, per list temperature (issue 14, the value of `grpo.explore_ranking`).

`grpo.explore_ranking: T` samples a rollout's `<recommend>` list under the permutation
mask at temperature T. A student that copies the shown order puts nearly all of each
label's probability on the next shown label, so at T = 1 the sampled list is still the
shown order, and a group of passes still earns one outcome. This runs one rollout per
train prompt (drawn by difficulty as GRPO draws them, at the rollout temperature,
without exploration, CST tool calls answered from the train store), keeps its text up to
the `<recommend>` opening (where a repair would start the list), and samples `--samples`
lists there under the mask at each `--temperatures` value (the same seeds at each
temperature and on every prompt: common random numbers). It reports per temperature:

- the share of lists that are the shown order, and whose first label is the first shown;
- Kendall's tau of a list to the shown order (mean);
- `outcome_spread_share`: the share of prompts whose sampled lists do not all earn one
  outcome tier (what a group of `--samples` exploring passes on that prefix would spread);
- the mean outcome and the seconds per list (median).

Train prompts only. Results JSON and a per-task file (one row per prompt, its lists at
every temperature); rows are appended as prompts finish, and a rerun with the same
settings runs only the missing prompts (`--fresh` starts over):

    python benchmarks/grpo_list_temperature.py --model runs/issue14/sft --temperatures 1,2,3,5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from grpo_spread import bench_parser, load_setup, order_facts, parse_bench_args, start_rows

from starrec.data.registry import dataset_slug
from starrec.evaluation.metrics import kendall_tau
from starrec.inference.student import Student, list_budget, list_opening
from starrec.llm.base import PermutationConstraint
from starrec.progress import progress_bar
from starrec.trajectories.format import RECOMMEND, close_tag, open_tag, parse_student_output
from starrec.trajectories.serialize import format_labels
from starrec.training.reward import outcome_reward, target_rank
from starrec.training.rollout import pass_seed, run_passes

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__.splitlines()[0], "1,2,3,5", "comma-separated list temperatures",
                          "grpo_list_temperature.json")
    parser.add_argument("--samples", type=int, default=4, help="lists per prompt and temperature")
    return parse_bench_args(parser, argv, "samples")


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarise(rows: list[dict[str, Any]], temperature: float) -> dict[str, Any]:
    lists = [s for row in rows for s in row["lists"][str(temperature)]]
    tiers = [{s["outcome"] for s in row["lists"][str(temperature)]} for row in rows]
    return {
        "prompts": len(rows), "lists": len(lists),
        "shown_order_share": float(np.mean([s["shown_order"] for s in lists])),
        "first_shown_first_share": float(np.mean([s["first_is_first_shown"] for s in lists])),
        "tau_to_shown": _mean([s["tau"] for s in lists if s["tau"] is not None]),
        "outcome_spread_share": float(np.mean([len(t) > 1 for t in tiers])),
        "outcome": float(np.mean([s["outcome"] for s in lists])),
        "seconds_per_list_median": float(np.median([s["seconds"] for s in lists])),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup = load_setup(args)
    settings, store, prompts, fmt, sampler = (setup.cfg.grpo, setup.store, setup.prompts,
                                              setup.fmt, setup.sampler)
    student = setup.cfg.student.model_copy(update={
        "temperature": settings.temperature, "max_new_tokens": settings.max_completion_length})
    runner = Student(sampler, store, fmt, student)  # what the prompt shows, as rollouts show it
    out = args.out or (ROOT / "benchmarks" / "results" / dataset_slug(args.dataset)
                       / "grpo_list_temperature.json")
    rows_file = out.with_suffix(".tasks.jsonl")
    identity = {"model": args.model, "dataset": args.dataset, "overrides": args.overrides,
                "config": str(args.config) if args.config else None,
                "samples": args.samples, "temperatures": args.temperatures,
                "prompts": [t.task_id for t in prompts.tasks]}
    done = {r["task_id"]: r for r in start_rows(rows_file, identity, args.fresh)}
    # the same seeds on every prompt and at every temperature (common random numbers): a
    # temperature's lists are paired with another's, and a seed's draws recur across
    # prompts, so one seed can depart on most of them
    seeds = [pass_seed(settings.seed, 0, i) for i in range(args.samples)]
    bar = progress_bar("list-temperature", total=len(prompts.tasks), unit="prompt",
                       initial=len(done))
    rows = []
    for task in prompts.tasks:
        if task.task_id in done:
            rows.append(done[task.task_id])
            continue
        rollout, = run_passes(sampler, [(task, seeds[0])], store, fmt, student,
                              plan_choices=setup.plans, reflection_cap=setup.cap,
                              learn_masked=settings.learn_masked)
        shown = runner.shown(task)
        kept, opening = list_opening(rollout.answer.text)
        prefix = runner.prompt(task) + kept + opening
        n = len(shown.candidates)
        labels = format_labels(fmt, n)
        lists: dict[str, list[dict[str, Any]]] = {}
        for temperature in args.temperatures:
            mine = lists.setdefault(str(temperature), [])
            for seed in seeds:
                completion = sampler.complete(
                    prefix, max_tokens=list_budget(n), temperature=temperature,
                    constraint=PermutationConstraint(n, style=fmt.labels), seed=seed)
                parsed = parse_student_output(opening + completion.text + close_tag(RECOMMEND),
                                              labels)
                ranking = Student.item_ranking(parsed, shown) or []
                rank = target_rank(ranking, task.target)
                mine.append({
                    "seed": seed, "rank": rank, "outcome": outcome_reward(rank),
                    **order_facts(ranking, list(shown.candidates)),
                    "tau": (kendall_tau(ranking, shown.candidates)
                            if sorted(ranking) == sorted(shown.candidates) else None),
                    "ranking": ranking, "seconds": round(completion.seconds, 2)})
        row = {**identity, "task_id": task.task_id,
               "difficulty": prompts.difficulty[task.task_id],
               "cst_rank": prompts.ranks[task.task_id],
               "shown_rank": target_rank(list(shown.candidates), task.target),
               "pass_opened_recommend": open_tag(RECOMMEND) in rollout.answer.text,
               "pass_seconds": round(rollout.seconds, 2), "lists": lists}
        with rows_file.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        rows.append(row)
        bar.update(1)
    bar.close()
    summary = {str(t): summarise(rows, t) for t in args.temperatures}
    for temperature, values in summary.items():
        print(f"list temperature {temperature}: " + json.dumps(values))
    result = {"model": args.model, "card_stage": setup.card.stage if setup.card else None,
              "dataset": args.dataset, "samples": args.samples, "prompts": prompts.report,
              "candidate_order": fmt.candidate_order, "overrides": args.overrides,
              "rollout_temperature": settings.temperature, "by_temperature": summary}
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
