"""`star distill`: teacher trajectories -> student model folder.

A Typer sub-app, registered by `starrec.cli.main` (`app.add_typer(distill.app,
name="distill")`). Shared helpers of main.py are imported inside the commands, so either
module can import the other first. Command options override the config (`--config`,
`--set sft.key=value`); everything else comes from the `sft` section (`grpo` for
`star distill grpo`, `rank.` overrides for `star distill rank`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from starrec.cli.options import ColumnsOption, ConfigOption, SetOption, choice
from starrec.cli.options import config_from as _config
from starrec.cli.options import fail as _fail
from starrec.config import GRPO_PRESETS

# options the three trainers share
FullOption = Annotated[bool, typer.Option(help="Full fine-tune instead of LoRA.")]
NoValidOption = Annotated[bool, typer.Option(
    help="No valid-200 AvgHR curve (faster; nothing to choose a checkpoint by).")]
ResumeOption = Annotated[bool, typer.Option(
    help="Continue from the latest checkpoint in OUT/checkpoints.")]

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
    full: FullOption = False,
    merge: Annotated[Optional[bool], typer.Option(
        "--merge/--no-merge", help="Merge LoRA into the weights (default: sft.merge).")] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Default: sft.epochs.")] = None,
    lr: Annotated[Optional[float], typer.Option(
        help="Learning rate. Default: sft.learning_rate.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after N optimizer steps.")] = None,
    resume: ResumeOption = False,
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


def _rank_settings(overrides: list[str]) -> tuple[list[str], object]:
    """(the other overrides, RankSettings of the `rank.` ones): the ranking head's settings
    live with its trainer (`starrec.training.rank.RankSettings`), not in the config file's
    sections, so they are split off before the config is read."""
    from starrec.config import parse_override
    from starrec.training.rank import RankSettings

    data: dict = {}
    rest: list[str] = []
    for text in overrides:
        keys, value = parse_override(text)
        if keys[0] != "rank":
            rest.append(text)
            continue
        node = data
        for key in keys[1:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return rest, RankSettings.model_validate(data)


@app.command("rank")
def rank(
    out: Annotated[Path, typer.Option(help="Model folder to write.")],
    model: Annotated[Optional[str], typer.Option(
        help="Base model: smollm2, an SFT student folder, a model folder, a hub id or a .gguf "
        "file. Default: rank.base_model.")] = None,
    dataset: Annotated[Optional[str], typer.Option(
        help="Dataset whose train positions are the training tasks. Default: data.dataset.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps. Default: rank.steps.")] = None,
    full: FullOption = False,
    no_valid: NoValidOption = False,
    resume: ResumeOption = False,
    columns: ColumnsOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Train a ranking head: the ranking is read from the candidates' label logits after
    one forward pass, trained on the outcomes of the train tasks (every earlier position
    of each user's train sequence, with leave-the-users-out evidence). Writes OUT, which
    `star eval --system star --model OUT [--set student.mode=fast|reason]` loads.

    Example:
      star distill rank --out runs/rank-head --model smollm2 --steps 300 \\
        --set rank.batch_tasks=8 --set rank.objective=listwise+pl \\
        --set rank.head.evidence_tokens=24
    """
    from starrec.data.errors import DataError
    from starrec.data.prepared import load_task_set, prepared_tasks
    from starrec.data.registry import load_dataset
    from starrec.llm.base import LLMError
    from starrec.training.rank import train_rank_on_dataset

    try:
        rest, settings = _rank_settings(list(set_ or []))
    except ValueError as error:
        raise typer.BadParameter(str(error), param_hint="--set") from None
    update = {k: v for k, v in {"base_model": model, "steps": steps,
                                "lora": False if full else None}.items() if v is not None}
    settings = settings.model_copy(update=update)
    cfg = _config(config, rest, columns)
    try:
        spec = dataset or cfg.data.dataset
        loaded = load_dataset(spec, cfg.data.source, cfg.data.columns)
        valid = None
        if not no_valid:
            folder = prepared_tasks(spec, cfg.data.source, cfg.data.seed, dataset=loaded)
            valid = load_task_set(folder / "valid-200.jsonl", loaded)
        result = train_rank_on_dataset(loaded, out, cfg, settings, valid_tasks=valid,
                                       resume=resume)
    except (DataError, FileExistsError, FileNotFoundError, LLMError, ValueError) as error:
        raise _fail(error) from None
    resumed = f" (resumed from {result.resumed_from})" if result.resumed_from else ""
    loss = "no loss logged" if result.train_loss is None else f"train loss {result.train_loss:.4f}"
    valid_hr = ""
    if result.eval_metrics:
        valid_hr = f", valid AvgHR {result.eval_metrics['AvgHR']:.1f}"
    typer.echo(f"rank: {result.global_step} steps{resumed}, {loss}{valid_hr}, "
               f"{result.seconds:.0f} s -> {out}")


PRESETS = tuple(GRPO_PRESETS)


@app.command("grpo")
def grpo(
    out: Annotated[Path, typer.Option(help="Student model folder to write.")],
    model: Annotated[Optional[str], typer.Option(
        help="The student to improve: an SFT student folder (its star_model.json gives the "
        "format), or any model spec. Default: grpo.base_model.")] = None,
    dataset: Annotated[Optional[str], typer.Option(
        help="Dataset whose prepared train tasks are the prompts (valid-200 for the valid "
        "curve). Default: data.dataset.")] = None,
    max_steps: Annotated[Optional[int], typer.Option(
        help="Optimizer steps. Default: grpo.steps.")] = None,
    preset: Annotated[Optional[str], typer.Option(
        callback=choice(PRESETS), metavar="[cpu|gpu]",
        help="Named grpo values, applied over --config and under --set: cpu (the defaults) "
        "or gpu (the paper's: group 8, lr 1e-6, KL 0.001, temperature 0.7, full fine-tune, "
        "vLLM generation).")] = None,
    full: FullOption = False,
    no_valid: NoValidOption = False,
    resume: ResumeOption = False,
    columns: ColumnsOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Improve a student with GRPO (DESIGN.md 3.6): each step samples grpo.group_size real
    student passes per train prompt on the live weights (CST tool calls answered from the
    train store mid-generation, tool responses out of the loss), rewards each with its
    outcome (1, 2/3, 1/3, 0 for the target at rank 1, within 3, within 5) plus its format
    (+1 well formed as written, -1 otherwise), and takes a TRL GRPO step. Writes OUT, which
    `star eval --system star --model OUT` loads, with curves.json / curves.png (reward,
    format rate, KL, valid AvgHR) and checkpoints that --resume continues from. Any field
    of TRL's GRPOConfig is reachable as --set grpo.trl.FIELD=VALUE.

    Example:
      star distill grpo --model runs/student --out runs/student-grpo --max-steps 40 \\
        --set grpo.group_size=4 --set grpo.trl.scale_rewards=false
    """
    from starrec.config import preset_overrides
    from starrec.data.errors import DataError
    from starrec.data.prepared import load_task_set, prepared_tasks
    from starrec.data.registry import load_dataset
    from starrec.llm.base import LLMError
    from starrec.training.grpo import train_grpo_on_dataset

    derived = [f"grpo.{key}={value}" for key, value in
               {"base_model": model, "steps": max_steps,
                "lora": False if full else None}.items() if value is not None]
    cfg = _config(config, [*preset_overrides(preset or "cpu"), *(set_ or []), *derived], columns)
    try:
        spec = dataset or cfg.data.dataset
        loaded = load_dataset(spec, cfg.data.source, cfg.data.columns)
        folder = prepared_tasks(spec, cfg.data.source, cfg.data.seed, dataset=loaded)
        train = load_task_set(folder / "train.jsonl", loaded)
        valid = [] if no_valid else load_task_set(folder / "valid-200.jsonl", loaded)
        result = train_grpo_on_dataset(loaded, train, out, cfg, valid_tasks=valid, name=spec,
                                       resume=resume)
    except (DataError, FileExistsError, FileNotFoundError, LLMError, KeyError,
            ValueError) as error:
        raise _fail(error) from None
    resumed = f" (resumed from {result.resumed_from})" if result.resumed_from else ""
    reward = "no reward logged" if result.reward is None else f"reward {result.reward:.3f}"
    valid_hr = ""
    if result.valid and result.valid_start:
        valid_hr = (f", valid AvgHR {result.valid['AvgHR']:.1f} (step "
                    f"{result.valid_start['step']}: {result.valid_start['AvgHR']:.1f}, "
                    f"{result.valid['n_tasks']} tasks)")
    typer.echo(f"grpo: {result.global_step} steps{resumed}, {reward}{valid_hr}, "
               f"{result.seconds:.0f} s -> {out}")
