"""`star serve` (the HTTP service) and `star recommend` (one question in the terminal).

Registered by `starrec.cli.main` (`_register_subcommands`). Both are thin: the library
(`starrec.api.service`) binds the system to its serving data and answers; this module
parses options and prints.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from pydantic import ValidationError

from starrec.cli.options import ColumnsOption, ConfigOption, DatasetOption, ModelOption, SetOption
from starrec.cli.options import config_from as _config
from starrec.cli.options import fail as _fail

if TYPE_CHECKING:
    from starrec.api.schemas import RecommendResponse
    from starrec.api.service import RecommendService, ServiceLimits
    from starrec.config import StarConfig

SystemOption = Annotated[str, typer.Option(
    help="random, presented, pop, itemknn, als, sasrec (baselines), cst (the evidence ranker), mars "
    "(the teacher) or star (a distilled student, with --model).")]
ProposerOption = Annotated[Optional[str], typer.Option(
    help="The ranker that proposes candidates when a request has none (its top N over the "
    "catalogue minus the history). Default: the system itself if it is a ranker, else cst.")]
# request timeouts by kind of system: a ranker answers in milliseconds, the teacher on a
# CPU takes about a minute per request
DEFAULT_TIMEOUT_S = {"ranker": 30.0, "llm": 600.0}


def _ids(text: str | None) -> list[str] | None:
    """`a,b,c` -> ["a", "b", "c"]; blanks dropped."""
    if text is None:
        return None
    return [part.strip() for part in text.split(",") if part.strip()]


def _errors() -> tuple[type[BaseException], ...]:
    """What the commands turn into one `error:` line and exit code 2 (DataError, LeakError
    and ServiceError are ValueErrors; ServerUnavailable: no LLM endpoint answers)."""
    from starrec.llm.base import LLMError, ServerUnavailable

    return (ValueError, LLMError, ServerUnavailable, OSError)


def _load(system: str, model: str | None, dataset: str | None, proposer: str | None,
          cfg: StarConfig, limits: ServiceLimits | None = None) -> RecommendService:
    from starrec.api.service import SYSTEMS, load_service

    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}; expected one of {', '.join(SYSTEMS)}")
    if system == "star" and model is None:
        raise ValueError("--system star needs --model DIR (a distilled student)")
    return load_service(system, dataset or cfg.data.dataset, config=cfg, model=model,
                        proposer=proposer, limits=limits)


def serve(
    system: SystemOption,
    model: ModelOption = None,
    dataset: DatasetOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface; "
                                      "then set API keys).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    api_keys: Annotated[Optional[Path], typer.Option(
        help="File of API keys (one per line or comma-separated, # comments). Keys in "
        "$STAR_API_KEYS (comma-separated) count too. Without any, no key is asked for.")] = None,
    max_queue: Annotated[int, typer.Option(
        help="Requests in flight (running or waiting) beyond which a request gets 503 with "
        "Retry-After.")] = 32,
    timeout_s: Annotated[Optional[float], typer.Option(
        help="Per-request timeout (504). Default: 30 s for rankers, 600 s for LLM systems.")] = None,
    max_body_bytes: Annotated[int, typer.Option(help="Largest request body (413).")] = 64 * 1024,
    max_history: Annotated[int, typer.Option(help="Most items in a request's history (422).")] = 1000,
    max_candidates: Annotated[int, typer.Option(
        help="Most candidates in a request (422); an LLM system with letter labels ranks at "
        "most 26.")] = 100,
    workers: Annotated[Optional[int], typer.Option(
        help="Threads answering a ranker's requests (an LLM system uses one). Default: the "
        "cores, at most 4.")] = None,
    compute_threads: Annotated[Optional[int], typer.Option(
        help="torch / BLAS threads of the service's computations. Default: 1 for rankers "
        "(their requests run on --workers threads side by side), every core for LLM "
        "systems.")] = None,
    batching: Annotated[bool, typer.Option(
        help="Micro-batching for a system that answers several requests faster at once (a "
        "student's fast ranking head, SASRec): requests are gathered for up to --max-wait-ms "
        "and answered together. Generation-based systems answer one at a time either way.")] = True,
    max_batch_size: Annotated[int, typer.Option(help="Most requests in one batch.")] = 16,
    max_wait_ms: Annotated[float, typer.Option(
        help="Longest a batch waits for more requests after its first (only while more are "
        "arriving).")] = 2.0,
    processes: Annotated[int, typer.Option(
        help="Server processes answering on the one port (rankers only): the service is "
        "loaded once, then forked; one process uses little more than one core.")] = 1,
    proposer: ProposerOption = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    runs: Annotated[Optional[list[Path]], typer.Option(
        help="Also serve the trajectory viewer (/runs, /v1/runs) over these trajectories or "
        "records files (repeatable), behind the same API keys.")] = None,
    columns: ColumnsOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Serve a system over HTTP/JSON: POST /v1/recommend, GET /v1/health, /v1/ready,
    /metrics; the OpenAPI schema at /openapi.json. JSON log lines on stderr; SIGTERM or
    Ctrl-C finish the requests in flight, then stop.

    The system is bound to the dataset's test task set: baselines are fitted
    on its fit data and the evidence store is the one `star eval` uses (built
    if missing), so a served answer is the evaluated system's.

    Examples:
      star serve --system cst
      star serve --system sasrec --port 8080 --api-keys keys.txt --max-queue 64
      star serve --system cst --processes 2
      star serve --system star --model runs/ranker --set student.mode=fast --max-batch-size 8
      star serve --system star --model runs/student --timeout-s 120
      star serve --system cst --runs runs/teacher/trajectories.jsonl
      curl -s localhost:8000/v1/recommend -H 'Content-Type: application/json' \\
        -d '{"user_id": "1", "options": {"explain": true}}'
    """
    try:
        from starrec.api.app import ServerSettings, bind_socket, create_app, read_api_keys
        from starrec.api.app import serve as run_server
    except ImportError as error:  # the web stack is the `serve` extra
        raise _fail(ValueError(f"star serve needs the serve extra ({error.name} is missing): "
                               "pip install 'starrec[serve]'")) from None
    from starrec.api.service import LLM_SYSTEMS, ServiceLimits

    cfg = _config(config, set_, columns)
    if log_level not in ("debug", "info", "warning", "error"):
        raise _fail(ValueError(f"--log-level {log_level!r}: expected debug, info, warning or error"))
    kind = "llm" if system in LLM_SYSTEMS else "ranker"
    if processes < 1:
        raise _fail(ValueError(f"--processes {processes}: expected at least 1"))
    if processes > 1 and kind == "llm":
        raise _fail(ValueError(f"--processes {processes}: only rankers are served by several "
                               f"processes; {system} answers one request at a time with every core"))
    # settings, keys and the port are checked before the data is read (which takes a while)
    try:
        keys = read_api_keys(api_keys)
        limits = ServiceLimits(max_history=max_history, max_candidates=max_candidates)
        settings = ServerSettings(
            api_keys=keys, max_queue=max_queue, max_body_bytes=max_body_bytes,
            batching=batching, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms,
            timeout_s=timeout_s if timeout_s is not None else DEFAULT_TIMEOUT_S[kind],
            compute_threads=compute_threads,
            **({"workers": workers} if workers is not None else {}))
        sock = bind_socket(host, port)
    except ValidationError as error:
        raise _fail(ValueError(_settings_problem(error))) from None
    except (ValueError, OSError) as error:
        if isinstance(error, OSError):
            error = ValueError(f"{host}:{port}: {error.strerror or error}")
        raise _fail(error) from None
    routers = []
    if runs:
        from starrec.api.viewer import viewer_router
        from starrec.evaluation.runs import load_runs

        try:
            routers.append(viewer_router(load_runs(runs)))
        except (ValueError, OSError, RuntimeError) as error:
            sock.close()
            raise _fail(ValueError(str(error))) from None
    if processes > 1:
        # the workers are forked from this process: loading with the workers' threads
        # starts no thread pool that a fork would leave broken
        from starrec.api.app import limit_compute_threads

        limit_compute_threads(settings.compute_threads or 1)
    try:
        service = _load(system, model, dataset, proposer, cfg, limits)
    except _errors() as error:
        sock.close()
        raise _fail(error) from None
    batched = (f"micro-batching up to {settings.max_batch_size}" if settings.batching
               and service.batchable else "no micro-batching")
    shared = f"; {processes} processes" if processes > 1 else ""
    typer.echo(f"serving {service.name} on http://{host}:{sock.getsockname()[1]} "
               f"({'API keys required' if keys else 'no API key asked for'}; {batched}{shared})",
               err=True)
    if not keys and not _loopback(host):
        typer.secho(f"warning: {host} is reachable from other machines and no API key is set "
                    "(--api-keys FILE or $STAR_API_KEYS)", fg=typer.colors.RED, err=True)
    if processes == 1:
        run_server(create_app(service, settings, routers=routers), host, port,
                   log_level=log_level, sock=sock)
        return
    from starrec.api.processes import serve_processes

    status = serve_processes(lambda: create_app(service, settings, routers=routers), sock,
                             processes, log_level=log_level)
    if status:
        raise typer.Exit(status)


def _loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _settings_problem(error: ValidationError) -> str:
    """Pydantic's report on a setting as the option that set it, e.g. `--max-queue: ...`."""
    return "; ".join(f"--{'-'.join(str(e['loc'][0]).split('_'))}: {e['msg']}"
                     for e in error.errors())


def recommend(
    system: SystemOption,
    user: Annotated[Optional[str], typer.Option(
        help="A user id of the serving data; without --history, the user's stored sequence is "
        "the history.")] = None,
    history: Annotated[Optional[str], typer.Option(
        help="Item ids consumed, oldest first, comma-separated (overrides the stored one).")] = None,
    candidates: Annotated[Optional[str], typer.Option(
        help="Item ids to rank, comma-separated. Default: the proposer's top --n-candidates.")] = None,
    n_candidates: Annotated[int, typer.Option(
        help="Without --candidates: how many the proposer takes from the catalogue.")] = 20,
    explain: Annotated[bool, typer.Option(
        help="Also show the evidence the system read, its reasoning and its tool calls.")] = False,
    mode: Annotated[Optional[str], typer.Option(
        help="The system's mode, where it has more than one.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the response JSON (as "
                                          "POST /v1/recommend returns it).")] = False,
    model: ModelOption = None,
    dataset: DatasetOption = None,
    proposer: ProposerOption = None,
    columns: ColumnsOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Answer one recommendation request in this process (no server): the ranking with
    titles, and with --explain the evidence and the reasoning.

    Examples:
      star recommend --system cst --user 1
      star recommend --system sasrec --user 1 --candidates 50,172,181 --explain
      star recommend --system pop --history 50,172 --n-candidates 10
      star recommend --system star --model runs/student --user 1 --explain
    """
    from starrec.api.schemas import RecommendRequest

    cfg = _config(config, set_, columns)
    try:
        request = RecommendRequest(user_id=user, history=_ids(history),
                                   candidates=_ids(candidates),
                                   options={"explain": explain, "mode": mode,
                                            "n_candidates": n_candidates})
    except ValidationError as error:
        problems = "; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())
        raise _fail(ValueError(f"--user / --history / --candidates: {problems}")) from None
    try:
        service = _load(system, model, dataset, proposer, cfg)
        response = service.recommend(request)
    except _errors() as error:
        raise _fail(error) from None
    if as_json:
        typer.echo(json.dumps(response.model_dump(mode="json"), indent=2, ensure_ascii=False))
    else:
        typer.echo(render_response(response))


def render_response(response: RecommendResponse, width: int = 100) -> str:
    """A response as a person reads it: who and what was ranked, the ranking with titles
    and scores, then (when explained) the evidence, the reasoning and the tool calls."""
    r = response
    who = f"user {r.user_id}" if r.user_id else "a new user"
    source = (f"proposed by {r.proposer} from the catalogue" if r.candidates_source == "proposed"
              else "given")
    lines = [f"{r.system} ({r.mode}) for {who}: history {r.history_length} items "
             f"({'stored' if r.history_source == 'stored' else 'given'}), "
             f"{len(r.ranking)} candidates {source}", ""]
    id_width = max((len(item.item_id) for item in r.ranking), default=1)
    title_width = min(max((len(item.title) for item in r.ranking), default=0), 60)
    for item in r.ranking:
        score = f"  score {item.score:.4g}" if item.score is not None else ""
        title = f"{item.title:<{title_width}}" if score else item.title
        lines.append(f"{item.rank:4d}. [{item.item_id:>{id_width}}] {title}{score}")
    if r.fallback:
        lines += ["", f"fallback: {r.fallback}"]
    elif not r.valid:
        lines += ["", "note: the system's output was not a complete ranking; the candidates "
                  "it left out follow in the order it was shown them"]

    def block(title: str, body: list[str]) -> None:
        lines.extend(["", title, *body])

    def wrapped(text: str, indent: str = "  ") -> list[str]:
        out: list[str] = []
        for paragraph in text.strip().splitlines() or [""]:
            out += textwrap.wrap(paragraph, width, initial_indent=indent,
                                 subsequent_indent=indent + "  ") or [indent]
        return out

    if r.evidence is not None:
        block("Evidence", [w for line in r.evidence for w in wrapped(line)] or ["  (none)"])
    if r.reasoning is not None:
        body: list[str] = []
        if r.reasoning.plan:
            body += ["  plan:", *wrapped(r.reasoning.plan, "    ")]
        for analyst, finding in r.reasoning.findings.items():
            body += [f"  {analyst}:", *wrapped(finding, "    ")]
        if r.reasoning.reflection:
            body += ["  reflection:", *wrapped(r.reasoning.reflection, "    ")]
        if not body and r.reasoning.text:
            body += ["  output as generated:", *wrapped(r.reasoning.text, "    ")]
        block("Reasoning", body or ["  (none)"])
    if r.tool_calls is not None:
        body = []
        for n, call in enumerate(r.tool_calls, 1):
            by = f" by {call.agent}" if call.agent else ""
            status = "" if call.ok else " (error)"
            body.append(f"  {n}. {call.name} {json.dumps(call.arguments, ensure_ascii=False)}"
                        f"{by}{status}")
            body += wrapped(call.response or "(no response)", "     ")
        block("Tool calls", body or ["  (none)"])
    t = r.timings
    usage = (f"; {r.usage.llm_calls} LLM calls, {r.usage.prompt_tokens} prompt + "
             f"{r.usage.completion_tokens} completion tokens" if r.usage.llm_calls else "")
    lines += ["", f"time: {t.total_ms:.1f} ms (propose {t.propose_ms:.1f}, rank "
              f"{t.rank_ms:.1f}){usage}"]
    return "\n".join(lines)
