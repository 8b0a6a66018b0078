"""`star teach`: run the MARS teacher over a task set, appending one trajectory per run.

Registered by `starrec.cli.main` (`app.command("teach")(teach)`). Shared helpers of
main.py are imported inside the function, so either module can import the other first.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from starrec.cli.options import (
    ColumnsOption,
    ConcurrencyOption,
    ConfigOption,
    DatasetOption,
    LimitOption,
    ModelOption,
    ScenarioOption,
    SetOption,
    TasksOption,
    TrainSplitOption,
    UsersOption,
)
from starrec.cli.options import config_from as _config
from starrec.cli.options import fail as _fail

if TYPE_CHECKING:
    from starrec.config import StarConfig
    from starrec.data.schema import Dataset
    from starrec.data.tasks import Task
    from starrec.llm.base import ChatModel
    from starrec.trajectories.recorder import TeachSummary


ChatTemplateOption = Annotated[Optional[Path], typer.Option(
    "--chat-template",
    help="A chat template for a model without one (or to replace its own): a Jinja file, or "
    "a model folder holding one. Sets mars.llm.chat_template.")]


def with_chat_template(cfg: StarConfig, chat_template: Path | None) -> StarConfig:
    """`cfg` with `--chat-template` applied (an option wins over the config file)."""
    if chat_template is not None:
        cfg.mars.llm.chat_template = str(chat_template)
    return cfg


def _load_model(spec: str | None, cfg: StarConfig) -> ChatModel:
    """The teacher's model, preflighted by `load_chat_model` (a seam for tests, which use
    a scripted one)."""
    from starrec.llm.models import load_chat_model

    return load_chat_model(spec, cfg.mars.llm)


def teach(
    out: Annotated[Path, typer.Option(help="Trajectories file: JSON lines, appended, resumable.")] = Path(
        "trajectories.jsonl"),
    tasks: TasksOption = None,
    dataset: DatasetOption = None,
    split: TrainSplitOption = None,
    users: UsersOption = "all",
    scenario: ScenarioOption = "classic",
    limit: LimitOption = None,
    model: ModelOption = None,
    samples: Annotated[int, typer.Option(help="Runs per task (use a temperature above 0).")] = 1,
    concurrency: ConcurrencyOption = None,
    temperature: Annotated[Optional[float], typer.Option(
        help="Sampling temperature of every agent. Default: mars.temperature.")] = None,
    retry_errors: Annotated[bool, typer.Option(
        help="Run again the tasks whose recorded run ended in an error.")] = False,
    chat_template: ChatTemplateOption = None,
    columns: ColumnsOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Run the multi-agent teacher on every task and append its full trajectories.

    Resumable: tasks already in --out are skipped; Ctrl-C loses only the runs in flight.
    The CST store is built (or reused) from exactly what these tasks may see.

    Examples:
      star teach --users all --limit 60 --out runs/teacher/train.jsonl
      star teach --model http://localhost:8000/v1 --concurrency 8 --samples 4 --temperature 0.7
    """
    from starrec.data.errors import DataError
    from starrec.experiment import load_task_set
    from starrec.llm.base import LLMError, ServerUnavailable
    from starrec.trajectories.recorder import TrajectoryFileError

    overrides = list(set_ or [])
    if temperature is not None:
        overrides.append(f"mars.temperature={temperature}")
    if concurrency is not None:
        overrides.append(f"mars.llm.concurrency={concurrency}")
    cfg = with_chat_template(_config(config, overrides, columns), chat_template)
    if samples > 1 and cfg.mars.temperature == 0:
        typer.secho("warning: several samples at temperature 0 are identical; pass --temperature",
                    fg=typer.colors.YELLOW, err=True)
    dataset = dataset or cfg.data.dataset
    try:
        task_set = load_task_set(dataset, cfg, split=split, users=users, scenario=scenario,
                                 limit=limit, tasks=tasks, default_split="train")
        summary = teach_tasks(task_set.tasks, task_set.dataset, dataset, cfg, model, out,
                              samples=samples, retry_errors=retry_errors)
    except (DataError, ValueError, LLMError, ServerUnavailable, TrajectoryFileError) as error:
        raise _fail(error) from None
    report(summary, out)


def teach_tasks(task_list: list[Task], loaded: Dataset, dataset: str, cfg: StarConfig,
                model: str | None, out: Path, *, samples: int = 1,
                retry_errors: bool = False) -> TeachSummary:
    """`starrec.experiment.teach` with the model loaded through `_load_model`."""
    from starrec.evaluation.runner import split_of
    from starrec.experiment import TaskSet
    from starrec.experiment import teach as run

    split_of(task_list)  # one split, before the model loads
    return run(TaskSet(loaded, task_list, dataset), cfg, out=out, samples=samples,
               retry_errors=retry_errors, chat_model=_load_model(model, cfg))


def report(summary: TeachSummary, out: Path) -> None:
    """One line on what a teach run did; exit 130 if it was interrupted."""
    typer.echo(f"teach {summary.model}: {summary.written} run(s) written, {summary.done_before} "
               f"already done, {summary.errors} error(s), {summary.fallbacks} fallback ranking(s) "
               f"in {summary.seconds:.1f} s -> {out}")
    if summary.interrupted:
        typer.echo("interrupted: run the same command again to resume")
        raise typer.Exit(code=130)
