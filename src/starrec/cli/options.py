"""Options and helpers shared by every `star` command module."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from starrec.config import StarConfig, load_config

ConfigOption = Annotated[
    Optional[Path], typer.Option("--config", help="YAML config file (see configs/default.yaml).")
]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a config value, e.g. --set mars.max_tool_calls=3."),
]
DatasetOption = Annotated[
    Optional[str],
    typer.Option(
        help="ml-100k, agentrecbench:DATA_DIR[,TASK_DIR], or a folder with interactions.* and "
        "items.* tables. Default: data.dataset of the config."
    ),
]
TasksOption = Annotated[Optional[Path], typer.Option(help="A task file (JSON lines).")]
UsersOption = Annotated[str, typer.Option(help="all or eval-200 (when --tasks is not given).")]
ScenarioOption = Annotated[
    str, typer.Option(help="classic, user_cold, item_cold, long_term or short_term.")
]
LimitOption = Annotated[Optional[int], typer.Option(help="Only the first N tasks.")]
ModelOption = Annotated[Optional[str], typer.Option(
    help="smollm2, a model folder, a hub id, a .gguf file or http(s)://host:port/v1. "
    "Default: llm.model of the config.")]


def config_from(config: Path | None, overrides: list[str] | None) -> StarConfig:
    try:
        return load_config(config, overrides)
    except (ValueError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error), param_hint="--config/--set") from None


def fail(error: Exception) -> typer.Exit:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)
