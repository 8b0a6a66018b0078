"""`star pipeline`: the main job, end to end on one dataset.

1. the task files (`star data prepare`);
2. every baseline and the `cst` ranker on the test tasks, all users and eval-200;
3. the teacher on the train tasks of `pipeline.teacher_tasks` users (`star teach`);
4. the student fine-tuned on the teacher's successful train runs (`star distill sft`);
5. the student on the first `pipeline.llm_eval_tasks` of eval-200 (`star eval`);
6. the teacher on the same tasks, its full runs kept under `teacher/`;
7. one table of every result, written also when a later stage failed.

Every stage keeps its output under `--out` and is skipped or resumed when that output
exists, so after a stop (Ctrl-C, a crash, the end of a session) the same command goes on
where it stopped. Registered by `starrec.cli.main`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from starrec.cli.options import (ColumnsOption, ConcurrencyOption, ConfigOption, DatasetOption,
                                 ModelOption, SetOption)
from starrec.cli.options import config_from as _config
from starrec.cli.options import fail as _fail

if TYPE_CHECKING:
    from starrec.config import StarConfig
    from starrec.data.schema import Dataset
    from starrec.data.tasks import Task


def pipeline(
    dataset: DatasetOption = None,
    systems: Annotated[Optional[str], typer.Option(
        help="Comma-separated baselines to evaluate. Default: pipeline.systems.")] = None,
    llm: Annotated[Optional[bool], typer.Option(
        "--llm/--no-llm", help="Run the teacher, SFT and student stages (hours on a 2-core "
        "CPU). Default: pipeline.llm.")] = None,
    teacher_tasks: Annotated[Optional[int], typer.Option(
        help="Train tasks the teacher runs to make the SFT data. Default: "
        "pipeline.teacher_tasks.")] = None,
    llm_eval_tasks: Annotated[Optional[int], typer.Option(
        help="Evaluate teacher and student on the first N eval-200 tasks. Default: "
        "pipeline.llm_eval_tasks.")] = None,
    model: ModelOption = None,
    concurrency: ConcurrencyOption = None,
    out: Annotated[Path, typer.Option(
        help="Folder for results, trajectories, the student model and the report.")] = Path(
        "runs/pipeline"),
    columns: ColumnsOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """The main job: tasks, baselines, teacher, SFT student, and one comparison table.

    Rerun the same command to resume: finished stages are skipped, the teacher and the
    evaluations continue task by task, SFT from its last checkpoint.

    Examples:
      star pipeline
      star pipeline --no-llm --systems pop,sasrec,cst
      star pipeline --teacher-tasks 20 --llm-eval-tasks 10 --out runs/small
      star pipeline --model http://localhost:8000/v1 --set llm.model=NAME --concurrency 8
    """
    from starrec.data.errors import DataError
    from starrec.data.registry import dataset_slug, load_dataset
    from starrec.evaluation.report import full_report
    from starrec.llm.base import LLMError, ServerUnavailable
    from starrec.trajectories.recorder import TrajectoryFileError

    overrides = list(set_ or [])
    if concurrency is not None:
        overrides.append(f"llm.concurrency={concurrency}")
    for key, value in (("systems", f"[{systems}]" if systems is not None else None), ("llm", llm),
                       ("teacher_tasks", teacher_tasks), ("llm_eval_tasks", llm_eval_tasks)):
        if value is not None:
            overrides.append(f"pipeline.{key}={str(value).lower() if isinstance(value, bool) else value}")
    cfg = _config(config, overrides, columns)
    if cfg.pipeline.llm and cfg.mars.candidate_order != cfg.sft.format.candidate_order:
        # else hours of teacher runs would all be dropped by the SFT filters
        raise _fail(ValueError(
            f"mars.candidate_order ({cfg.mars.candidate_order}) and "
            f"sft.format.candidate_order ({cfg.sft.format.candidate_order}) must agree"))
    dataset = dataset or cfg.data.dataset
    slug = dataset_slug(dataset)
    results: list[dict[str, Any]] = []
    try:
        loaded = load_dataset(dataset, cfg.data.source, cfg.data.columns)
        results += baselines(loaded, dataset, slug, cfg, out)
        if cfg.pipeline.llm:
            llm_stages(loaded, dataset, slug, cfg, model, out, results)
    except (DataError, ValueError, LLMError, ServerUnavailable, TrajectoryFileError,
            FileExistsError) as error:
        raise _fail(error) from None
    finally:  # what finished is reported, also when a later stage failed or was stopped
        if results:
            table = full_report(results)
            (out / f"{slug}-report.md").write_text(table + "\n", encoding="utf-8")
            typer.echo(table)


def baselines(loaded: Dataset, dataset: str, slug: str, cfg: StarConfig,
              out: Path) -> list[dict[str, Any]]:
    """Each system fitted once, evaluated on all test users and on eval-200; a system
    whose two results files exist is read back, not refitted."""
    from starrec.data.tasks import load_tasks
    from starrec.evaluation.report import load_results
    from starrec.evaluation.identity import file_sha256
    from starrec.evaluation.runner import subset_result, write_results
    from starrec.experiment import TaskSet, evaluate, prepare_tasks

    folder = prepare_tasks(loaded, cfg, spec=dataset)
    test = load_tasks(folder / "test.jsonl")
    # the cst rankers need the task set (their store, and the split before it to learn on)
    task_set = TaskSet(loaded, test, dataset, folder / "test.jsonl")
    eval_ids = {t.task_id for t in load_tasks(folder / "eval-200.jsonl")}
    results = []
    for name in cfg.pipeline.systems:
        paths = [out / f"{slug}-{name}-test-{users}.json" for users in ("all", "eval-200")]
        if all(p.exists() for p in paths):
            results += load_results(paths)
            continue
        evaluation = evaluate(name, task_set, cfg)
        everyone, records = evaluation.result, evaluation.records
        everyone["config"].update(tasks="test.jsonl", users="all", scenario="classic")
        subset = subset_result(everyone, records, eval_ids, cfg,
                               tasks_sha256=file_sha256(folder / "eval-200.jsonl"))
        subset["config"].update(tasks="eval-200.jsonl", users="eval-200")
        kept = [r for r in records if r.task_id in eval_ids]
        for result, rows, path in zip((everyone, subset), (records, kept), paths):
            write_results(result, rows, path)  # with its per-task file beside it
            results.append(result)
    return results


def llm_stages(loaded: Dataset, dataset: str, slug: str, cfg: StarConfig, model: str | None,
               out: Path, results: list[dict[str, Any]]) -> None:
    """Teacher runs on train tasks, SFT, then teacher and student evaluated; each result
    is appended to `results` as soon as it exists."""
    from starrec.cli.teach import report, teach_tasks
    from starrec.data.tasks import load_tasks
    from starrec.experiment import prepare_tasks

    settings = cfg.pipeline
    folder = prepare_tasks(loaded, cfg, spec=dataset)
    train = teacher_sample(load_tasks(folder / "train.jsonl"), settings.teacher_tasks,
                           cfg.data.seed)
    trajectories = out / "teacher" / "train.jsonl"
    typer.echo(f"teacher: {len(train)} train tasks -> {trajectories}")
    report(teach_tasks(train, loaded, dataset, cfg, model, trajectories), trajectories)

    student = out / "student"
    train_student(trajectories, student, loaded, cfg, {t.task_id for t in train})

    eval_tasks = load_tasks(folder / "eval-200.jsonl", settings.llm_eval_tasks)
    users = "eval-200" if settings.llm_eval_tasks is None else f"eval-200-first{len(eval_tasks)}"
    # the student first: one pass per task, so its row comes long before the teacher's
    for system, spec in (("star", str(student)), ("mars", model)):
        results.append(evaluate_stage(system, spec, loaded, dataset, slug, users, eval_tasks,
                                      cfg, out))


def evaluate_stage(system: str, spec: str | None, loaded: Dataset, dataset: str, slug: str,
                   users: str, tasks: list[Task], cfg: StarConfig, out: Path) -> dict[str, Any]:
    """The teacher or the student on `tasks`, resumed from a records file named after
    what answers (model and settings), so a changed model starts afresh, not mixed in.
    The teacher's full runs are kept beside, under `teacher/`."""
    from starrec.experiment import TaskSet, evaluate

    path = out / f"{slug}-{system}-test-{users}.json"
    typer.echo(f"eval {system}: {len(tasks)} tasks -> {path}")
    key = answerer_key(system, spec, cfg)
    records = path.with_suffix(f".{key}.records.jsonl")
    runs = out / "teacher" / f"test-{users}.{key}.jsonl" if system == "mars" else None
    evaluation = evaluate(system, TaskSet(loaded, tasks, dataset), cfg, model=spec,
                          records=records, trajectories=runs)
    result = evaluation.result
    result["config"].update(tasks="eval-200.jsonl", users=users, scenario="classic")
    evaluation.write(path)
    return result


def answerer_key(system: str, spec: str | None, cfg: StarConfig) -> str:
    """A short hash of what decides a system's answers: its model (a student's card:
    when it was trained and what inference reads from it, so a retrained or re-carded
    student differs) and its settings, without those that change only where or how fast
    answers come (`--concurrency`, endpoints, timeouts: `identity_settings`). Code changes
    are not in it: a records file kept across one that changes answers must be moved
    aside by hand."""
    import hashlib
    import json

    from starrec.evaluation.identity import identity_settings
    from starrec.llm.card import read_model_card

    if system == "star":
        card = read_model_card(spec) if spec else None
        read = {"created", "format", "plan_choices", "max_reflection_tokens"}
        identity: Any = {"card": card.model_dump(mode="json", include=read) if card else None,
                         "student": cfg.student.model_dump()}
    else:
        identity = {"model": spec or cfg.llm.model, "mars": cfg.mars.model_dump()}
    identity["llm"] = identity_settings({"llm": cfg.llm.model_dump()})["llm"]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def teacher_sample(tasks: list[Task], n: int, seed: int) -> list[Task]:
    """The tasks of `n` users drawn with `seed`, in file order. Draws are nested: a larger
    `n` keeps every user of a smaller one, so raising it extends the teacher's runs."""
    import numpy as np

    from starrec.data.splits import sorted_ids

    users = sorted_ids({task.user_id for task in tasks})
    order = np.random.default_rng(seed).permutation(len(users))
    chosen = {users[i] for i in order[:n]}
    return [task for task in tasks if task.user_id in chosen]


def train_student(trajectories: Path, student: Path, loaded: Dataset, cfg: StarConfig,
                  task_ids: set[str]) -> None:
    """SFT on the runs of `task_ids` into `student`, resumed from its last checkpoint;
    done once it is a model folder (delete it to train again)."""
    from starrec.llm.card import CARD_FILE
    from starrec.training.pipeline import sft_from_trajectories

    if (student / CARD_FILE).exists():
        typer.echo(f"sft: {student} is trained; delete it to train again")
        return
    result, kept = sft_from_trajectories([trajectories], student, cfg, loaded, resume=True,
                                         task_ids=task_ids)
    typer.echo(kept.table())
    typer.echo(f"sft: {result.global_step} steps in {result.seconds:.0f} s -> {student}")
