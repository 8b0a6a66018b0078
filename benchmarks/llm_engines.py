"""SmolLM2-135M prefill and decode speed: llama.cpp (the shipped Q4_1 GGUF and exports of
the de-quantised folder) against transformers, through the `ChatModel` API.

Each case runs in a fresh subprocess, so its OpenMP wait policy (read once, when libgomp
loads) is its own. A case times a ~600-token prompt with 1 generated token (prefill) and
with 64 (prefill + decode), best of `--repeats`, with llama.cpp's prompt cache cleared
so every run pays the full prefill. Prints a table and writes
benchmarks/results/llm_engines-t<threads>.json with the load average seen around each case.

    python benchmarks/llm_engines.py                   # all cases, 2 threads
    python benchmarks/llm_engines.py --cases q4_1 hf   # a subset
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CASES = {  # name -> (engine, GGUF dtype or None)
    "q4_1": ("llamacpp", None),
    "f16": ("llamacpp", "f16"),
    "q8_0": ("llamacpp", "q8_0"),
    "hf": ("transformers", None),
}
GENRES = ["Action", "Comedy", "Drama", "Thriller", "Romance", "Sci-Fi", "Horror", "Animation"]


def prompt_text(lines: int = 23) -> str:
    """A teacher-like prompt: a watch history and a candidate list, as raw text."""
    rows = [f"{i + 1}. Movie number {i * 7 % 101} ({1970 + i % 30}), {GENRES[i % 8]} and "
            f"{GENRES[(i * 3) % 8]}, rated {1 + i % 5}/5" for i in range(lines)]
    return ("The user watched these movies, oldest first:\n" + "\n".join(rows[: lines // 2])
            + "\n\nCandidates:\n" + "\n".join(rows[lines // 2:])
            + "\n\nDescribe the user's taste in detail, then rank the candidates.\n")


def run_case(name: str, threads: int, repeats: int) -> dict:
    """Runs inside the subprocess."""
    engine, dtype = CASES[name]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from starrec.llm import models

    start = time.perf_counter()
    if engine == "llamacpp":
        from starrec.llm.llamacpp_backend import LlamaCppChatModel, import_llama_cpp

        import_llama_cpp()
        gguf = (models.smollm2_gguf() if dtype is None
                else models.folder_gguf(models.resolve_model_folder("smollm2"), dtype))
        model = LlamaCppChatModel(gguf, threads=threads, n_ctx=2048)
        reset = model.llama.reset  # forget the cached prompt: every run pays the prefill
    else:
        from starrec.llm.hf_backend import HFChatModel

        model = HFChatModel.load(models.resolve_model_folder("smollm2"), threads=threads)
        reset = lambda: None  # noqa: E731 - transformers keeps no cache between calls
    load_s = time.perf_counter() - start
    prompt = prompt_text()
    model.complete("Warm up", max_tokens=4)
    prefill, full = [], []
    for _ in range(repeats):
        reset()
        prefill.append(model.complete(prompt, max_tokens=1))
        reset()
        full.append(model.complete(prompt, max_tokens=64))
    first = min(c.seconds for c in prefill)
    best = min(full, key=lambda c: c.seconds)
    return {"case": name, "engine": engine,
            "gguf": Path(gguf).name if engine == "llamacpp" else None,  # no path of this machine
            "threads": threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY") or "default",
            "load_s": round(load_s, 2), "prompt_tokens": best.prompt_tokens,
            "generated": best.completion_tokens, "prefill_s": round(first, 3),
            "prefill_tok_s": round(best.prompt_tokens / first, 1),
            "total_s": round(best.seconds, 3),
            "decode_tok_s": round((best.completion_tokens - 1) / (best.seconds - first), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--policies", nargs="+", default=["PASSIVE", "default"],
                        help="OpenMP wait policies to run each case under")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run a case, print JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_case(args.one, args.threads, args.repeats)))
        return
    rows = []
    for policy in args.policies:
        for name in args.cases:
            # "" is libgomp's default (it says the value is invalid and ignores it) and
            # stops the llama.cpp backend from choosing PASSIVE itself
            env = {**os.environ, "OMP_WAIT_POLICY": "" if policy == "default" else policy}
            before = os.getloadavg()
            done = subprocess.run([sys.executable, __file__, "--one", name, "--threads",
                                   str(args.threads), "--repeats", str(args.repeats)],
                                  env=env, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"case {name} failed")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["loadavg_before"], row["loadavg_after"] = before, os.getloadavg()
            rows.append(row)
            print(f"{name:5} {row['omp_wait_policy']:9} prefill {row['prefill_tok_s']:7.1f} tok/s "
                  f"({row['prompt_tokens']} tokens)  decode {row['decode_tok_s']:6.1f} tok/s "
                  f"({row['generated']} tokens)  load avg {before[0]:.2f} -> "
                  f"{row['loadavg_after'][0]:.2f}", flush=True)
    out = RESULTS / f"llm_engines-t{args.threads}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.processor() or platform.machine(),
                                   "cpus": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
