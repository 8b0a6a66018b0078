"""What a file of teacher trajectories (`star teach --out`) holds, as the SFT filter sees it:
runs by status, AvgHR (x100), the target at rank 1 and in the first 5 (what `--top-k 1`
and `--top-k 5` keep), how many runs returned the order they were shown, tool calls and
seconds per run.

    python benchmarks/teacher_runs.py runs/grpo-study/teacher-train.jsonl --out summary.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from starrec.training.reward import outcome_reward


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary of teacher runs (JSON lines of `star teach`); a run without a ranking
    (failed) counts as its target elsewhere."""
    if not rows:
        raise ValueError("no teacher runs")
    ranks = []
    for row in rows:
        ranking, target = row.get("ranking") or [], row["task"]["target"]
        ranks.append(ranking.index(target) + 1 if target in ranking else None)
    shown = [row.get("ranking_indices") == list(range(len(row["task"]["candidates"])))
             for row in rows]
    seconds = np.array([row.get("seconds") or 0.0 for row in rows])
    return {
        "runs": len(rows),
        "status": dict(Counter(row.get("status") for row in rows)),
        "tasks": sorted({row["task_id"] for row in rows}, key=lambda t: (len(t), t)),
        "AvgHR": round(100 * float(np.mean([outcome_reward(k) for k in ranks])), 1),
        "target_at_1": sum(k == 1 for k in ranks),
        "target_in_first_5": sum(k is not None and k <= 5 for k in ranks),
        "shown_order_identity": int(sum(shown)),
        "tool_calls_mean": round(float(np.mean([row.get("tool_calls") or 0 for row in rows])), 2),
        "seconds_median": round(float(np.median(seconds)), 1),
        "seconds_p95": round(float(np.percentile(seconds, 95)), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trajectories", type=Path)
    parser.add_argument("--out", type=Path, help="also write the summary here as JSON")
    args = parser.parse_args(argv)
    if not args.trajectories.is_file():
        parser.error(f"{args.trajectories}: no such file")
    rows = [json.loads(line) for line in args.trajectories.read_text().splitlines() if line.strip()]
    summary = summarise(rows)
    shown = {k: v for k, v in summary.items() if k != "tasks"}
    print(json.dumps(shown, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
