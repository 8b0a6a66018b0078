"""Where an LLM's first places come from: the shown position of each item it put first in
place of the one shown first, and that item's rank under a ranker that reads the evidence
(`starrec.evaluation.paired.first_place_moves`).

    python benchmarks/first_place_moves.py \
        benchmarks/results/ml-100k/ml-100k-mars-test-eval-200.json \
        --shown benchmarks/results/ml-100k/ml-100k-presented-test-eval-200.json \
        --ranker benchmarks/results/ml-100k/ml-100k-cst-test-eval-200.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from starrec.evaluation.paired import first_place_moves, read_task_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="the system's results JSON")
    parser.add_argument("--shown", type=Path, required=True,
                        help="results JSON of the order it was shown (presented)")
    parser.add_argument("--ranker", type=Path, required=True, help="a ranker's results JSON")
    parser.add_argument("--out", type=Path, help="JSON to write (default: beside the results)")
    args = parser.parse_args(argv)
    moves = first_place_moves(read_task_rows(args.results), read_task_rows(args.shown),
                              read_task_rows(args.ranker))
    payload = {"results": args.results.name, "shown": args.shown.name,
               "ranker": args.ranker.name, **dataclasses.asdict(moves)}
    out = args.out or args.results.with_suffix(".first-place-moves.json")
    out.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    print(f"first place changed in {moves.moved} of {moves.n_tasks} tasks; shown positions "
          f"of the promoted items: {moves.shown_positions}; their mean rank under "
          f"{args.ranker.name}: {moves.mean_ranker_rank} (chance {moves.chance_rank}); "
          f"the target {moves.targets} times -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
