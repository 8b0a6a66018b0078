"""Student passes on the transformers backend with and without the reuse of the previous
call's KV cache over the common prefix (`starrec.llm.hf_backend`): seconds per pass and
prompt tokens actually computed. This is the backend of GRPO's rollouts and valid curve
on a CPU. The two settings alternate task by task, each pass sampled with the same seed
(temperature 0.7, as a rollout); a pass may still write other tokens under the two
settings (the logits agree within float rounding, not bit for bit), so the generated
tokens are reported beside the seconds. Writes benchmarks/results/hf_prefix_reuse.json
(or --out). Run it alone on the cores.

    python benchmarks/hf_prefix_reuse.py --tasks 3
    python benchmarks/hf_prefix_reuse.py --model runs/sft --tasks 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "hf_prefix_reuse.json"


def passes(chat: Any, student: Any, tasks: list[Any]) -> list[dict[str, Any]]:
    """One pass per task and setting, the order of the settings swapped every task."""
    rows = []
    for index, task in enumerate(tasks):
        order = (False, True) if index % 2 == 0 else (True, False)
        for reuse in order:
            chat.reuse_prefix = reuse
            chat.forget_prefix()
            before = chat.reused_tokens
            started = time.perf_counter()
            answer = student.answer(task)
            seconds = time.perf_counter() - started
            reused = chat.reused_tokens - before
            rows.append({"task_id": task.task_id, "reuse": reuse, "seconds": round(seconds, 3),
                         "requests": answer.segments, "prompt_tokens": answer.prompt_tokens,
                         "prompt_tokens_computed": answer.prompt_tokens - reused,
                         "completion_tokens": answer.completion_tokens})
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by = {reuse: [r for r in rows if r["reuse"] is reuse] for reuse in (False, True)}
    out: dict[str, Any] = {}
    for reuse, chosen in by.items():
        name = "reuse" if reuse else "no_reuse"
        out[name] = {key: statistics.median(r[key] for r in chosen)
                     for key in ("seconds", "prompt_tokens", "prompt_tokens_computed",
                                 "completion_tokens", "requests")}
        out[name]["total_seconds"] = round(sum(r["seconds"] for r in chosen), 2)
    paired = [a["seconds"] / b["seconds"] for a in by[False] for b in by[True]
              if a["task_id"] == b["task_id"] and b["seconds"] > 0]
    out["speedup_median"] = round(statistics.median(paired), 2) if paired else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="a model spec or student folder")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--tasks", type=int, default=3, help="the first N valid-200 tasks")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a config override, e.g. student.max_new_tokens=256")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT / "src"))
    import starrec
    from starrec.config import load_config
    from starrec.evaluation.provenance import code_version, machine
    from starrec.inference.student import Student
    from starrec.llm.card import read_model_card
    from starrec.llm.hf_backend import HFChatModel
    from starrec.llm.models import resolve_model_folder

    config = load_config(None, args.overrides)
    tasks = starrec.load_task_set(args.dataset, config, users="valid-200", limit=args.tasks)
    store = starrec.evidence_store(tasks, config, progress=False)
    folder = resolve_model_folder(args.model)
    card = read_model_card(folder) if Path(folder).is_dir() else None
    chat = HFChatModel.load(folder, threads=args.threads, name=args.model)
    student_config = config.student.model_copy(update={"temperature": 0.7, "seed": 0})
    fmt = card.format if card is not None else config.sft.format
    student = Student(chat, store, fmt, student_config,
                      plan_choices=card.plan_choices if card else (),
                      reflection_cap=card.max_reflection_tokens if card else None)
    rows = passes(chat, student, list(tasks))
    record = {"benchmark": "hf_prefix_reuse", "model": args.model, "dataset": args.dataset,
              "tasks": len(tasks), "code_version": code_version(), "machine": machine(),
              "threads": chat.threads, "summary": summary(rows), "passes": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    s = record["summary"]
    print("| setting | median s/pass | prompt tokens | computed | completion tokens |")
    print("|---|---|---|---|---|")
    for name in ("no_reuse", "reuse"):
        m = s[name]
        print(f"| {name} | {m['seconds']:.1f} | {m['prompt_tokens']:.0f} | "
              f"{m['prompt_tokens_computed']:.0f} | {m['completion_tokens']:.0f} |")
    print(f"paired speed-up (median over tasks): {s['speedup_median']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
