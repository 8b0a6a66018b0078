"""`star view`: the trajectory viewer for a teacher's trajectories or an evaluation's
records, without a model; `--summary` prints the counts the README quotes.

Registered by `starrec.cli.main` (`_register_subcommands`). The reading and counting
are the library's (`starrec.evaluation.runs`), the pages `starrec.api.viewer`'s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from starrec.cli.options import fail as _fail


def view(
    files: Annotated[list[Path], typer.Argument(
        help="Trajectories (star teach) or records (star eval --records) files; the kind "
        "of each is read from its content.")],
    summary: Annotated[bool, typer.Option(
        help="Print the counts (kept the shown order, well formed, fell back, hits) and "
        "exit.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --summary: the counts as "
                                          "JSON.")] = False,
    host: Annotated[str, typer.Option(help="Address to listen on (loopback by default: "
                                      "the pages have no API key).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
) -> None:
    """Read teacher runs or student passes as a person wants to: a web page listing the
    runs with filters (system, task, outcome, well formed) and each run's messages, tool
    calls, timings, tokens and final ranking with the target marked.

    Examples:
      star view runs/teacher/trajectories.jsonl --summary
      star view runs/eval/star.records.jsonl --port 8080
    """
    from starrec.evaluation.runs import load_runs, render_summary, summarize_runs

    try:
        views = load_runs(files)
    except (ValueError, OSError, RuntimeError) as error:
        raise _fail(ValueError(str(error))) from None
    if summary:
        counts = summarize_runs(views)
        typer.echo(json.dumps(counts.to_dict(), indent=2) if as_json else render_summary(counts))
        return
    try:
        from starrec.api.app import bind_socket
        from starrec.api.viewer import viewer_app
    except ImportError as error:
        raise _fail(ValueError(f"star view needs the serve extra ({error.name} is missing): "
                               "pip install 'starrec[serve]'")) from None
    import uvicorn

    try:
        sock = bind_socket(host, port)
    except OSError as error:
        raise _fail(ValueError(f"{host}:{port}: {error.strerror or error}")) from None
    typer.echo(f"{len(views)} runs on http://{host}:{sock.getsockname()[1]}/runs", err=True)
    config = uvicorn.Config(viewer_app(views), log_level="warning", server_header=False)
    uvicorn.Server(config).run(sockets=[sock])
