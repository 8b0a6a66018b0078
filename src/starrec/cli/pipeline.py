"""`star pipeline`: the main job, end to end on one dataset.

1. the task files (`star data prepare`);
2. every baseline and the `cst` ranker on the test tasks, all users and eval-200;
3. the teacher on `pipeline.teacher_tasks` train tasks (`star teach`);
4. the student fine-tuned on the teacher's successful runs (`star distill sft`);
5. teacher and student on the first `pipeline.llm_eval_tasks` of eval-200 (`star eval`);
6. one table of every result.

Every stage keeps its output under `--out` and is skipped or resumed when that output
exists, so after a stop (Ctrl-C, a crash, the end of a session) the same command goes on
where it stopped. Registered by `starrec.cli.main`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from starrec.cli.options import ConfigOption, DatasetOption, ModelOption, SetOption
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
    out: Annotated[Path, typer.Option(
        help="Folder for results, trajectories, the student model and the report.")] = Path(
        "runs/pipeline"),
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """The main job: tasks, baselines, teacher, SFT student, and one comparison table.

    Rerun the same command to resume: finished stages are skipped, the teacher and the
    evaluations continue task by task, SFT from its last checkpoint."""
    from starrec.data.errors import DataError
    from starrec.data.registry import dataset_slug, load_dataset
    from starrec.evaluation.report import full_report
    from starrec.llm.base import LLMError
    from starrec.trajectories.recorder import TrajectoryFileError

    overrides = list(set_ or [])
    for key, value in (("systems", f"[{systems}]" if systems is not None else None), ("llm", llm),
                       ("teacher_tasks", teacher_tasks), ("llm_eval_tasks", llm_eval_tasks)):
        if value is not None:
            overrides.append(f"pipeline.{key}={str(value).lower() if isinstance(value, bool) else value}")
    cfg = _config(config, overrides)
    dataset = dataset or cfg.data.dataset
    slug = dataset_slug(dataset)
    try:
        loaded = load_dataset(dataset, cfg.data.source)
        results = baselines(loaded, dataset, slug, cfg, out)
        if cfg.pipeline.llm:
            results += llm_stages(loaded, dataset, slug, cfg, model, out)
    except (DataError, ValueError, LLMError, TrajectoryFileError, FileExistsError) as error:
        raise _fail(error) from None
    table = full_report(results)
    (out / f"{slug}-report.md").write_text(table + "\n", encoding="utf-8")
    typer.echo(table)


def baselines(loaded: Dataset, dataset: str, slug: str, cfg: StarConfig,
              out: Path) -> list[dict[str, Any]]:
    """Each system fitted once, evaluated on all test users and on eval-200; a system
    whose two results files exist is read back, not refitted."""
    from starrec.cli.main import _prepared
    from starrec.data.tasks import load_tasks
    from starrec.evaluation.runner import evaluate_baseline, subset_result, write_json

    folder = _prepared(dataset, cfg.data.source, cfg.data.seed, None)
    test = load_tasks(folder / "test.jsonl")
    eval_ids = {t.task_id for t in load_tasks(folder / "eval-200.jsonl")}
    results = []
    for name in cfg.pipeline.systems:
        paths = [out / f"{slug}-{name}-test-{users}.json" for users in ("all", "eval-200")]
        if all(p.exists() for p in paths):
            results += [_read(p) for p in paths]
            continue
        everyone, records = evaluate_baseline(name, loaded, test, cfg)
        everyone["config"].update(tasks="test.jsonl", users="all", scenario="classic")
        subset = subset_result(everyone, records, eval_ids, cfg)
        subset["config"].update(tasks="eval-200.jsonl", users="eval-200")
        for result, path in zip((everyone, subset), paths):
            write_json(result, path)
            results.append(result)
    return results


def llm_stages(loaded: Dataset, dataset: str, slug: str, cfg: StarConfig, model: str | None,
               out: Path) -> list[dict[str, Any]]:
    """Teacher runs on train tasks, SFT, then teacher and student on eval-200 tasks."""
    from starrec.cli.main import _prepared, evaluate_llm
    from starrec.cli.teach import report, teach_tasks
    from starrec.data.tasks import load_tasks
    from starrec.evaluation.runner import write_json

    settings = cfg.pipeline
    folder = _prepared(dataset, cfg.data.source, cfg.data.seed, None)
    train = teacher_sample(load_tasks(folder / "train.jsonl"), settings.teacher_tasks,
                           cfg.data.seed)
    trajectories = out / "teacher" / "train.jsonl"
    typer.echo(f"teacher: {len(train)} train tasks -> {trajectories}")
    report(teach_tasks(train, loaded, dataset, cfg, model, trajectories), trajectories)

    student = out / "student"
    train_student(trajectories, student, loaded, cfg)

    eval_tasks = load_tasks(folder / "eval-200.jsonl", settings.llm_eval_tasks)
    users = "eval-200" if settings.llm_eval_tasks is None else f"eval-200-first{len(eval_tasks)}"
    results = []
    for system, spec in (("mars", model), ("star", str(student))):
        path = out / f"{slug}-{system}-test-{users}.json"
        typer.echo(f"eval {system}: {len(eval_tasks)} tasks -> {path}")
        result, _ = evaluate_llm(system, spec, loaded, dataset, eval_tasks, cfg,
                                 path.with_suffix(".records.jsonl"))
        result["config"].update(tasks="eval-200.jsonl", users=users, scenario="classic")
        write_json(result, path)
        results.append(result)
    return results


def teacher_sample(tasks: list[Task], n: int, seed: int) -> list[Task]:
    """`n` train tasks of distinct users drawn with `seed` (all when there are fewer),
    in file order so the draw reads like the task file."""
    from starrec.data.tasks import eval_users

    chosen = eval_users(tasks, n=n, seed=seed)
    return [task for task in tasks if task.user_id in chosen]


def train_student(trajectories: Path, student: Path, loaded: Dataset, cfg: StarConfig) -> None:
    """SFT into `student`, resumed from its last checkpoint; done once it is a model."""
    from starrec.training.card import CARD_FILE
    from starrec.training.pipeline import sft_from_trajectories

    if (student / CARD_FILE).exists():
        typer.echo(f"sft: {student} is trained; delete it to train again")
        return
    result, kept = sft_from_trajectories([trajectories], student, cfg, loaded, resume=True)
    typer.echo(kept.table())
    typer.echo(f"sft: {result.global_step} steps in {result.seconds:.0f} s -> {student}")


def _read(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text(encoding="utf-8"))
