"""Load benchmark of `star serve` over loopback (issue 17): throughput and latency under
concurrent clients, with and without micro-batching, and the student's prefill limit.

For each system a real `star serve` process is started on a free loopback port (in its
own process, so that the load generator does not share its interpreter), and closed-loop
clients (aiohttp, asyncio; each sends its next request when its last is answered) send
the requests `star eval` answers: each test user's id and the candidates of its test
task. Per concurrency level: requests/s, p50 / p95 / p99 latency of the answered
requests, errors by status (503 from a full queue apart), the mean micro-batch size
(from /metrics) and the server's CPU time per request.

For the student (`--student DIR`, or `tiny`: a random 2-layer model on SmolLM2's
tokenizer, for a smoke run) in its fast mode the benchmark first measures the engine's
prefill throughput directly (the ranking head's forward passes over the same prompts, in
this process, before the server starts): prompt tokens per second alone and in batches.
The prefill limit is that throughput divided by the prompt tokens of one request, the
most requests/s the engine could answer with nothing else to do; the service's best
requests/s is reported as a share of it.

    python benchmarks/load_api.py --student smollm2          # the full run (idle cores)
    python benchmarks/load_api.py --smoke --student tiny --out /tmp/load_api.json
    python benchmarks/load_api.py --systems cst,pop --processes 2   # forked workers, one port

Writes benchmarks/results/load_api.json and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel, Field

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks/results/load_api.json"


def shown_path(path: Path) -> str:
    """`path` relative to the checkout where it is inside it (results name no machine's
    folders)."""
    resolved = path.resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


# issue 17's targets
CST_RPS, CST_P95_MS, STUDENT_SHARE = 300.0, 50.0, 0.8
SERVING = re.compile(r"serving \S+ on (http://[\d.]+:\d+)")


class Payload(BaseModel):
    user_id: str
    candidates: list[str]


class Level(BaseModel):
    """One concurrency level against one server."""

    system: str
    batching: bool
    concurrency: int
    mode: str | None = None  # the student's (fast, generate, reason); None for a ranker
    requests: int  # answered or refused, in the measured window
    seconds: float
    rps: float  # answered (200) per second
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    statuses: dict[str, int]  # status code (or "transport") -> count
    overloaded: int  # 503 from a full queue
    errors: int  # every other non-200
    mean_batch: float | None  # requests per micro-batch (None: not batching)
    server_cpu_ms: float | None  # server CPU time per answered request
    client_cpu_ms: float  # load generator CPU time per request


class Prefill(BaseModel):
    """The student's engine alone: ranking-head forward passes over served prompts."""

    model: str
    prompts: int
    prompt_tokens_mean: float
    alone_tokens_per_s: float  # one prompt per forward pass
    batched_tokens_per_s: float  # `batch` prompts per pass (real tokens, padding not counted)
    batch: int
    limit_rps: float  # the best of the two over prompt tokens per request
    in_process_rps: float  # whole answers in process (prompt building too), batched, no HTTP


class Report(BaseModel):
    created: str
    machine: dict[str, Any]
    settings: dict[str, Any]
    levels: list[Level] = Field(default_factory=list)
    prefill: Prefill | None = None
    targets: dict[str, Any] = Field(default_factory=dict)


# ---------------------------------------------------------------------------------------
# the server


class Server:
    """`star serve` in a subprocess: its base URL once ready, its CPU time, its metrics."""

    def __init__(self, args: list[str], ready_s: float) -> None:
        self.command = [sys.executable, "-m", "starrec.cli.main", "serve", "--host", "127.0.0.1",
                        "--port", "0", "--log-level", "warning", *args]
        self.ready_s = ready_s
        self.lines: deque[str] = deque(maxlen=200)
        self.base: str | None = None

    def __enter__(self) -> Server:
        import httpx

        self.process = subprocess.Popen(self.command, cwd=ROOT, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        found = threading.Event()

        def read() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                self.lines.append(line.rstrip())
                match = SERVING.search(line)
                if match and self.base is None:
                    self.base = match.group(1)
                    found.set()
            found.set()

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + self.ready_s
        if not found.wait(self.ready_s) or self.base is None:
            self._fail("did not start")
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail("exited")
            try:
                response = httpx.get(f"{self.base}/v1/ready", timeout=5)
                if response.status_code == 200:
                    return self
                if response.json().get("status") == "failed":
                    self._fail(f"warm-up failed: {response.text}")
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self._fail(f"not ready within {self.ready_s:g} s")
        return self

    def _fail(self, what: str) -> None:
        self.stop()
        tail = "\n".join(list(self.lines)[-15:])
        raise RuntimeError(f"star serve {what}: {' '.join(self.command[3:])}\n{tail}")

    def cpu_seconds(self) -> float | None:
        """User + system CPU time of the server process and its live workers
        (`--processes`; Linux /proc), else None."""
        def stat(pid: int | str) -> list[str]:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()

        try:
            pids = [self.process.pid]
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    try:
                        if int(stat(entry.name)[1]) == self.process.pid:
                            pids.append(int(entry.name))
                    except (OSError, IndexError, ValueError):
                        continue
            ticks = sum(int(f[11]) + int(f[12]) for f in map(stat, pids))
            return ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def batches(self) -> tuple[float, float] | None:
        """(requests, batches) micro-batched so far; None when the server does not batch."""
        import httpx

        text = httpx.get(f"{self.base}/metrics", timeout=10).text
        total = re.search(r"^star_batch_size_sum (\S+)$", text, re.M)
        count = re.search(r"^star_batch_size_count (\S+)$", text, re.M)
        return (float(total.group(1)), float(count.group(1))) if total and count else None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __exit__(self, *_: object) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------
# the load generator


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


async def _drive(base: str, payloads: list[Payload], concurrency: int, seconds: float,
                 most: int | None, timeout_s: float) -> tuple[list[float], Counter[str], float]:
    """Closed-loop clients for `seconds` (or until `most` requests): latencies (s) of the
    200s, statuses, and the window's length. aiohttp, one keep-alive connection per
    client, bodies serialised once: the generator shares the machine's cores with the
    server, so its own cost per request is kept small (it is measured: `client_cpu_ms`)."""
    import aiohttp

    bodies = [json.dumps(p.model_dump()).encode() for p in payloads]
    headers = {"Content-Type": "application/json"}
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    sent = 0
    started = time.perf_counter()
    deadline = started + seconds
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with aiohttp.ClientSession(base, connector=connector, timeout=timeout) as session:
        async def client_loop() -> None:
            nonlocal sent
            while time.perf_counter() < deadline and (most is None or sent < most):
                body = bodies[sent % len(bodies)]
                sent += 1
                t0 = time.perf_counter()
                try:
                    async with session.post("/v1/recommend", data=body, headers=headers) as response:
                        await response.read()
                        status = str(response.status)
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    status = "transport"
                if status == "200":
                    latencies.append(time.perf_counter() - t0)
                statuses[status] += 1

        await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    return latencies, statuses, time.perf_counter() - started


def run_level(server: Server, system: str, batching: bool, payloads: list[Payload],
              concurrency: int, seconds: float, most: int | None, warmup_s: float,
              timeout_s: float, mode: str | None = None) -> Level:
    assert server.base is not None
    if warmup_s > 0:
        asyncio.run(_drive(server.base, payloads, concurrency, warmup_s, None, timeout_s))
    before_batches, before_cpu = server.batches(), server.cpu_seconds()
    client_cpu = time.process_time()
    latencies, statuses, window = asyncio.run(
        _drive(server.base, payloads, concurrency, seconds, most, timeout_s))
    client_cpu = time.process_time() - client_cpu
    after_cpu, after_batches = server.cpu_seconds(), server.batches()
    answered = statuses.get("200", 0)
    requests = sum(statuses.values())
    mean_batch = None
    if before_batches is not None and after_batches is not None:
        batched = after_batches[0] - before_batches[0]
        count = after_batches[1] - before_batches[1]
        mean_batch = round(batched / count, 2) if count else None
    ms = [s * 1000 for s in latencies]
    return Level(
        system=system, batching=batching, concurrency=concurrency, mode=mode, requests=requests,
        seconds=round(window, 3), rps=round(answered / window, 4) if window else 0.0,
        p50_ms=_round(percentile(ms, 50)), p95_ms=_round(percentile(ms, 95)),
        p99_ms=_round(percentile(ms, 99)), mean_ms=_round(statistics.fmean(ms) if ms else None),
        statuses=dict(sorted(statuses.items())), overloaded=statuses.get("503", 0),
        errors=requests - answered - statuses.get("503", 0), mean_batch=mean_batch,
        server_cpu_ms=(_round((after_cpu - before_cpu) * 1000 / answered)
                       if answered and after_cpu is not None and before_cpu is not None else None),
        client_cpu_ms=round(client_cpu * 1000 / max(requests, 1), 3))


def _round(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


# ---------------------------------------------------------------------------------------
# the student's engine alone


def tiny_student(folder: Path) -> Path:
    """A random 2-layer Llama on SmolLM2-135M-Instruct's tokenizer and chat template, so
    that its prompts have the real student's token counts at a fraction of the compute
    (a smoke run's model, not a measurement)."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from starrec.llm.models import resolve_model_folder

    source = Path(resolve_model_folder("smollm2"))
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.save_pretrained(folder)
    for name in ("chat_template.jinja",):
        if (source / name).exists():
            shutil.copy(source / name, folder / name)
    config = AutoConfig.from_pretrained(source)
    config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32})
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def measure_prefill(model: str, dataset: str, overrides: list[str], payloads: list[Payload],
                    batch: int, prompts: int, repeats: int = 3) -> Prefill:
    """Forward passes of the student's ranking head over the prompts the service builds
    for `payloads` (the first `prompts`): alone, then `batch` at a time; the best of
    `repeats` runs of each."""
    from starrec.api.schemas import RecommendRequest
    from starrec.api.service import HeadSystem, load_service
    from starrec.config import load_config

    config = load_config(None, [*overrides, "student.mode=fast"])
    service = load_service("star", dataset, config=config, model=model, progress=False)
    if not isinstance(service.system, HeadSystem):
        raise RuntimeError(f"{model}: the student did not load with a ranking head")
    system = service.system.system
    head, store = system.head, system.store
    tasks = []
    for payload in payloads[:prompts]:
        prepared = service.prepare(RecommendRequest(**payload.model_dump()))
        tasks.append(prepared.task(prepared.candidates or []))
    texts = [head.prompt(task, store) for task in tasks]
    tokens = [head.count(text) for text in texts]
    n = max(len(task.candidates) for task in tasks)
    head.scores(texts[:1], n)  # warm-up: first-call allocations

    def best_rate(run: Callable[[], None], amount: float) -> float:
        """`amount` per second of the fastest of `repeats` runs: a limit is what the
        engine can do, and a slower run only measured something else on the machine."""
        fastest = math.inf
        for _ in range(repeats):
            started = time.perf_counter()
            run()
            fastest = min(fastest, time.perf_counter() - started)
        return amount / fastest

    alone = best_rate(lambda: [head.scores([text], n) for text in texts], sum(tokens))
    batched = best_rate(lambda: [head.scores(texts[i:i + batch], n)
                                 for i in range(0, len(texts), batch)], sum(tokens))
    in_process = best_rate(lambda: [system.answer_many(tasks[i:i + batch])
                                    for i in range(0, len(tasks), batch)], len(tasks))
    mean_tokens = statistics.fmean(tokens)
    result = Prefill(model=model, prompts=len(texts), prompt_tokens_mean=round(mean_tokens, 1),
                     alone_tokens_per_s=round(alone, 1), batched_tokens_per_s=round(batched, 1),
                     batch=min(batch, len(texts)),
                     limit_rps=round(max(alone, batched) / mean_tokens, 3),
                     in_process_rps=round(in_process, 3))
    del service, system, head, store
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------
# the run


def payloads_of(dataset: str, overrides: list[str], limit: int | None) -> list[Payload]:
    """Each test user's id and its test task's candidates (what `star eval` answers)."""
    from starrec.config import load_config
    from starrec.experiment import load_task_set

    tasks = load_task_set(dataset, load_config(None, overrides), split="test").tasks
    return [Payload(user_id=t.user_id, candidates=list(t.candidates)) for t in tasks][:limit]


def machine() -> dict[str, Any]:
    import importlib.util

    cpu = ""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((line.split(":", 1)[1].strip() for line in lines
                    if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "platform": platform.platform(),
            # what uvicorn picks: httptools / uvloop when installed, else h11 / asyncio
            "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
            "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None}


@dataclass
class Case:
    """One server to measure: a system, batching on or off, its `star serve` arguments,
    the client counts, the student's mode (None for a ranker) and seconds per level."""

    system: str
    batching: bool
    serve_args: list[str]
    levels: list[int]
    mode: str | None
    duration: float


BATCHED = ("star", "sasrec", "cst", "cst-manual")


def cases(args: argparse.Namespace, student: str | None) -> list[Case]:
    """The servers to measure, in order: each ranker (with and without micro-batching
    where it batches), then the student in each of `--student-modes` (its fast mode with
    and without batching; the generating modes answer one request at a time)."""
    common = ["--dataset", args.dataset, "--max-queue", str(args.max_queue),
              "--max-batch-size", str(args.max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
              *[a for s in args.set for a in ("--set", s)],
              *(["--compute-threads", str(args.compute_threads)] if args.compute_threads else []),
              *(["--processes", str(args.processes)] if args.processes > 1 else [])]
    out = []
    for system in args.systems:
        if system == "star":
            if student is None:
                continue
            for mode in args.student_modes:
                extra = ["--model", student, "--set", f"student.mode={mode}", "--timeout-s", "600"]
                fast = mode == "fast"
                for batching in ([True, False] if fast else [False]):
                    out.append(Case(system, batching,
                                    [*common, "--system", system, *extra,
                                     "--batching" if batching else "--no-batching"],
                                    args.student_concurrency if fast else args.generate_concurrency,
                                    mode, args.student_duration if fast else args.generate_duration))
            continue
        extra = (["--set", f"baselines.sasrec.epochs={args.sasrec_epochs}"]
                 if system == "sasrec" else [])
        # systems that score a batch in one call (score_many) are measured with and without
        # micro-batching; the others gain nothing from it
        for batching in ([True, False] if system in BATCHED else [False]):
            out.append(Case(system, batching, [*common, "--system", system, *extra,
                                               "--batching" if batching else "--no-batching"],
                            args.concurrency, None, args.duration))
    return out


def targets(report: Report) -> dict[str, Any]:
    out: dict[str, Any] = {}
    cst = [lv for lv in report.levels if lv.system == "cst"]
    if cst:
        best = max(cst, key=lambda lv: lv.rps if (lv.p95_ms or 1e9) < CST_P95_MS else -1)
        out["cst"] = {"target": f">= {CST_RPS:g} requests/s with p95 < {CST_P95_MS:g} ms",
                      "best_rps_within_p95": best.rps if (best.p95_ms or 1e9) < CST_P95_MS else 0.0,
                      "at_concurrency": best.concurrency, "p95_ms": best.p95_ms,
                      "met": best.rps >= CST_RPS and (best.p95_ms or 1e9) < CST_P95_MS}
    star = [lv for lv in report.levels if lv.system == "star" and lv.mode in (None, "fast")]
    if star and report.prefill is not None:
        limit = report.prefill.limit_rps
        best = {b: max((lv.rps for lv in star if lv.batching == b), default=0.0)
                for b in (True, False)}
        share = {str(b): round(rps / limit, 3) for b, rps in best.items()}
        out["star_fast"] = {"target": f">= {STUDENT_SHARE:.0%} of the prefill limit with batching",
                            "prefill_limit_rps": limit, "share_batching": share["True"],
                            "share_no_batching": share["False"],
                            "met": share["True"] >= STUDENT_SHARE}
    errors = sum(lv.errors for lv in report.levels)
    out["errors_other_than_503"] = {"count": errors, "met": errors == 0}
    return out


def table(report: Report) -> str:
    head = ("| system | batching | clients | requests | req/s | p50 ms | p95 ms | p99 ms | "
            "503 | other errors | mean batch | server CPU ms/req |")
    rows = [head, "|" + "---|" * 12]
    for lv in report.levels:
        name = f"{lv.system} ({lv.mode})" if lv.mode else lv.system
        rows.append(f"| {name} | {'on' if lv.batching else 'off'} | {lv.concurrency} | "
                    f"{lv.requests} | {_rate(lv.rps)} | {_fmt(lv.p50_ms)} | {_fmt(lv.p95_ms)} | "
                    f"{_fmt(lv.p99_ms)} | {lv.overloaded} | {lv.errors} | {_fmt(lv.mean_batch)} | "
                    f"{_fmt(lv.server_cpu_ms)} |")
    lines = ["\n".join(rows)]
    if report.prefill is not None:
        p = report.prefill
        lines.append(f"\nstudent prefill ({p.model}): {p.prompt_tokens_mean:.0f} prompt tokens per "
                     f"request; {p.alone_tokens_per_s:.0f} tokens/s alone, "
                     f"{p.batched_tokens_per_s:.0f} tokens/s in batches of {p.batch}; limit "
                     f"{p.limit_rps:.2f} requests/s; in process (prompts built, no HTTP) "
                     f"{p.in_process_rps:.2f} requests/s")
    for name, target in report.targets.items():
        lines.append(f"{name}: {json.dumps(target)}")
    return "\n".join(lines)


def _rate(rps: float) -> str:
    """Requests per second as read: one decimal for a ranker, three figures for a model
    that answers in seconds or minutes."""
    return f"{rps:.1f}" if rps >= 10 else f"{rps:.3g}"


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


@contextmanager
def student_folder(spec: str | None) -> Iterator[str | None]:
    if spec != "tiny":
        yield spec
        return
    with tempfile.TemporaryDirectory(prefix="star-tiny-student-") as folder:
        yield str(tiny_student(Path(folder)))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ints = lambda text: [int(x) for x in text.split(",") if x.strip()]  # noqa: E731
    names = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", type=names, default=["cst", "pop", "sasrec", "star"],
                        help="comma-separated: rankers and star (star needs --student)")
    parser.add_argument("--student", help="the student for star: a model folder, smollm2, or "
                        "tiny (a random 2-layer model on SmolLM2's tokenizer, smoke runs)")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--concurrency", type=ints, default=[1, 8, 32, 64],
                        help="client counts for the rankers")
    parser.add_argument("--student-concurrency", type=ints, default=[1, 4, 16],
                        help="client counts for the student's fast mode")
    parser.add_argument("--student-modes", type=names, default=["fast"],
                        help="the student's modes to measure: fast, generate, reason")
    parser.add_argument("--generate-concurrency", type=ints, default=[1, 2],
                        help="client counts for the generating modes (one request at a time)")
    parser.add_argument("--generate-duration", type=float, default=120.0,
                        help="seconds per level for the generating modes")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per level")
    parser.add_argument("--student-duration", type=float, default=30.0)
    parser.add_argument("--requests", type=int, default=None, help="at most this many per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each level")
    parser.add_argument("--max-queue", type=int, default=128)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--prefill-prompts", type=int, default=16)
    parser.add_argument("--compute-threads", type=int, default=None,
                        help="star serve --compute-threads (default: the server's own)")
    parser.add_argument("--processes", type=int, default=1,
                        help="star serve --processes: server processes on the one port")
    parser.add_argument("--sasrec-epochs", type=int, default=5,
                        help="SASRec's training epochs in the served model (its answer cost "
                        "does not depend on them)")
    parser.add_argument("--set", action="append", default=[], help="a config override, as "
                        "star's --set (repeatable)")
    parser.add_argument("--smoke", action="store_true", help="a few seconds per system: "
                        "checks the benchmark runs; numbers mean nothing")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.smoke:
        args.concurrency, args.student_concurrency = [1, 4], [1, 4]
        args.generate_concurrency = [1]
        args.duration = args.student_duration = args.generate_duration = 1.5
        args.warmup, args.prefill_prompts, args.sasrec_epochs = 0.3, 4, 1
    known = {"random", "presented", "pop", "itemknn", "als", "sasrec", "cst", "cst-manual", "star"}
    unknown = [s for s in args.systems if s not in known]
    if unknown:
        parser.error(f"--systems: unknown {', '.join(unknown)}; expected some of "
                     f"{', '.join(sorted(known))}")
    bad_modes = [m for m in args.student_modes if m not in ("fast", "generate", "reason")]
    if bad_modes or not args.student_modes:
        parser.error(f"--student-modes: expected some of fast, generate, reason, got "
                     f"{', '.join(args.student_modes) or 'none'}")
    if "star" in args.systems and args.student is None:
        print("note: star is skipped without --student DIR|smollm2|tiny", file=sys.stderr)
    if min([*args.concurrency, *args.student_concurrency, args.max_batch_size,
            args.processes]) < 1:
        parser.error("--concurrency, --student-concurrency, --max-batch-size and --processes "
                     "must be >= 1")
    if args.processes > 1 and "star" in args.systems:
        parser.error("--processes applies to rankers; leave star out of --systems")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    started = time.perf_counter()
    payloads = payloads_of(args.dataset, args.set, None)
    report = Report(created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    machine=machine(), settings={
                        k: shown_path(v) if isinstance(v, Path) else v
                        for k, v in vars(args).items()})
    with student_folder(args.student if "star" in args.systems else None) as student:
        if student is not None and "fast" in args.student_modes:
            print(f"prefill of {args.student} ...", file=sys.stderr)
            report.prefill = measure_prefill(student, args.dataset, args.set, payloads,
                                             args.max_batch_size, args.prefill_prompts)
            report.prefill.model = args.student
        for case in cases(args, student):
            is_star = case.system == "star"
            label = f"{case.system} ({case.mode})" if case.mode else case.system
            print(f"{label} (batching {'on' if case.batching else 'off'}) ...", file=sys.stderr)
            with Server(case.serve_args, ready_s=900) as server:
                for concurrency in case.levels:
                    level = run_level(
                        server, case.system, case.batching, payloads, concurrency,
                        case.duration, args.requests, args.warmup * (3 if is_star else 1),
                        600 if is_star else 60, mode=case.mode)
                    report.levels.append(level)
                    print(f"  {concurrency} clients: {_rate(level.rps)} req/s, p95 "
                          f"{_fmt(level.p95_ms)} ms, statuses {level.statuses}", file=sys.stderr)
    report.targets = targets(report)
    report.settings["seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8")
    print(table(report))
    print(f"\nwritten: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
