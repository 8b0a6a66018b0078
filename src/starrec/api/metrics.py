"""Prometheus metrics of the service, written in the text exposition format by hand.

The format is a few lines of text, so the service needs no client library: counters of
requests by status and of errors by code, a latency histogram per endpoint, a histogram
of micro-batch sizes (when batching), and gauges read when scraped (queue depth,
requests in flight, readiness). Label sets are bounded:
paths are the app's route templates (anything else is `unmatched`), statuses and error
codes are the few the service produces.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from starrec.core.files import write_text_atomic

# seconds: ranker answers take milliseconds, an LLM system's seconds to minutes on a CPU
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 120.0, 300.0)
# requests per micro-batch
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Iterable[tuple[str, str]]) -> str:
    text = ",".join(f'{key}="{_escape(str(value))}"' for key, value in pairs)
    return "{" + text + "}" if text else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.total += 1
        self.sum += value


class Metrics:
    """Thread-safe counters and histograms, and gauges computed at scrape time."""

    def __init__(self, prefix: str = "star", buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.prefix = prefix
        self.buckets = buckets
        self._lock = threading.Lock()
        self._requests: Counter[tuple[str, str, str]] = Counter()
        self._errors: Counter[str] = Counter()
        self._latency: dict[tuple[str, str], _Histogram] = {}
        self._gauges: list[tuple[str, str, Callable[[], float], str]] = []
        self._info: dict[str, str] = {}
        self._batches: _Histogram | None = None
        self._shared: Path | None = None

    def enable_batches(self) -> None:
        """Report batch sizes (`observe_batch`), from zero batches on."""
        with self._lock:
            if self._batches is None:
                self._batches = _Histogram(tuple(float(b) for b in BATCH_BUCKETS))

    def observe_batch(self, size: int) -> None:
        with self._lock:
            if self._batches is None:
                self._batches = _Histogram(tuple(float(b) for b in BATCH_BUCKETS))
            self._batches.observe(float(size))

    def batch_sizes(self) -> tuple[int, int]:
        """(batches, requests in them) so far (tests, benchmarks)."""
        with self._lock:
            b = self._batches
            return (b.total, int(b.sum)) if b is not None else (0, 0)

    def gauge(self, name: str, help: str, read: Callable[[], float],
              combine: str = "sum") -> None:
        """A value read at scrape time; `combine` (sum or min) says how the values of
        several processes make the service's (`share`)."""
        if combine not in ("sum", "min"):
            raise ValueError(f"combine {combine!r}: expected sum or min")
        self._gauges.append((name, help, read, combine))

    def info(self, **labels: str) -> None:
        self._info = dict(labels)

    def observe_request(self, method: str, path: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(method, path, str(status))] += 1
            histogram = self._latency.get((method, path))
            if histogram is None:
                histogram = self._latency[(method, path)] = _Histogram(self.buckets)
            histogram.observe(seconds)

    def count_error(self, code: str) -> None:
        with self._lock:
            self._errors[code] += 1

    def requests(self, path: str | None = None, status: int | None = None) -> int:
        """Requests counted so far (tests and logs)."""
        with self._lock:
            return sum(n for (_, p, s), n in self._requests.items()
                       if (path is None or p == path) and (status is None or s == str(status)))

    def snapshot(self) -> dict[str, Any]:
        """This process's numbers as plain JSON (what `share` writes, `render` shows)."""
        with self._lock:
            b = self._batches
            snap: dict[str, Any] = {
                "pid": os.getpid(),
                "info": dict(self._info),
                "requests": [[*key, n] for key, n in self._requests.items()],
                "errors": dict(self._errors),
                "latency": [[*key, list(h.counts), h.total, h.sum]
                            for key, h in self._latency.items()],
                "batches": [list(b.counts), b.total, b.sum] if b is not None else None,
            }
        snap["gauges"] = [[name, help, float(read()), combine]
                          for name, help, read, combine in self._gauges]
        return snap

    def share(self, directory: str | Path, interval_s: float = 1.0) -> None:
        """Report as one of several processes: write this process's snapshot into
        `directory` every `interval_s` (a daemon thread) and at each scrape, and render
        the sum of every snapshot there."""
        self._shared = Path(directory)
        self._write_snapshot()

        def loop() -> None:
            while True:
                time.sleep(interval_s)
                try:
                    self._write_snapshot()
                except OSError:  # the directory went away: the service is stopping
                    return

        threading.Thread(target=loop, name="star-metrics-share", daemon=True).start()

    def _write_snapshot(self) -> dict[str, Any]:
        # the sharing thread and a scrape may write at once: each through a file of its own
        snap = self.snapshot()
        assert self._shared is not None
        write_text_atomic(self._shared / f"{snap['pid']}.json", json.dumps(snap))
        return snap

    def render(self) -> str:
        if self._shared is None:
            return render_snapshot(self.snapshot(), self.prefix, self.buckets)
        own = self._write_snapshot()
        others = []
        for path in self._shared.glob("*.json"):
            if path.stem == str(own["pid"]):
                continue
            try:
                others.append(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError):  # being replaced, or its process is gone
                continue
        return render_snapshot(merge_snapshots([own, *others]), self.prefix, self.buckets)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def merge_snapshots(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """The snapshots of several processes as one: counters and histograms summed (a
    process that has exited still counts: counters never go back), gauges of the live
    processes combined by their `combine`."""
    requests: Counter[tuple[str, ...]] = Counter()
    errors: Counter[str] = Counter()
    latency: dict[tuple[str, str], list[Any]] = {}
    batches: list[Any] | None = None
    gauges: dict[str, list[Any]] = {}
    for snap in snapshots:
        for *key, n in snap["requests"]:
            requests[tuple(key)] += n
        errors.update(snap["errors"])
        for method, path, counts, total, seconds in snap["latency"]:
            seen = latency.get((method, path))
            latency[(method, path)] = ([counts, total, seconds] if seen is None else
                                       [[a + b for a, b in zip(seen[0], counts)],
                                        seen[1] + total, seen[2] + seconds])
        if snap["batches"] is not None:
            counts, total, size_sum = snap["batches"]
            batches = ([counts, total, size_sum] if batches is None else
                       [[a + b for a, b in zip(batches[0], counts)], batches[1] + total,
                        batches[2] + size_sum])
        if snap is not snapshots[0] and not _alive(snap["pid"]):
            continue
        for name, help, value, combine in snap["gauges"]:
            if name not in gauges:
                gauges[name] = [name, help, value, combine]
            else:
                old = gauges[name][2]
                gauges[name][2] = min(old, value) if combine == "min" else old + value
    first = snapshots[0]
    return {"pid": first["pid"], "info": first["info"],
            "requests": [[*key, n] for key, n in requests.items()], "errors": dict(errors),
            "latency": [[*key, *value] for key, value in latency.items()],
            "batches": batches, "gauges": list(gauges.values())}


def render_snapshot(snap: dict[str, Any], prefix: str = "star",
                    buckets: tuple[float, ...] = LATENCY_BUCKETS) -> str:
    """A snapshot (`Metrics.snapshot`, `merge_snapshots`) in the text exposition format."""
    p = prefix
    lines: list[str] = []

    def head(name: str, kind: str, help: str) -> None:
        lines.extend([f"# HELP {name} {help}", f"# TYPE {name} {kind}"])

    requests = sorted((tuple(key), n) for *key, n in snap["requests"])
    errors = sorted(snap["errors"].items())
    latency = sorted(((method, path), (counts, total, seconds))
                     for method, path, counts, total, seconds in snap["latency"])
    batches = snap["batches"]
    if snap["info"]:
        head(f"{p}_info", "gauge", "The system this service answers with.")
        lines.append(f"{p}_info{_labels(sorted(snap['info'].items()))} 1")
    head(f"{p}_http_requests_total", "counter", "HTTP requests answered, by status.")
    for (method, path, status), n in requests:
        lines.append(f"{p}_http_requests_total"
                     f"{_labels([('method', method), ('path', path), ('status', status)])} {n}")
    head(f"{p}_http_request_duration_seconds", "histogram",
         "Time from a request's arrival to its answer.")
    name = f"{p}_http_request_duration_seconds"
    for (method, path), (counts, total, seconds) in latency:
        base = [("method", method), ("path", path)]
        for bound, count in zip(buckets, counts):
            lines.append(f"{name}_bucket{_labels([*base, ('le', _number(bound))])} {count}")
        lines.append(f"{name}_bucket{_labels([*base, ('le', '+Inf')])} {total}")
        lines.append(f"{name}_sum{_labels(base)} {_number(seconds)}")
        lines.append(f"{name}_count{_labels(base)} {total}")
    if batches is not None:
        counts, total, size_sum = batches
        name = f"{p}_batch_size"
        head(name, "histogram", "Requests answered together per micro-batch.")
        for bound, count in zip(BATCH_BUCKETS, counts):
            lines.append(f"{name}_bucket{_labels([('le', _number(bound))])} {count}")
        lines.append(f"{name}_bucket{_labels([('le', '+Inf')])} {total}")
        lines.append(f"{name}_sum {_number(size_sum)}")
        lines.append(f"{name}_count {total}")
    head(f"{p}_errors_total", "counter", "Error responses, by error code.")
    for code, n in errors:
        lines.append(f"{p}_errors_total{_labels([('code', code)])} {n}")
    for gauge, help, value, _ in snap["gauges"]:
        head(f"{p}_{gauge}", "gauge", help)
        lines.append(f"{p}_{gauge} {_number(value)}")
    return "\n".join(lines) + "\n"
