"""Several OpenAI-compatible endpoints serving one model, and which one a request goes to.

Routing: each calling thread keeps to one endpoint, the one with the fewest active threads
among those that are up (ties: fewer requests in flight, then round robin). A teacher
run's calls share a long prefix, the task's system prompt, which a server's prefix cache
(vLLM, SGLang, llama.cpp) reads once only when the calls reach the same server; a worker
thread answers one task at a time, so keeping a thread on one server keeps a run there.
A thread is active while it has a request in flight or sent one within `ACTIVE_S` (a
run's calls follow each other within milliseconds); a thread that went idle (the one that
loaded and preflighted the model, a finished worker) stops counting. A thread moves when
its endpoint is taken out, or when its endpoint has more active threads than another.

Health: a connection error takes an endpoint out at once; timeouts and 5xx answers take
it out after `FAILURES_BEFORE_OUT` in a row with no success in between, so that one
request a server cannot handle does not take out a server that answers the others; 429
never does (the server is alive and asks to slow down). An endpoint that is out is tried
again after `cooldown_s`; while every endpoint is out, the one that has been out longest
is tried (a probe), so a restarted server is found without waiting for the cooldown.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

Failure = Literal["connection", "timeout", "server", "busy"]
FAILURES_BEFORE_OUT = 2  # timeouts or 5xx in a row that take an endpoint out
ACTIVE_S = 1.0  # a thread that sent no request for this long no longer counts as load
FORGET_S = 60.0  # ... and its binding is dropped after this long


@dataclass
class Endpoint:
    """One server. `out_until` is a `time.monotonic()` time; the endpoint is up from then
    on (0: up)."""

    url: str
    client: Any
    in_flight: int = 0
    strikes: int = 0  # timeouts and 5xx since its last success
    out_until: float = 0.0
    requests: int = 0
    failures: int = 0

    def up(self, now: float) -> bool:
        return self.out_until <= now


@dataclass
class _Binding:
    """A thread's endpoint, and whether the thread is using it."""

    endpoint: Endpoint
    in_flight: bool = False
    last_used: float = 0.0

    def active(self, now: float) -> bool:
        return self.in_flight or now - self.last_used < ACTIVE_S


class EndpointPool:
    """Thread-safe choice among endpoints; `acquire` before a request, `release` after it
    with how it failed (None: it answered)."""

    def __init__(self, urls: Sequence[str], make_client: Callable[[str], Any],
                 cooldown_s: float = 10.0) -> None:
        urls = list(dict.fromkeys(u.strip() for u in urls if u.strip()))
        if not urls:
            raise ValueError("no endpoint URL given")
        self.endpoints = [Endpoint(url, make_client(url)) for url in urls]
        self.cooldown_s = cooldown_s
        self._lock = threading.Lock()
        self._bound: dict[int, _Binding] = {}  # thread ident -> its endpoint
        self._turn = 0  # round-robin start among equally loaded endpoints

    def acquire(self) -> Endpoint:
        """The endpoint the calling thread sends its next request to."""
        with self._lock:
            now = time.monotonic()
            ident = threading.get_ident()
            binding = self._bound.get(ident)
            if binding is None or self._should_move(binding.endpoint, ident, now):
                binding = self._bound[ident] = _Binding(self._choose(ident, now))
                self._forget_idle(now)
            binding.in_flight = True
            binding.endpoint.in_flight += 1
            binding.endpoint.requests += 1
            return binding.endpoint

    def release(self, endpoint: Endpoint, failure: Failure | None, *,
                abandoned: bool = False) -> None:
        """Record how a request to `endpoint` ended: answered (`failure` None), failed (a
        failure may take it out), or `abandoned` by the caller (Ctrl-C), which says
        nothing of the endpoint."""
        with self._lock:
            now = time.monotonic()
            endpoint.in_flight -= 1
            binding = self._bound.get(threading.get_ident())
            if binding is not None:
                binding.in_flight, binding.last_used = False, now
            if abandoned:
                return
            if failure is None:
                if not endpoint.up(now):
                    log.info("endpoint %s answers again", endpoint.url)
                endpoint.strikes, endpoint.out_until = 0, 0.0
                return
            endpoint.failures += 1
            if failure == "busy":
                return
            endpoint.strikes += 1
            if failure == "connection" or endpoint.strikes >= FAILURES_BEFORE_OUT:
                if endpoint.up(now) and len(self.endpoints) > 1:
                    log.warning("endpoint %s taken out for %.0f s (%s)", endpoint.url,
                                self.cooldown_s, failure)
                endpoint.out_until = now + self.cooldown_s

    def any_up(self, exclude: Endpoint | None = None) -> bool:
        """Whether an endpoint other than `exclude` is up."""
        with self._lock:
            now = time.monotonic()
            return any(e.up(now) for e in self.endpoints if e is not exclude)

    def status(self) -> list[dict[str, Any]]:
        """Per endpoint: its URL, whether it is up, requests sent and failures seen."""
        with self._lock:
            now = time.monotonic()
            return [{"url": e.url, "up": e.up(now), "requests": e.requests,
                     "failures": e.failures} for e in self.endpoints]

    def _load(self, ident: int, now: float) -> Counter[str]:
        """Active threads on each endpoint, other than thread `ident`."""
        return Counter(b.endpoint.url for i, b in self._bound.items()
                       if i != ident and b.active(now))

    def _should_move(self, current: Endpoint, ident: int, now: float) -> bool:
        if not current.up(now):
            return any(e.up(now) for e in self.endpoints) or current is not self._probe()
        if len(self.endpoints) == 1:
            return False
        load = self._load(ident, now)
        return load[current.url] > min(load[e.url] for e in self.endpoints if e.up(now))

    def _choose(self, ident: int, now: float) -> Endpoint:
        up = [e for e in self.endpoints if e.up(now)]
        if not up:
            return self._probe()
        start = self._turn % len(up)
        self._turn += 1
        load = self._load(ident, now)
        rotated = up[start:] + up[:start]
        return min(rotated, key=lambda e: (load[e.url], e.in_flight))

    def _probe(self) -> Endpoint:
        """With every endpoint out, the one out longest: tried rather than none."""
        return min(self.endpoints, key=lambda e: e.out_until)

    def _forget_idle(self, now: float) -> None:
        for ident in [i for i, b in self._bound.items()
                      if not b.in_flight and now - b.last_used > FORGET_S]:
            del self._bound[ident]
