"""`star pipeline`: the main job (`starrec.pipeline`), end to end on one dataset.

With its defaults (the `quick` preset) every stage runs at a small, fixed size and the
job finishes in minutes; `--preset full` runs it at full scale (hours on a 2-core CPU).
Every stage keeps its output under `--out` and is skipped or resumed when that output
exists, so after a stop (Ctrl-C, a crash, the end of a session) the same command goes on
where it stopped. Registered by `starrec.cli.main`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from starrec.cli.options import (ColumnsOption, ConcurrencyOption, ConfigOption, DatasetOption,
                                 ModelOption, SetOption, choice)
from starrec.cli.options import config_from as _config
from starrec.cli.options import fail as _fail
from starrec.config import preset_names

PRESET_CHOICES = tuple(preset_names())


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
    preset: Annotated[str, typer.Option(
        callback=choice(PRESET_CHOICES), metavar="[" + "|".join(PRESET_CHOICES) + "]",
        help="Named settings under --config and --set: quick (every stage at a small, fixed "
        "size, minutes) or full (the full-scale job, hours).")] = "quick",
    model: ModelOption = None,
    concurrency: ConcurrencyOption = None,
    out: Annotated[Path, typer.Option(
        help="Folder for results, trajectories, the student model and the report.")] = Path(
        "runs/pipeline"),
    columns: ColumnsOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """The main job: tasks, baselines, teacher, SFT and GRPO students, one comparison table.

    Rerun the same command to resume: finished stages are skipped, the teacher and the
    evaluations continue task by task, SFT and GRPO from their last checkpoints. The wall
    time of each stage is printed under the table and kept in OUT/stages.json.

    Examples:
      star pipeline
      star pipeline --preset full --out runs/full
      star pipeline --no-llm --systems pop,sasrec,cst
      star pipeline --model http://localhost:8000/v1 --set mars.llm.model=NAME --concurrency 8
    """
    from starrec.data.errors import DataError
    from starrec.evaluation.report import full_report
    from starrec.llm.base import LLMError, ServerUnavailable
    from starrec.pipeline import Pipeline
    from starrec.trajectories.recorder import TrajectoryFileError

    overrides = list(set_ or [])
    if concurrency is not None:
        overrides += [f"mars.llm.concurrency={concurrency}",
                      f"student.llm.concurrency={concurrency}"]
    for key, value in (("systems", f"[{systems}]" if systems is not None else None), ("llm", llm),
                       ("teacher_tasks", teacher_tasks), ("llm_eval_tasks", llm_eval_tasks)):
        if value is not None:
            overrides.append(f"pipeline.{key}={str(value).lower() if isinstance(value, bool) else value}")
    cfg = _config(config, overrides, columns, preset=preset)
    job = Pipeline(dataset or cfg.data.dataset, cfg, out, model=model, echo=typer.echo)
    try:
        job.run()
    except (DataError, ValueError, LLMError, ServerUnavailable, TrajectoryFileError,
            FileExistsError) as error:
        raise _fail(error) from None
    finally:  # what finished is reported, also when a later stage failed or was stopped
        done = job.run_state
        if done.results:
            table = full_report(done.results)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{job.slug}-report.md").write_text(table + "\n", encoding="utf-8")
            typer.echo(table)
        if done.stages:
            typer.echo(f"\npreset {cfg.pipeline.preset}; stage wall times:\n" + done.stage_table())
