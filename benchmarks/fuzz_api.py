"""Fuzz the HTTP service's OpenAPI schema at a large size and commit the counts.

Runs tests/test_fuzz_api.py (schemathesis over a real loopback socket, a `pop` service on
the tests' tiny data, API keys on) with many examples per operation, and writes how many
requests were sent, by operation and status code, and how many got a server error.

    python benchmarks/fuzz_api.py --examples 1000 --out benchmarks/results/fuzz_api.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="examples per operation")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/fuzz_api.json")
    args = parser.parse_args()
    env = {**os.environ, "STAR_FUZZ_EXAMPLES": str(args.examples),
           "STAR_FUZZ_REPORT": str(args.out.resolve())}
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_fuzz_api.py"], cwd=ROOT, env=env)
    report = json.loads(args.out.read_text(encoding="utf-8"))
    report.update(passed=done.returncode == 0, seconds=round(time.perf_counter() - started, 1))
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps({k: report[k] for k in ("requests", "server_errors", "passed", "seconds")}))
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
