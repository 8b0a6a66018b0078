"""The HTTP service around a `RecommendService`: `star serve`.

What it adds to the library is what a service needs under pressure:

- API keys (`Authorization: Bearer KEY`, 401 without a valid one when keys are set);
- a body size limit checked before the body is parsed (413), and the service's own
  limits on history and candidates (422, with a message);
- a bounded queue: a request is admitted only while fewer than `max_queue` are in flight
  (running or waiting), else 503 with `Retry-After` at once, so overload never hangs a
  client; an admitted request that has no answer after `timeout_s` gets 504;
- LLM systems run one request at a time in one worker thread (their in-process engines
  are not thread-safe), rankers in a pool;
- micro-batching (`batching`, on by default) for a system that answers several requests
  faster in one call (the student's fast ranking head, a ranker with `score_many`): one
  worker gathers admitted requests for up to `max_wait_ms` while more are arriving, up to
  `max_batch_size`, and answers them together (`starrec.api.runners.BatchRunner`); each
  request keeps its own response, error and timeout;
- an LLM system whose model server does not answer (`ServerUnavailable`) gets 503 with
  `Retry-After` for that request, not a 500: the service is fine, its server is not;
- every error is a JSON `ErrorResponse`, never a traceback (that goes to the JSON log);
- `/v1/health` (the process answers), `/v1/ready` (warmed up and able to answer),
  `/metrics` (Prometheus text);
- graceful shutdown is uvicorn's: on SIGTERM it stops accepting, lets the requests in
  flight finish (up to `graceful_timeout_s`), then the worker pool is drained.

More pages (a trajectory viewer) plug in as routers: `create_app(..., routers=[...])`
puts them behind the same API keys, limits, metrics and error handling.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from starrec.api import metrics as metrics_module
from starrec.api.runners import (  # noqa: F401 - the runners' errors are this module's API too
    ApiError,
    Batch,
    BatchRunner,
    BoundedRunner,
    Overloaded,
    ShuttingDown,
    TimedOut,
)
from starrec.api.schemas import (
    ErrorDetail,
    ErrorInfo,
    ErrorResponse,
    Health,
    Readiness,
    RecommendRequest,
    RecommendResponse,
)
from starrec.api.service import PreparedRequest, RecommendService, ServiceError
from starrec.paths import available_cores

log = logging.getLogger(__name__)
access_log = logging.getLogger("starrec.api.access")

API_KEYS_ENV = "STAR_API_KEYS"
REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class ServerSettings(BaseModel):
    """How the HTTP layer protects the service (the request limits of the service
    itself are `ServiceLimits`)."""

    api_keys: list[str] = Field(default_factory=list, description="Empty: no auth.")
    max_queue: int = Field(32, ge=1, description="Requests in flight (running or waiting) "
                           "beyond which a request gets 503.")
    timeout_s: float = Field(30.0, gt=0, description="Per request, from admission.")
    max_body_bytes: int = Field(64 * 1024, ge=256)
    workers: int = Field(default_factory=lambda: max(1, min(4, os.cpu_count() or 1)), ge=1,
                         description="Threads answering rankers' requests (LLM systems: one).")
    batching: bool = Field(True, description="Micro-batching for a system that gains from it "
                           "(`RecommendService.batchable`); off: one request per call.")
    max_batch_size: int = Field(16, ge=1, description="Most requests answered in one batch.")
    max_wait_ms: float = Field(2.0, ge=0, description="Longest a batch waits for more requests "
                               "after its first, while more are arriving.")
    compute_threads: int | None = Field(None, ge=1, description=(
        "torch and BLAS threads of the process's computations. None: 1 for a ranker, whose "
        "requests run on `workers` threads side by side (one multi-threaded kernel per "
        "request oversubscribes the cores the HTTP loop also needs); every core for an LLM "
        "system, which answers one request at a time."))


def compute_threads_for(settings: ServerSettings, service: RecommendService) -> int:
    """The compute threads a service runs with (`ServerSettings.compute_threads`)."""
    if settings.compute_threads is not None:
        return settings.compute_threads
    return 1 if service.concurrent else available_cores()


def limit_compute_threads(threads: int) -> None:
    """Set this process's torch intra-op threads and its BLAS / OpenMP pools to `threads`
    (process-wide: call it where the process is the service)."""
    import sys

    from threadpoolctl import threadpool_limits

    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(threads)
    threadpool_limits(threads)


def read_api_keys(path: Path | None = None, environ: dict[str, str] | None = None) -> list[str]:
    """The API keys of a keys file (one per line or comma-separated; blank lines and `#`
    comments ignored) and of `$STAR_API_KEYS` (comma-separated), together. A file given
    but holding no key is an error: the service must not start open by accident."""
    environ = os.environ if environ is None else environ
    keys: list[str] = []
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as error:
            raise ValueError(f"--api-keys {path}: {error.strerror or error}") from None
        for line in text.splitlines():
            line = line.split("#", 1)[0]
            keys += [k.strip() for k in line.split(",") if k.strip()]
        if not keys:
            raise ValueError(f"--api-keys {path}: the file holds no key")
    keys += [k.strip() for k in environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
    return list(dict.fromkeys(keys))


# ---------------------------------------------------------------------------------------
# errors


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The body is not JSON."},
    401: {"model": ErrorResponse, "description": "No valid API key."},
    413: {"model": ErrorResponse, "description": "The body is larger than the limit."},
    422: {"model": ErrorResponse, "description": "Invalid request, a limit exceeded, or "
          "unknown user or item ids (named in `unknown_users` / `unknown_items`)."},
    503: {"model": ErrorResponse, "description": "Too many requests in flight (`overloaded`), "
          "or no LLM server answered (`llm_unavailable`); see the `Retry-After` header."},
    504: {"model": ErrorResponse, "description": "No answer within the request timeout."},
    500: {"model": ErrorResponse, "description": "A fault of the service (its log has the "
          "details under the request id); never a traceback."},
}


def _request_id(scope: dict[str, Any]) -> str | None:
    return (scope.get("state") or {}).get("request_id")


def error_body(code: str, message: str, request_id: str | None = None,
               **fields: Any) -> dict[str, Any]:
    info = ErrorInfo(code=code, message=message, request_id=request_id, **fields)
    return ErrorResponse(error=info).model_dump(mode="json", exclude_none=True)


# ---------------------------------------------------------------------------------------
# ASGI middleware (plain ASGI: no buffering of responses, no extra task per request)


class Arrivals:
    """Recommendation requests received and not yet admitted (being read, parsed,
    checked): the requests a micro-batch may still wait for. Changed on the event loop
    only; the batch worker reads the count."""

    PATH = "/v1/recommend"
    _KEY = "star_arriving"

    def __init__(self) -> None:
        self._count = 0

    def count(self) -> int:
        return self._count

    def enter(self, scope: dict[str, Any]) -> None:
        if scope["method"] == "POST" and scope["path"] == self.PATH:
            scope.setdefault("state", {})[self._KEY] = True
            self._count += 1

    def leave(self, scope: dict[str, Any]) -> None:
        state = scope.get("state") or {}
        if state.pop(self._KEY, False):
            self._count -= 1


class ObserveMiddleware:
    """Request id (kept from `X-Request-ID` when well formed, else new; echoed back),
    the request's metrics, arrivals (`Arrivals`), and one JSON access line."""

    def __init__(self, app: Any, metrics: metrics_module.Metrics,
                 path_label: Callable[[str], str], arrivals: Arrivals | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.path_label = path_label
        self.arrivals = arrivals or Arrivals()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        self.arrivals.enter(scope)
        start = time.perf_counter()
        status = 500
        started = False

        async def sending(message: dict[str, Any]) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message["headers"] = [*message.get("headers", []),
                                      (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as error:
            # answered here rather than by Starlette's outermost handler, which re-raises
            # to the server, and the server then drops the client's connection
            log.error("unhandled error in %s %s", scope["method"], scope["path"], exc_info=error,
                      extra={"event": "error", "request_id": request_id})
            if started:
                raise
            self.metrics.count_error("internal")
            response = JSONResponse(error_body(
                "internal", "internal error; the service log has the details under this "
                "request id", request_id), status_code=500)
            await response(scope, receive, sending)
        finally:
            self.arrivals.leave(scope)  # refused before admission (401, 413, 422)
            seconds = time.perf_counter() - start
            self.metrics.observe_request(scope["method"], self.path_label(scope["path"]), status,
                                         seconds)
            access_log.info("%s %s %d", scope["method"], scope["path"], status, extra={
                "event": "request", "method": scope["method"], "path": scope["path"],
                "status": status, "ms": round(seconds * 1000, 3), "request_id": request_id})


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`, before anything parses it: at once from
    `Content-Length`, or while reading a body sent without one (chunked)."""

    def __init__(self, app: Any, max_bytes: int, metrics: metrics_module.Metrics) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def _reject(self, scope: dict[str, Any], send: Any, size: str) -> None:
        self.metrics.count_error("body_too_large")
        response = JSONResponse(error_body(
            "body_too_large", f"the body has {size} bytes; at most {self.max_bytes} are "
            "accepted", _request_id(scope)), status_code=413)
        await response(scope, _no_receive, send)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit():
            if int(length) > self.max_bytes:
                await self._reject(scope, send, length.decode())
                return
            await self.app(scope, receive, send)
            return
        messages, size = [], 0  # no length given: read it all (up to the limit) first
        while True:
            message = await receive()
            if message["type"] != "http.request":
                messages.append(message)
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._reject(scope, send, f"more than {self.max_bytes}")
                return
            messages.append(message)
            if not message.get("more_body", False):
                break

        async def replay() -> dict[str, Any]:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


async def _no_receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}


# ---------------------------------------------------------------------------------------
# the app


def api_key_dependency(keys: Sequence[str]) -> Callable[..., None]:
    """A FastAPI dependency: 401 unless `Authorization: Bearer` carries one of `keys`
    (none: open). Compared in constant time."""
    encoded = [k.encode() for k in keys]
    bearer = HTTPBearer(auto_error=False, description="An API key of the service "
                        "(`--api-keys FILE` or $STAR_API_KEYS).")

    def require_key(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not encoded:
            return
        given = credentials.credentials.encode() if credentials is not None else b""
        if not any(hmac.compare_digest(given, key) for key in encoded):
            raise ApiError(401, "unauthorized",
                           "a valid API key is required: Authorization: Bearer KEY",
                           {"WWW-Authenticate": "Bearer"})

    return require_key


def create_app(service: RecommendService, settings: ServerSettings | None = None,
               routers: Sequence[APIRouter] = ()) -> FastAPI:
    """The FastAPI app serving `service`. `routers` are further pages (they get the same
    API key check). The service warms up in a thread after startup; `/v1/ready` says 503
    until it has."""
    settings = settings or ServerSettings()
    metrics = metrics_module.Metrics()
    arrivals = Arrivals()
    runner: BoundedRunner | BatchRunner[PreparedRequest, RecommendResponse]
    if settings.batching and service.batchable:
        def answer_batch(requests: list[PreparedRequest], batch: Batch) -> list[Any]:
            answers = service.answer_many(requests)
            for answer, waited in zip(answers, batch.waited_s):
                if isinstance(answer, RecommendResponse):
                    answer.timings.queue_ms = round(waited * 1000, 3)
            return answers

        runner = BatchRunner(answer_batch, max_queue=settings.max_queue,
                             timeout_s=settings.timeout_s, max_batch_size=settings.max_batch_size,
                             max_wait_s=settings.max_wait_ms / 1000,
                             workers=settings.workers if service.concurrent else 1,
                             arriving=arrivals.count, on_batch=metrics.observe_batch)
        metrics.enable_batches()
    else:
        workers = settings.workers if service.concurrent else 1
        runner = BoundedRunner(workers, settings.max_queue, settings.timeout_s)
    state: dict[str, Any] = {"status": "starting", "message": None}

    def warm_up() -> None:
        try:
            service.warm_up()
        except Exception as error:  # the service still answers; it is reported not ready
            log.exception("warm-up of %s failed", service.name)
            state.update(status="failed", message=f"warm-up failed: {type(error).__name__}")
            return
        state["status"] = "ready"
        log.info("%s ready", service.name, extra={"event": "ready", "system": service.name})

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        threading.Thread(target=warm_up, name="star-warm-up", daemon=True).start()
        yield
        await asyncio.to_thread(runner.shutdown)

    app = FastAPI(
        title="STAR recommendation service",
        version=_version(),
        description=f"Ranks candidate items for a user with the `{service.name}` system "
        "(STAR: reasoning-enhanced LLM recommendation). Errors are `ErrorResponse` bodies.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.settings = settings
    app.state.compute_threads = compute_threads_for(settings, service)
    app.state.runner = runner
    app.state.metrics = metrics
    require_key = api_key_dependency(settings.api_keys)
    app.state.require_key = require_key
    limits = service.own_limits().model_copy(update={
        "max_body_bytes": settings.max_body_bytes, "max_queue": settings.max_queue,
        "timeout_s": settings.timeout_s})

    metrics.info(system=service.name, kind=service.system.kind)
    metrics.gauge("queue_depth", "Admitted requests waiting for a worker.",
                  lambda: runner.queue_depth)
    metrics.gauge("requests_in_flight", "Admitted requests, running or waiting.",
                  lambda: runner.admitted)
    metrics.gauge("ready", "1 when the service is warmed up and answering.",
                  lambda: 1 if state["status"] == "ready" else 0, combine="min")
    metrics.gauge("processes", "Server processes answering (star serve --processes).",
                  lambda: 1)

    def error(request: Request, status: int, code: str, message: str,
              headers: dict[str, str] | None = None, **fields: Any) -> JSONResponse:
        metrics.count_error(code)
        return JSONResponse(error_body(code, message, _request_id(request.scope), **fields),
                            status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error(request, exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error(request, 422, exc.code, str(exc), unknown_users=exc.unknown_users or None,
                     unknown_items=exc.unknown_items or None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = [ErrorDetail(loc=[p for p in e.get("loc", ()) if isinstance(p, str | int)],
                               msg=str(e.get("msg", "")), type=e.get("type"))
                   for e in exc.errors()]
        first = details[0] if details else None
        if first is None:
            message = "invalid request"
        elif first.type == "json_invalid":
            message = f"the body is not valid JSON ({first.msg.lower()} at character {first.loc[-1]})"
        else:
            message = f"{'.'.join(map(str, first.loc))}: {first.msg}"
        return error(request, 422, "invalid_request", message,
                     details=[d.model_dump() for d in details])

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(request, exc.status_code, code, str(exc.detail),
                     dict(exc.headers) if exc.headers else None)

    v1 = APIRouter(prefix="/v1")

    @v1.get("/health", response_model=Health, summary="The process answers.")
    async def health() -> Health:
        return Health()

    @v1.get("/ready", response_model=Readiness, summary="Warmed up and answering.",
            responses={503: {"model": Readiness, "description": "Not (yet) ready."}})
    async def ready() -> JSONResponse:
        body = service.readiness(state["status"], limits, state["message"])
        body.compute_threads = app.state.compute_threads
        return JSONResponse(body.model_dump(mode="json"), status_code=200 if body.ready else 503)

    @v1.post("/recommend", response_model=RecommendResponse, responses=ERROR_RESPONSES,
             dependencies=[Depends(require_key)], summary="Rank candidates for a user.",
             description="Ranks the given candidates, or candidates the proposer takes from "
             "the catalogue, for a user of the serving data or a given history.")
    async def recommend(body: RecommendRequest, request: Request) -> RecommendResponse:
        start = time.perf_counter()
        arrivals.leave(request.scope)
        prepared = service.prepare(body)
        if isinstance(runner, BatchRunner):
            response, waited = await runner.run(prepared)
        else:
            response, waited = await runner.run(lambda: service.answer(prepared))
        response.timings.queue_ms = round(waited * 1000, 3)
        response.timings.total_ms = round((time.perf_counter() - start) * 1000, 3)
        return response

    app.include_router(v1)
    for router in routers:
        app.include_router(router, dependencies=[Depends(require_key)])

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics.",
             responses={200: {"content": {"text/plain": {}}}})
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type=metrics_module.CONTENT_TYPE)

    templates: list[tuple[re.Pattern[str], str]] = []

    def path_label(path: str) -> str:
        """The route template a path matched (metrics label paths by templates, so a client
        cannot add label values at will), or `unmatched`. Templates are read from the
        OpenAPI schema once the app is complete."""
        if not templates:
            names = [*app.openapi()["paths"], *filter(None, (app.openapi_url, app.docs_url,
                                                             app.redoc_url))]
            templates.extend((_template_pattern(t), t) for t in names)
        return next((t for pattern, t in templates if pattern.match(path)), "unmatched")

    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, metrics=metrics)
    app.add_middleware(ObserveMiddleware, metrics=metrics, path_label=path_label,
                       arrivals=arrivals)
    return app


def _template_pattern(template: str) -> re.Pattern[str]:
    """`/v1/runs/{run_id}` -> a pattern matching `/v1/runs/<anything but />`."""
    parts = re.split(r"\{[^}]+\}", template)
    return re.compile("^" + "[^/]+".join(map(re.escape, parts)) + "$")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("starrec")
    except PackageNotFoundError:
        return "0"


# ---------------------------------------------------------------------------------------
# running it


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket on host:port, bound now so that a taken port or a bad
    host is one clear error (OSError) before anything starts."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def make_server(app: FastAPI, *, log_level: str = "info", json_logs: bool = True,
                graceful_timeout_s: float | None = None) -> Any:
    """A uvicorn server for `app` (run it with `.run(sockets=[bind_socket(...)])`). Its
    graceful shutdown waits up to `graceful_timeout_s` (default: the request timeout
    and a margin) for the requests in flight."""
    import uvicorn

    from starrec.api.logs import log_config

    settings: ServerSettings = app.state.settings
    config = uvicorn.Config(
        app, log_config=log_config(log_level) if json_logs else None, log_level=log_level,
        access_log=False, server_header=False, lifespan="on",
        timeout_graceful_shutdown=int(math.ceil(graceful_timeout_s if graceful_timeout_s is not None
                                                else settings.timeout_s + 5)))
    return uvicorn.Server(config)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, *,
          log_level: str = "info", sock: socket.socket | None = None) -> None:
    """Run `app` until SIGINT / SIGTERM, then shut down gracefully, with the compute
    threads its settings give its service (`compute_threads_for`)."""
    limit_compute_threads(app.state.compute_threads)
    make_server(app, log_level=log_level).run(sockets=[sock or bind_socket(host, port)])
