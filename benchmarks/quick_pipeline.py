"""The README's quick start, timed as a newcomer meets it: a fresh clone, a fresh
`$STAR_HOME`, `bash scripts/setup.sh`, then `star pipeline` with its defaults. Writes
each stage's wall time (from the pipeline's own `runs/pipeline/stages.json`), the setup
time and the machine to benchmarks/results/quick_pipeline.json (or --out), and prints them.

llama-cpp-python compiles once per machine (10-15 minutes); `--wheels DIR` copies an
already built `$STAR_HOME/wheels` into the fresh home so that the setup time is that of a
machine that has built it once, as the README states. Run it alone on the cores.

    python benchmarks/quick_pipeline.py --wheels ~/.cache/star/wheels
    python benchmarks/quick_pipeline.py --repo . --keep /tmp/qp   # keep the clone to look at
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "quick_pipeline.json"
TARGET_S = 25 * 60


def timed(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> tuple[int, float]:
    """Run one command with its output in `log`; its exit code and wall seconds."""
    start = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.call(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    return code, time.perf_counter() - start


def summary(setup_s: float, stages: dict[str, Any], commit: str, machine: dict[str, Any],
            preset: str = "quick") -> dict[str, Any]:
    """The results record: every stage's seconds, their sum, and whether the quick start
    met its target (the pipeline alone, setup excluded, within 25 minutes)."""
    seconds = {name: round(float(stage["seconds"]), 1) for name, stage in stages.items()}
    pipeline_s = round(sum(seconds.values()), 1)
    return {
        "benchmark": "quick_pipeline",
        "preset": preset,
        "commit": commit,
        "machine": machine,
        "setup_s": round(setup_s, 1),
        "stages_s": seconds,
        "pipeline_s": pipeline_s,
        "target_s": TARGET_S,
        "met": pipeline_s <= TARGET_S,
    }


def table(record: dict[str, Any]) -> str:
    rows = [f"| setup (`bash scripts/setup.sh`) | {record['setup_s']:.0f} |"]
    rows += [f"| {name} | {seconds:.0f} |" for name, seconds in record["stages_s"].items()]
    rows.append(f"| **star pipeline, all stages** | **{record['pipeline_s']:.0f}** "
                f"(target {record['target_s']}) |")
    return "\n".join(["| step | seconds |", "|---|---|", *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=ROOT, help="the git checkout to clone")
    parser.add_argument("--wheels", type=Path, default=None,
                        help="a built $STAR_HOME/wheels folder to copy into the fresh home")
    parser.add_argument("--keep", type=Path, default=None,
                        help="clone and home go here and are kept (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT / "src"))
    from starrec.evaluation.provenance import machine

    work = args.keep or Path(tempfile.mkdtemp(prefix="star-quick-"))
    clone, home = work / "clone", work / "home"
    if clone.exists() or home.exists():
        parser.error(f"{work} already holds a clone or a home; give an empty --keep folder")
    work.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "clone", "-q", str(args.repo), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=clone, check=True,
                            capture_output=True, text=True).stdout.strip()
    home.mkdir()
    if args.wheels:
        shutil.copytree(args.wheels, home / "wheels")
    env = {**os.environ, "STAR_HOME": str(home)}
    env.pop("VIRTUAL_ENV", None)
    try:
        code, setup_s = timed(["bash", "scripts/setup.sh"], clone, env, work / "setup.log")
        if code:
            print(f"error: setup failed (exit {code}); see {work / 'setup.log'}", file=sys.stderr)
            return 1
        code, wall_s = timed([str(clone / ".venv" / "bin" / "star"), "pipeline"], clone, env,
                             work / "pipeline.log")
        if code:
            print(f"error: star pipeline failed (exit {code}); see {work / 'pipeline.log'}",
                  file=sys.stderr)
            return 1
        stages = json.loads((clone / "runs" / "pipeline" / "stages.json").read_text())
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    record = summary(setup_s, stages, commit, machine())
    record["pipeline_wall_s"] = round(wall_s, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(table(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
