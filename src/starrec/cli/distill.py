"""`star distill`: teacher trajectories -> student model folder.

A Typer sub-app, registered by `starrec.cli.main` (`app.add_typer(distill.app,
name="distill")`). Shared helpers of main.py are imported inside the commands, so either
module can import the other first. Command options override the config (`--config`,
`--set sft.key=value`); everything else comes from the `sft` section.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from starrec.cli.options import ColumnsOption, ConfigOption, SetOption
from starrec.cli.options import config_from as _config
from starrec.cli.options import fail as _fail

app = typer.Typer(help="Distil teacher trajectories into a single student model.",
                  no_args_is_help=True)


def _overrides(**options: object) -> list[str]:
    """`--set` style overrides for the options given on the command line."""
    return [f"sft.{key}={value}" for key, value in options.items() if value is not None]


@app.command("sft")
def sft(
    trajectories: Annotated[list[Path], typer.Option(
        help="Trajectory file of `star teach` (repeat the option for several).")],
    out: Annotated[Path, typer.Option(help="Student model folder to write.")],
    valid_trajectories: Annotated[Optional[list[Path]], typer.Option(
        help="Trajectories for validation (default: hold out sft.eval_fraction of the "
        "tasks).")] = None,
    model: Annotated[Optional[str], typer.Option(
        help="Base model: smollm2, a model folder, a hub id or a .gguf file. "
        "Default: sft.base_model.")] = None,
    dataset: Annotated[Optional[str], typer.Option(
        help="Dataset of the trajectories' tasks (titles, popularity strata). "
        "Default: data.dataset.")] = None,
    top_k: Annotated[Optional[int], typer.Option(
        help="Keep runs with the target within the first K. Default: sft.filter.top_k.")] = None,
    per_task: Annotated[Optional[str], typer.Option(
        help="Samples kept per task: first, best or all.")] = None,
    balance: Annotated[Optional[bool], typer.Option(
        "--balance/--no-balance", help="Equal counts per difficulty stratum.")] = None,
    no_plan: Annotated[bool, typer.Option(help="Ablation: no <plan>.")] = False,
    no_tools: Annotated[bool, typer.Option(help="Ablation: no tool calls and responses.")] = False,
    no_reflection: Annotated[bool, typer.Option(help="Ablation: no <reflection>.")] = False,
    full: Annotated[bool, typer.Option(help="Full fine-tune instead of LoRA.")] = False,
    merge: Annotated[Optional[bool], typer.Option(
        "--merge/--no-merge", help="Merge LoRA into the weights (default: sft.merge).")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Default: sft.epochs.")] = None,
    lr: Annotated[Optional[float], typer.Option(
        help="Learning rate. Default: sft.learning_rate.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after N optimizer steps.")] = None,
    resume: Annotated[bool, typer.Option(
        help="Continue from the latest checkpoint in OUT/checkpoints.")] = False,
    columns: ColumnsOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Filter the teacher's runs, serialize them into the student language and fine-tune
    the base model on them (LoRA by default). Writes OUT as a model folder that
    `star eval --system star --model OUT` loads, with star_model.json, the loss curve,
    the filter report and the tokenized data."""
    from starrec.data.errors import DataError
    from starrec.data.registry import load_dataset
    from starrec.llm.base import LLMError
    from starrec.trajectories.recorder import TrajectoryFileError
    from starrec.training.pipeline import sft_from_trajectories

    if per_task is not None and per_task not in ("first", "best", "all"):
        raise typer.BadParameter("expected first, best or all", param_hint="--per-task")
    derived = _overrides(
        base_model=model, epochs=epochs, learning_rate=lr, max_steps=max_steps, merge=merge,
        **{"filter.top_k": top_k, "filter.per_task": per_task, "filter.balance": balance,
           "format.plan": False if no_plan else None, "format.tools": False if no_tools else None,
           "format.reflection": False if no_reflection else None, "lora": False if full else None})
    cfg = _config(config, [*(set_ or []), *derived], columns)
    try:
        loaded = load_dataset(dataset or cfg.data.dataset, cfg.data.source, cfg.data.columns)
        result, report = sft_from_trajectories(
            trajectories, out, cfg, loaded, valid_trajectories=valid_trajectories, resume=resume)
    except (DataError, FileExistsError, FileNotFoundError, LLMError, TrajectoryFileError,
            ValueError) as error:
        raise _fail(error) from None
    typer.echo(report.table())
    resumed = f" (resumed from {result.resumed_from})" if result.resumed_from else ""
    losses = ("no loss logged" if result.train_loss is None
              else f"train loss {result.train_loss:.4f}")
    if result.eval_loss is not None:
        losses += f", eval loss {result.eval_loss:.4f}"
    typer.echo(f"sft: {result.global_step} steps{resumed}, {losses}, "
               f"{result.seconds:.0f} s -> {out}")
