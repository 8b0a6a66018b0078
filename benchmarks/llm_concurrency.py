"""Teacher or student evaluation against OpenAI-compatible servers at several concurrency
levels: tasks per second, per-task latency (median, p95) and the speed-up over sequential.

By default it starts `--servers` llama.cpp servers on loopback (`python -m llama_cpp.server`,
the `llamaserver` extra), each with `--threads` compute threads, serving the model's GGUF;
`--base-url` measures servers that already run instead (vLLM, SGLang, ...). Every level
answers the same tasks from a fresh records file, through `starrec.evaluate`, as `star eval
--concurrency N` does. One llama.cpp server computes one request at a time, so against one
server concurrency only overlaps the client's own work (and interleaving runs costs the
prefix cache its hits); with several servers, each worker thread keeps to one of them
(`starrec.llm.endpoints`) and throughput grows with the servers. vLLM and SGLang batch
concurrent requests inside one server.

Prints a table and writes benchmarks/results/llm_concurrency.json after every level; a
rerun keeps the levels already in that file (same settings) and measures the rest
(`--fresh` measures all again).

    python benchmarks/llm_concurrency.py                          # teacher, smollm2, 1 server
    python benchmarks/llm_concurrency.py --servers 4 --threads 4  # 4 servers, 16 cores
    python benchmarks/llm_concurrency.py --system star --model runs/pipeline/student
    python benchmarks/llm_concurrency.py --base-url http://gpu:8000/v1 --served-model NAME
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
ALIAS = "bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", choices=("mars", "star"), default="mars",
                        help="the teacher (mars) or a student (star, --model FOLDER)")
    parser.add_argument("--model", default="smollm2",
                        help="smollm2, a .gguf file, or a model folder (a student's for star)")
    parser.add_argument("--tasks", type=int, default=16, help="first N tasks of the task set")
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="concurrency levels (tasks in flight at once)")
    parser.add_argument("--servers", type=int, default=1,
                        help="llama.cpp server processes (endpoints) to start")
    parser.add_argument("--threads", type=int, default=2, help="compute threads per server")
    parser.add_argument("--n-ctx", type=int, default=8192, help="context of each server")
    parser.add_argument("--base-url", help="measure these running servers (comma-separated) "
                        "instead of starting llama.cpp servers")
    parser.add_argument("--served-model", help="the name --base-url serves the model under")
    parser.add_argument("--guided", default=None,
                        help="guided of the system's llm section (default: llamacpp for "
                        "started servers, else none)")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--users", default="eval-200", choices=("all", "eval-200", "valid-200"))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="a config override, as star --set section.key=value")
    parser.add_argument("--out", type=Path, default=RESULTS / "llm_concurrency.json")
    parser.add_argument("--fresh", action="store_true", help="measure every level again")
    args = parser.parse_args(argv)
    if args.base_url and not args.served_model:
        parser.error("--base-url needs --served-model (the name the server serves)")
    if args.tasks < 1 or args.servers < 1 or min(args.levels) < 1:
        parser.error("--tasks, --servers and --levels must be at least 1")
    return args


def served_gguf(spec: str, dtype: str) -> Path:
    """The GGUF a llama.cpp server serves for `spec`: the file itself, or the export of a
    model folder (`smollm2`'s de-quantised folder included), as the in-process engine
    runs them."""
    from starrec.llm import models

    if spec.endswith(".gguf"):
        return Path(spec)
    folder = models.resolve_model_folder(spec)
    return models.folder_gguf(folder, dtype)


def settings(args: argparse.Namespace) -> dict:
    """What a level's numbers depend on; a rerun reuses levels measured under the same."""
    return {"system": args.system, "model": args.model, "tasks": args.tasks,
            "servers": None if args.base_url else args.servers,
            "threads": None if args.base_url else args.threads,
            "base_url": args.base_url, "served_model": args.served_model,
            "guided": args.guided, "dataset": args.dataset, "users": args.users,
            "n_ctx": args.n_ctx, "overrides": args.overrides}


def level_row(concurrency: int, wall_s: float, evaluation) -> dict:
    records = evaluation.records
    seconds = np.array([r.seconds for r in records])
    result = evaluation.result
    return {"concurrency": concurrency, "tasks": len(records), "wall_s": round(wall_s, 2),
            "tasks_per_s": round(len(records) / wall_s, 4),
            "median_s": round(float(np.median(seconds)), 3),
            "p95_s": round(float(np.percentile(seconds, 95)), 3),
            "llm_calls_per_task": result["efficiency"]["llm_calls_per_task"],
            "prompt_tokens_per_task": result["efficiency"]["prompt_tokens_per_task"],
            "AvgHR": result["metrics"]["AvgHR"],
            "fallback_rate": result["metrics"].get("fallback_rate"),
            "load_average": [round(x, 2) for x in os.getloadavg()]}


def table(rows: list[dict]) -> str:
    base = next((r for r in rows if r["concurrency"] == 1), None)
    lines = ["| concurrency | tasks | wall s | tasks/s | median s/task | p95 s/task | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: r["concurrency"]):
        speedup = f"{row['tasks_per_s'] / base['tasks_per_s']:.2f}x" if base else "n/a"
        lines.append(f"| {row['concurrency']} | {row['tasks']} | {row['wall_s']:.1f} | "
                     f"{row['tasks_per_s']:.3f} | {row['median_s']:.2f} | {row['p95_s']:.2f} | "
                     f"{speedup} |")
    return "\n".join(lines)


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    base = next((r for r in rows if r["concurrency"] == 1), None)
    for row in rows:
        row["speedup"] = round(row["tasks_per_s"] / base["tasks_per_s"], 3) if base else None
    payload = {"benchmark": "llm_concurrency", "settings": settings(args),
               "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                           "processor": platform.processor() or platform.machine()},
               "levels": sorted(rows, key=lambda r: r["concurrency"])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, args.out)


def earlier_rows(args: argparse.Namespace) -> list[dict]:
    """Levels an earlier run of the same settings measured (none with --fresh)."""
    if args.fresh or not args.out.exists():
        return []
    earlier = json.loads(args.out.read_text(encoding="utf-8"))
    if earlier.get("settings") != settings(args):
        return []
    return [r for r in earlier.get("levels", []) if r["concurrency"] in args.levels]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import starrec
    from starrec.config import load_config
    from starrec.llm.local_server import LlamaServer, missing_server_packages

    cfg = load_config(None, args.overrides)
    rows = earlier_rows(args)
    todo = [c for c in dict.fromkeys(args.levels) if c not in {r["concurrency"] for r in rows}]
    if rows:
        print(f"kept from {args.out}: concurrency {sorted(r['concurrency'] for r in rows)}")
    if not todo:
        print(table(rows))
        return 0
    if not args.base_url and missing_server_packages():
        print(f"error: the llama.cpp server needs {', '.join(missing_server_packages())}: "
              "pip install -e .[llamaserver]", file=sys.stderr)
        return 2
    tasks = starrec.load_task_set(args.dataset, cfg, users=args.users, limit=args.tasks)
    starrec.evidence_store(tasks, cfg)  # built before any level is timed
    section = "mars" if args.system == "mars" else "student"  # whose llm settings answer
    with tempfile.TemporaryDirectory(prefix="llm-concurrency-") as work, ExitStack() as stack:
        if args.base_url:
            urls, served = args.base_url.split(","), args.served_model
        else:
            gguf = served_gguf(args.model, getattr(cfg, section).llm.gguf_dtype)
            servers = [LlamaServer(gguf, alias=ALIAS, threads=args.threads, n_ctx=args.n_ctx,
                                   log_path=Path(work) / f"server{i}.log")
                       for i in range(args.servers)]
            for server in servers:
                stack.callback(server.stop)
                server.start()
            urls, served = [s.url for s in servers], ALIAS
        llm = getattr(cfg, section).llm.model_copy(update={
            "backend": "openai", "base_url": urls, "model": served, "served_model": served,
            "guided": args.guided or ("none" if args.base_url else "llamacpp")})
        spec = args.model if args.system == "star" else served
        print(f"{args.system} on {len(tasks)} tasks of {args.dataset} {args.users}, "
              f"{len(urls)} endpoint(s): {', '.join(urls)}")
        for concurrency in todo:
            level_llm = llm.model_copy(update={"concurrency": concurrency})
            level_cfg = cfg.model_copy(update={
                section: getattr(cfg, section).model_copy(update={"llm": level_llm})})
            start = time.perf_counter()
            evaluation = starrec.evaluate(args.system, tasks, level_cfg, model=spec,
                                          records=Path(work) / f"records-c{concurrency}.jsonl")
            rows.append(level_row(concurrency, time.perf_counter() - start, evaluation))
            write(args, rows)
            print(f"concurrency {concurrency}: {rows[-1]['tasks_per_s']:.3f} tasks/s, "
                  f"p95 {rows[-1]['p95_s']:.2f} s")
    print(table(rows))
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
