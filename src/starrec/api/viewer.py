"""The trajectory viewer: teacher runs and evaluated passes as web pages.

A router (`viewer_router`) that `star view FILE` serves on its own (`viewer_app`) and
`star serve --runs FILE` mounts next to the recommendation API (`create_app(...,
routers=[...])`, behind the same API keys). Pages are rendered on the server from the
Jinja2 templates in `starrec/resources/viewer/` with autoescaping on: everything shown
comes from an LLM's output or a tool's response and is untrusted text, so none of it
may become markup. No JavaScript: filters are a GET form, so a filtered listing is a
link one can share. The same data is served as JSON under `/v1/runs`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from fastapi import APIRouter, FastAPI, Query
from fastapi.responses import HTMLResponse, RedirectResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from starrec.core.resources import resource_text
from starrec.evaluation.runs import (
    OUTCOMES,
    RunFilter,
    RunView,
    filter_runs,
    summarize_runs,
)

TEMPLATES = "viewer"


@lru_cache(maxsize=1)
def _environment() -> Any:
    """The Jinja2 environment over the packaged templates, autoescaping everything."""
    import jinja2

    def load(name: str) -> str:
        return resource_text(f"{TEMPLATES}/{name}")

    return jinja2.Environment(loader=jinja2.FunctionLoader(load), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True)


def render_page(name: str, **context: Any) -> str:
    """A viewer template rendered with `context` (every value escaped)."""
    return _environment().get_template(name).render(**context)


def _well_formed(value: str | None) -> bool | None:
    """The form's `yes` / `no` (or true / false, 1 / 0); anything else: no filter."""
    if value is None:
        return None
    text = value.strip().lower()
    if text in ("yes", "true", "1"):
        return True
    if text in ("no", "false", "0"):
        return False
    return None


def _filter(system: str | None, task: str | None, outcome: str | None,
            well_formed: str | None) -> RunFilter:
    return RunFilter(system=system or None, task_id=task or None, outcome=outcome or None,
                     well_formed=_well_formed(well_formed))


SystemQuery = Query(None, description="Only this system (e.g. mars, star).")
TaskQuery = Query(None, description="Only this task id.")
OutcomeQuery = Query(None, description="hit@1, hit@3 or hit@5 (the tightest hit), or miss.")
WellFormedQuery = Query(None, description="yes or no.")


def viewer_router(views: Sequence[RunView], base: str = "") -> APIRouter:
    """Pages `/runs` (the listing with filters) and `/runs/{key}` (one run), and their
    JSON, `/v1/runs` and `/v1/runs/{key}`, over runs loaded once (`load_runs`). `base` is
    the prefix the router is mounted under, for the pages' links."""
    runs = list(views)
    by_key = {view.key: view for view in runs}
    systems = sorted({view.system for view in runs})
    router = APIRouter()

    def find(key: str) -> RunView:
        view = by_key.get(key)
        if view is None:
            raise StarletteHTTPException(404, f"no run {key!r}")
        return view

    @router.get("/runs", response_class=HTMLResponse, summary="Runs, filtered (HTML).")
    async def runs_page(system: str | None = SystemQuery, task: str | None = TaskQuery,
                        outcome: str | None = OutcomeQuery,
                        well_formed: str | None = WellFormedQuery) -> HTMLResponse:
        chosen = _filter(system, task, outcome, well_formed)
        kept = filter_runs(runs, chosen)
        return HTMLResponse(render_page(
            "runs.html", base=base, runs=kept, total=len(runs), f=chosen, systems=systems,
            outcomes=OUTCOMES, summary=summarize_runs(kept)))

    @router.get("/runs/{key}", response_class=HTMLResponse, summary="One run (HTML).")
    async def run_page(key: str) -> HTMLResponse:
        view = find(key)
        numbers, n = [], 0
        for step in view.steps:  # tool calls numbered in the order they were made
            n += step.kind == "tool"
            numbers.append(n)
        return HTMLResponse(render_page(
            "run.html", base=base, r=view, tool_numbers=numbers,
            has_scores=any(item.score is not None for item in view.ranking)))

    @router.get("/v1/runs", summary="Runs, filtered, with the summary counts.")
    async def runs_json(system: str | None = SystemQuery, task: str | None = TaskQuery,
                        outcome: str | None = OutcomeQuery,
                        well_formed: str | None = WellFormedQuery) -> dict[str, Any]:
        kept = filter_runs(runs, _filter(system, task, outcome, well_formed))
        return {"total": len(runs), "summary": summarize_runs(kept).to_dict(),
                "runs": [view.row() for view in kept]}

    @router.get("/v1/runs/{key}", summary="One run in full: steps, ranking, counts.")
    async def run_json(key: str) -> dict[str, Any]:
        return find(key).to_dict()

    return router


def viewer_app(views: Sequence[RunView]) -> FastAPI:
    """An app that serves only the viewer (`star view`): no model, no service. `/` leads
    to the listing."""
    app = FastAPI(title="STAR run viewer", docs_url=None, redoc_url=None)
    app.include_router(viewer_router(views))

    @app.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/runs")

    return app
