"""From trajectory files to a student model folder: read, filter, split, serialize,
tokenize, train. What `star distill sft` runs; every intermediate is kept in the output
folder (`filter_report.json`, `data/train`, `data/eval`) so a result can be traced."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from accelerate import PartialState
from datasets import Dataset as HFDataset

from starrec.agents.choices import plan_options
from starrec.config import StarConfig
from starrec.data.schema import Dataset
from starrec.data.splits import fit_interactions
from starrec.trajectories.dataset import ExportStats, build_sft_dataset
from starrec.trajectories.filters import FilterReport, filter_runs, holdout_tasks
from starrec.trajectories.recorder import read_runs
from starrec.trajectories.schema import TeacherRun
from starrec.trajectories.serialize import serialize_run, strip_tags
from starrec.training.sft import (
    SFTResult,
    load_tokenizer,
    resolve_base_model,
    resume_point,
    train_sft,
)

log = logging.getLogger(__name__)


def read_trajectories(paths: list[Path]) -> list[TeacherRun]:
    runs = [run for path in paths for run in read_runs(path)]
    if not runs:
        raise ValueError(f"no teacher runs in {', '.join(map(str, paths))}")
    return runs


def plan_choices(runs: list[TeacherRun]) -> list[str]:
    """The plans the teachers of `runs` chose among, as the student format writes them:
    every analyst set of each run's `mars.analysts`, when every run planned under
    `mars.constrain` and wrote one of them; none when a planner wrote freely (its
    student then does too), as one on a server without guided decoding does whatever the
    setting says."""
    options: dict[str, None] = {}
    for run in runs:
        settings = run.config.get("mars", {})
        mine = plan_options(settings.get("analysts") or [])
        if not (settings.get("constrain") and strip_tags(run.plan) in mine):
            return []
        options.update(dict.fromkeys(mine))
    return list(options)


def _encode(runs: list[TeacherRun], dataset: Dataset, tokenizer, cfg: StarConfig,
            show_progress: bool) -> tuple[HFDataset, ExportStats]:
    serialized = [serialize_run(run, dataset.title, cfg.sft.format) for run in runs]
    return build_sft_dataset(serialized, tokenizer, cfg.sft.max_length, show_progress)


def sft_from_trajectories(
    trajectories: list[Path],
    out: Path,
    cfg: StarConfig,
    dataset: Dataset,
    *,
    valid_trajectories: list[Path] | None = None,
    resume: bool = False,
    show_progress: bool = True,
    task_ids: set[str] | None = None,
) -> tuple[SFTResult, FilterReport]:
    """Train `cfg.sft.base_model` on the kept runs. `dataset` supplies the titles shown in
    the prompt and the popularity counts of the strata (the interactions the runs' split
    may be fit on). Validation: the filtered runs of `valid_trajectories`, else a
    held-out `cfg.sft.eval_fraction` of the training tasks. `task_ids`: train on the runs
    of these tasks only."""
    settings = cfg.sft
    resume_point(out, resume, announce=False)  # before anything in `out` is written
    runs = read_trajectories(trajectories)
    if task_ids is not None:  # a file may hold runs of tasks beyond the ones asked for
        runs = [run for run in runs if run.task_id in task_ids]
        if not runs:
            raise ValueError(f"no teacher run of the {len(task_ids)} given tasks")
    split = runs[0].task.get("split", "train")
    popularity = fit_interactions(dataset, split)["item"].value_counts().to_dict()
    order = settings.format.candidate_order
    kept, report = filter_runs(runs, settings.filter, popularity, order)
    if not kept:
        raise ValueError("no teacher run passed the filters:\n" + report.table())
    if valid_trajectories:
        unbalanced = settings.filter.model_copy(update={"balance": False})
        held, _ = filter_runs(read_trajectories(valid_trajectories), unbalanced, popularity, order)
        train_runs = kept
    else:
        train_runs, held = holdout_tasks(kept, settings.eval_fraction, settings.seed)
    # under accelerate every process prepares the same data; one writes it
    main_process = PartialState().is_main_process
    out.mkdir(parents=True, exist_ok=True)
    if main_process:
        (out / "filter_report.json").write_text(json.dumps(report.as_dict(), indent=2) + "\n",
                                                encoding="utf-8")
    tokenizer = load_tokenizer(resolve_base_model(settings.base_model))
    train, train_stats = _encode(train_runs, dataset, tokenizer, cfg, show_progress)
    if len(train) == 0:
        raise ValueError(f"every training sequence is longer than sft.max_length="
                         f"{settings.max_length} tokens")
    eval_data, eval_stats = (_encode(held, dataset, tokenizer, cfg, show_progress) if held
                             else (None, ExportStats()))
    if eval_data is not None and len(eval_data) == 0:
        log.warning("every validation sequence is longer than %d tokens: no validation",
                    settings.max_length)
        eval_data = None
    if main_process:
        train.save_to_disk(str(out / "data" / "train"))
        if eval_data is not None:
            eval_data.save_to_disk(str(out / "data" / "eval"))
    data_info = {
        "dataset": dataset.name,
        "trajectories": [str(p) for p in trajectories],
        "valid_trajectories": [str(p) for p in valid_trajectories or []],
        "filter": settings.filter.model_dump(),
        "filter_report": report.as_dict(),
        "train": asdict(train_stats),
        "eval": asdict(eval_stats),
    }
    result = train_sft(settings.base_model, train, out, settings, eval_data=eval_data,
                       resume=resume, data_info=data_info, show_progress=show_progress,
                       plan_choices=plan_choices(kept) if settings.format.plan else [],
                       # of the sequences trained on, not the held-out ones
                       max_reflection_tokens=train_stats.max_reflection_tokens or None)
    return result, report
