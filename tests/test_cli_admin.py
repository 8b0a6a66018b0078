"""`star --version`, `star doctor`, `star config dump`, and an example in every --help."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from starrec import __version__
from starrec.cli.main import app
from starrec.config import StarConfig, load_config

runner = CliRunner()
# cli/distill.py is being reworked elsewhere; its help gets its example there
COMMANDS = (["data"], ["data", "prepare"], ["eval"], ["cst"], ["cst", "build"], ["cst", "show"],
            ["report"], ["teach"], ["pipeline"], ["serve"], ["recommend"], ["doctor"],
            ["config"], ["config", "dump"])


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"star {__version__}"


def test_doctor_reports_and_exits_0(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("STAR_HOME", str(tmp_path / "home"))
    result = runner.invoke(app, ["doctor"])
    assert result.exit_code == 0, result.output
    for what in ("python", "torch", "llama-cpp-python", "duckdb", "java", "cores", "STAR_HOME"):
        assert what in result.output
    assert "not created yet" in result.output


def test_config_dump_is_the_defaults_with_comments(tmp_path) -> None:
    out = tmp_path / "defaults.yaml"
    result = runner.invoke(app, ["config", "dump", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert load_config(out) == StarConfig()
    assert yaml.safe_load(out.read_text())["cst"]["neighbours"] == 20
    assert "# precomputed neighbours per item" in out.read_text()
    printed = runner.invoke(app, ["config", "dump"])
    assert printed.exit_code == 0 and printed.output == out.read_text()


def test_config_dump_to_a_missing_folder_is_one_error_line(tmp_path) -> None:
    result = runner.invoke(app, ["config", "dump", "--out", str(tmp_path / "no" / "x.yaml")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")


def test_every_command_help_shows_an_example() -> None:
    for command in COMMANDS:
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Example" in result.output, command


def test_doctor_install_hints_name_the_extra_that_brings_the_package() -> None:
    from starrec.cli.admin import PACKAGES, install_hint
    from starrec.core.extras import EXTRA_OF

    assert install_hint("trl") == "pip install 'starrec[train]'"
    assert install_hint("torch") == "pip install starrec"
    assert "Java" in install_hint("pyspark") and "starrec[spark]" in install_hint("pyspark")
    for _, module, _ in PACKAGES:
        extra = EXTRA_OF.get(module)
        assert (f"starrec[{extra}]" if extra else "pip install starrec") in install_hint(module)
