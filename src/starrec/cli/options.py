"""Options and helpers shared by every `star` command module."""

from __future__ import annotations

from pathlib import Path
from collections.abc import Callable
from typing import Annotated, Any, Optional

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
        help="ml-100k, agentrecbench:DATA_DIR[,TASK_DIR], recbole:PATH (RecBole atomic files), "
        "a folder with interactions.* and items.* tables or atomic files, or a name on the "
        "dataset search path (amazon-games; $STAR_DATASETS, ../shared/datasets beside the "
        "repository, $STAR_HOME/datasets). Default: data.dataset of the config."
    ),
]
ColumnsOption = Annotated[
    Optional[str],
    typer.Option(
        help="The data's column names for ours, e.g. user=userId,item=movieId,"
        "timestamp=timestamp,title=title (keys: user, item, timestamp, rating, title), for "
        "folders of tables and RecBole atomic files. Adds to data.columns of the config "
        "(--set data.columns=... on the other commands)."
    ),
]
TasksOption = Annotated[Optional[Path], typer.Option(help="A task file (JSON lines).")]
# choices are checked by typer, so a typo is refused before any data is read
USER_SETS = ("all", "eval-200", "valid-200")
SPLIT_CHOICES = ("train", "valid", "test")
SCENARIO_CHOICES = ("classic", "user_cold", "item_cold", "long_term", "short_term")


def choice(values: tuple[str, ...]) -> Callable[[str | None], str | None]:
    """A typer callback refusing values outside `values` (usage error, exit code 2).

    A callback rather than a Literal or Enum type: values stay plain strings for the code
    that compares and prints them, on every typer version the project allows."""

    def check(value: str | None) -> str | None:
        if value is not None and value not in values:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(values)}")
        return value

    return check


def choice_option(values: tuple[str, ...], help: str) -> Any:
    return typer.Option(callback=choice(values), metavar="[" + "|".join(values) + "]", help=help)


UsersOption = Annotated[str, choice_option(
    USER_SETS, "all users of the split, eval-200 (200 test users) or valid-200 (the valid tasks "
    "of the same users) (when --tasks is not given).")]
ScenarioOption = Annotated[str, choice_option(SCENARIO_CHOICES, "The scenario's task file.")]


def split_option(default: str) -> Any:
    """A --split option whose default is implied by --users (eval-200: test, valid-200:
    valid), else `default`; None when not given, so a contradiction can be told apart."""
    return Annotated[Optional[str], choice_option(
        SPLIT_CHOICES, f"train, valid or test (when --tasks is not given). Default: the split "
        f"--users implies, else {default}.")]


SplitOption = split_option("test")
TrainSplitOption = split_option("train")  # star teach: teacher runs are made on train tasks
LimitOption = Annotated[Optional[int], typer.Option(help="Only the first N tasks.")]
ConcurrencyOption = Annotated[Optional[int], typer.Option(
    min=1, help="Tasks in flight at once when the model is served (OpenAI-compatible "
    "server); an in-process model runs them one by one. Sets mars.llm.concurrency (the "
    "teacher) or student.llm.concurrency (default 1).")]
ModelOption = Annotated[Optional[str], typer.Option(
    help="smollm2, a model folder, a hub id, a .gguf file or http(s)://host:port/v1. "
    "Default for the teacher: mars.llm.model; a student is its folder.")]


def llm_section(system: str) -> str:
    """The config section whose `llm` answers `system`: `mars` for the teacher, else
    `student`."""
    return "mars" if system == "mars" else "student"


def config_from(config: Path | None, overrides: list[str] | None,
                columns: str | None = None, preset: str | None = None) -> StarConfig:
    """The configuration (a shipped `preset` under the `--config` file under `--set`),
    with a command's `--columns` merged into `data.columns`, or one `error:` line and
    exit 2 naming the settings at fault."""
    import warnings

    from pydantic import ValidationError

    from starrec.config import ConfigDeprecationWarning

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConfigDeprecationWarning)
            cfg = load_config(config, overrides, preset=preset)
        for warning in caught:  # a deprecated setting: one line, not a Python traceback line
            if issubclass(warning.category, ConfigDeprecationWarning):
                typer.secho(f"warning: {warning.message}", fg=typer.colors.YELLOW, err=True)
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename,
                                       warning.lineno)
        if columns:
            cfg.data.columns = columns_from(columns, cfg)
        return cfg
    except ValidationError as error:
        problems = "; ".join(_problem(e) for e in error.errors())
        raise fail(ValueError(f"bad setting in --config/--set: {problems}")) from None
    except (ValueError, FileNotFoundError, OSError) as error:
        raise fail(ValueError(f"--config/--set: {error}")) from None


def _problem(error: Any) -> str:
    """One pydantic error as `section.key: message` (a rule between sections has no key:
    its message names them)."""
    message = str(error["msg"]).removeprefix("Value error, ")
    where = ".".join(map(str, error["loc"]))
    return f"{where}: {message}" if where else message


def columns_from(columns: str | None, cfg: StarConfig) -> dict[str, str]:
    """The column mapping of a command: `data.columns` of the config, with the `--columns`
    pairs given on the command line taking precedence key by key. A malformed pair or an
    unknown key is a DataError, which the commands print as one `error:` line."""
    if not columns:
        return dict(cfg.data.columns)
    from starrec.data.generic import parse_columns

    return {**cfg.data.columns, **parse_columns(columns)}


def fail(error: Exception) -> typer.Exit:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    return typer.Exit(code=2)
