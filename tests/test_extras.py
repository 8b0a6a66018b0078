"""The core installs without the optional extras (issue 13): `pip install starrec` runs the
baselines and the cst ranker; an LLM, training or serving command without its extra stops
with one line naming the extra to install.

A real environment without those packages is built from this one: a bare venv whose only
site-packages entries are links to this environment's, less the optional distributions'
files, so a missing package is as missing to `importlib` (find_spec is None, no metadata)
as on a machine where it was never installed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_dataset_folder

pytestmark = pytest.mark.slow

# what the extras bring (pyproject's optional-dependencies), and the core must do without
OPTIONAL = ("trl", "peft", "datasets", "accelerate", "matplotlib", "openai", "gguf",
            "llama_cpp_python", "fastapi", "uvicorn", "duckdb", "pyspark", "schemathesis",
            "selenium")


def _excluded_entries(site_packages: Path) -> set[str]:
    """Top-level site-packages entries (modules, packages, dist-info) of OPTIONAL."""
    out: set[str] = set()
    for name in OPTIONAL:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in dist.files or ():
            top = Path(str(file)).parts[0]
            if top != ".." and (site_packages / top).exists():
                out.add(top)
    return out


@pytest.fixture(scope="module")
def core_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("core-env")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")],
                   check=True)
    python = root / "venv" / "bin" / "python"
    source = Path(next(p for p in site.getsitepackages() if p.endswith("site-packages")))
    farm = root / "site"
    farm.mkdir()
    skip = _excluded_entries(source)
    assert "trl" in skip, "the test needs trl installed here, to take it away"
    for entry in source.iterdir():
        if entry.name not in skip and not entry.name.endswith(".pth"):
            (farm / entry.name).symlink_to(entry)
    target = Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip())
    # the farm, and this checkout's src (how the editable install reaches it)
    src = Path(__file__).resolve().parents[1] / "src"
    (target / "farm.pth").write_text(f"{farm}\n{src}\n")
    return python


def _star(python: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "starrec.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_core_without_extras_runs_baselines_and_cst(core_python, tmp_path):
    env = {**os.environ, "STAR_HOME": str(tmp_path / "home")}
    for module in ("trl", "peft", "openai", "fastapi", "duckdb", "datasets"):
        probe = subprocess.run([str(core_python), "-c", f"import {module}"], env=env,
                               capture_output=True, text=True)
        assert probe.returncode != 0, f"{module} should be missing from the core environment"
    data = tmp_path / "shop"
    write_dataset_folder(data, n_users=30, n_items=50)
    for system in ("pop", "sasrec", "cst"):
        out = tmp_path / f"{system}.json"
        result = _star(core_python, "eval", "--system", system, "--dataset", str(data),
                       "--out", str(out), "--set", "eval.bootstrap_resamples=20",
                       "--set", "baselines.sasrec.epochs=1", env=env)
        assert result.returncode == 0, result.stderr[-2000:]
        assert json.loads(out.read_text())["n_tasks"] == 30
    report = _star(core_python, "report", str(tmp_path / "cst.json"), env=env)
    assert report.returncode == 0 and "| cst |" in report.stdout

    doctor = _star(core_python, "doctor", env=env)
    assert doctor.returncode == 0, doctor.stderr[-2000:]
    assert any(line.startswith("--") and "trl" in line.lower() for line in doctor.stdout.splitlines())


def test_a_command_without_its_extra_names_the_extra(core_python, tmp_path):
    env = {**os.environ, "STAR_HOME": str(tmp_path / "home")}
    result = _star(core_python, "distill", "sft", "--trajectories", str(tmp_path / "t.jsonl"),
                   "--out", str(tmp_path / "student"), env=env)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and "starrec[train]" in lines[-1], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
