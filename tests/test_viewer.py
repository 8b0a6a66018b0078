"""The trajectory viewer (`star view`, `starrec.api.viewer`) and the counts behind the
README's sentences about runs (`starrec.evaluation.runs`), on small files written here:
teacher runs of a scripted model through the real `MarsTeacher`, and a student's records
through the real evaluation loop. Pages are fetched over a loopback socket."""

from __future__ import annotations

import contextlib
import html
import json
import re
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from typer.testing import CliRunner

from starrec.agents.mars import MarsTeacher
from starrec.api.app import bind_socket
from starrec.api.viewer import viewer_app
from starrec.cli.main import app as cli
from starrec.config import MarsConfig
from starrec.evaluation.runner import run_tasks
from starrec.evaluation.runs import (
    RunFilter,
    file_kind,
    filter_runs,
    load_runs,
    outcome_of,
    render_summary,
    summarize_runs,
)
from starrec.inference.student import Student
from starrec.inference.system import StarSystem
from starrec.trajectories.recorder import TrajectoryWriter
from tests.fakes import ScriptedModel, permutation, ranking

EVIL = "<script>alert('pwned')</script><img src=x onerror=alert(1)>"


def call(name: str, **arguments: object) -> str:
    return f'<tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'


@pytest.fixture(scope="module")
def files(world, tmp_path_factory):
    """(trajectories path, records path, tasks): three teacher runs (the target ranked
    first after three tool calls; the shown order kept, with a malicious finding; a
    fallback), and two student passes (one well formed with a tool call, one not)."""
    store, tasks = world
    folder = tmp_path_factory.mktemp("viewer")
    first = tasks[0]
    target_index = first.candidates.index(first.target)
    n = len(first.candidates)
    scripts = [
        {"planner": "recent: what follows\nlong_term: lasting interests",
         "recent": [call("next_items", item_id=first.history[-1]),
                    call("sequence_candidates", recent=3), "Recent findings."],
         "long_term": [call("candidate_evidence"), "Long-term findings."],
         "reflector": "ACCEPT", "ranker": permutation(n, [target_index])},
        {"planner": "recent: x", "recent": EVIL, "reflector": "ACCEPT",
         "ranker": permutation(len(tasks[1].candidates))},
        {"planner": "recent: x", "recent": "Fine.", "reflector": "ACCEPT", "ranker": "nope"},
    ]
    trajectories = folder / "trajectories.jsonl"
    with TrajectoryWriter(trajectories) as writer:
        for task, script in zip(tasks[:3], scripts):
            teacher = MarsTeacher(ScriptedModel(script), store, MarsConfig(max_tool_calls=2))
            writer.append(teacher.run(task))
    # the student: a tool call and a full list, then a broken list
    student = ScriptedModel([
        f"<plan>look at the last item</plan>\n{call('item_neighbours', item_id=first.history[-1], k=2)}",
        f"\n<reflection>{EVIL}</reflection>\n<recommend>{ranking(n, [target_index])}</recommend>",
        "<plan>p</plan>\n<reflection>r</reflection>\n<recommend>[D, D]</recommend>",
    ])
    records = folder / "records.jsonl"
    run_tasks(StarSystem(Student(student, store)), tasks[:2], progress=False,
              checkpoint=records)
    return trajectories, records, tasks


@contextlib.contextmanager
def on_loopback(app) -> Iterator[str]:
    """`app` on uvicorn on a free loopback port, in a thread, until the block ends."""
    import uvicorn

    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.started, "the server did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)


def test_files_are_told_apart_and_counted(files):
    trajectories, records, tasks = files
    assert file_kind(trajectories) == "teacher" and file_kind(records) == "records"
    teacher = load_runs([trajectories])
    assert [v.task_id for v in teacher] == [t.task_id for t in tasks[:3]]
    best, kept, fallback = teacher
    assert best.rank == 1 and best.outcome == "hit@1" and best.well_formed
    assert best.tool_calls == 3 and not best.kept_shown_order
    assert kept.kept_shown_order and kept.well_formed and not kept.fallback
    assert fallback.fallback and not fallback.well_formed and fallback.repaired
    # titles come from the prompt as the teacher saw it, labels in the shown order
    assert best.ranking[0].target and best.ranking[0].title and best.ranking[0].label
    assert [i.item_id for i in best.ranking] and best.shown == tasks[0].candidates
    summary = summarize_runs(teacher)
    assert (summary.runs, summary.well_formed, summary.fell_back) == (3, 2, 1)
    # a fallback ranks in presented order, which the teacher was shown here
    assert summary.kept_shown_order == 1 + fallback.kept_shown_order
    assert summary.hits["hit@1"] >= 1 and summary.tool_calls == 3

    student = load_runs([records])
    assert [v.system for v in student] == ["star", "star"]
    good, bad = student
    assert good.well_formed and good.rank == 1 and good.tool_calls == 1
    assert [s.kind for s in good.steps] == ["plan", "tool", "reflection", "recommend"]
    assert good.steps[1].tool == "item_neighbours" and good.steps[1].response
    assert not bad.well_formed and bad.parse_errors and bad.kept_shown_order is False
    both = load_runs([trajectories, records])
    counts = summarize_runs(both)
    assert counts.systems == {"mars": 3, "star": 2} and counts.well_formed == 3
    assert "well formed: 3 of 5 (60.0%)" in render_summary(counts)
    assert len({v.key for v in both}) == 5


def test_steps_are_the_teachers_records_and_one_shape_in_json(files):
    """A teacher's steps are its recorded `Step`s; a student's parts share their fields
    (`ViewStep`), untimed but for a tool call; the JSON of both leaves out `parsed`."""
    from dataclasses import fields

    from starrec.evaluation.runs import ViewStep
    from starrec.trajectories.recorder import read_runs
    from starrec.trajectories.schema import Step

    trajectories, records, _ = files
    best = load_runs([trajectories])[0]
    assert best.steps == read_runs(trajectories)[0].steps
    good = load_runs([records])[0]
    assert all(isinstance(s, ViewStep) and s.agent == "student" for s in good.steps)
    assert [s.seconds is not None for s in good.steps] == [False, True, False, False]
    shown = [f.name for f in fields(Step) if f.name != "parsed"]
    for view in (best, good):
        assert all(list(step) == shown for step in view.to_dict()["steps"])
    assert best.to_dict()["steps"][0]["messages"] == best.steps[0].messages


def test_filters(files):
    trajectories, records, tasks = files
    runs = load_runs([trajectories, records])
    assert {v.system for v in filter_runs(runs, RunFilter(system="star"))} == {"star"}
    same_task = filter_runs(runs, RunFilter(task_id=tasks[0].task_id))
    assert {v.system for v in same_task} == {"mars", "star"} and len(same_task) == 2
    assert all(v.rank == 1 for v in filter_runs(runs, RunFilter(outcome="hit@1")))
    assert len(filter_runs(runs, RunFilter(well_formed=False))) == 2
    assert filter_runs(runs, RunFilter(system="star", well_formed=True))[0].task_id == tasks[0].task_id
    assert outcome_of(1) == "hit@1" and outcome_of(3) == "hit@3" and outcome_of(6) == "miss"


def test_pages_over_a_real_socket(files):
    trajectories, records, tasks = files
    runs = load_runs([trajectories, records])
    with on_loopback(viewer_app(runs)) as base, httpx.Client(base_url=base, timeout=10) as client:
        listing = client.get("/", follow_redirects=True)
        assert listing.status_code == 200 and "text/html" in listing.headers["content-type"]
        assert listing.text.count('class="run"') == 5
        filtered = client.get("/runs", params={"system": "mars", "well_formed": "no"})
        assert filtered.text.count('class="run"') == 1 and "1 of 5 runs" in filtered.text
        assert client.get("/runs", params={"outcome": "hit@1"}).text.count('class="run"') == \
            sum(v.outcome == "hit@1" for v in runs)

        data = client.get("/v1/runs", params={"system": "star"}).json()
        assert data["total"] == 5 and [r["system"] for r in data["runs"]] == ["star", "star"]
        assert data["summary"]["well_formed"] == 1

        best = runs[0]
        page = client.get(f"/runs/{best.key}")
        assert page.status_code == 200
        # the target is marked on its row of the final ranking
        row = re.search(r'<tr class="target">(.*?)</tr>', page.text, re.DOTALL)
        assert row and best.target in row.group(1) and "target" in row.group(1)
        assert html.escape(best.ranking[0].title or "") in row.group(1)
        # the tool calls in the order they were made
        names = re.findall(r'data-n="(\d+)">tool call \d+: <code class="tool-name">(\w+)</code>',
                           page.text)
        assert names == [("1", "next_items"), ("2", "sequence_candidates"),
                         ("3", "candidate_evidence")]
        assert "prompt as sent" in page.text and "<details>" in page.text
        detail = client.get(f"/v1/runs/{best.key}").json()
        assert [s["tool"] for s in detail["steps"] if s["kind"] == "tool"] == \
            ["next_items", "sequence_candidates", "candidate_evidence"]
        assert client.get("/runs/nothing-here").status_code == 404

        # an LLM's output is text, never markup: in the teacher's findings and the student's
        for view in (runs[1], runs[3]):
            text = client.get(f"/runs/{view.key}").text
            assert EVIL not in text and "<script>" not in text and "<img" not in text
            assert "&lt;script&gt;alert(" in text and "&lt;img src=x onerror=alert(1)&gt;" in text


def test_view_summary_cli(files):
    trajectories, records, _ = files
    result = CliRunner().invoke(cli, ["view", str(trajectories), str(records), "--summary"])
    assert result.exit_code == 0, result.output
    assert "runs: 5 (mars 3, star 2)" in result.output
    assert "well formed: 3 of 5" in result.output and "fell back: 1 of 5" in result.output
    assert "kept the shown order exactly:" in result.output
    as_json = CliRunner().invoke(cli, ["view", str(records), "--summary", "--json"])
    assert json.loads(as_json.output)["well_formed"] == 1
    bad = CliRunner().invoke(cli, ["view", str(records.parent / "nope.jsonl"), "--summary"])
    assert bad.exit_code == 2 and "error:" in bad.output


def test_serve_mounts_the_viewer_behind_its_api_keys(files, tmp_path):
    """`star serve --runs FILE`: the same router inside the service's app, where the
    service's API keys guard it too."""
    from starrec.api.app import ServerSettings, create_app
    from starrec.api.service import load_service
    from starrec.api.viewer import viewer_router
    from starrec.config import CSTConfig, StarConfig
    from starrec.data.tasks import build_split_tasks
    from tests.conftest import make_dataset

    trajectories, _, _ = files
    dataset = make_dataset()
    service = load_service("pop", dataset, config=StarConfig(cst=CSTConfig(content=False)),
                           tasks=build_split_tasks(dataset, "test"),
                           store_path=tmp_path / "s.sqlite", progress=False)
    app = create_app(service, ServerSettings(api_keys=["k"]),
                     routers=[viewer_router(load_runs([trajectories]))])
    with on_loopback(app) as base, httpx.Client(base_url=base, timeout=10) as client:
        assert client.get("/v1/runs").status_code == 401
        auth = {"Authorization": "Bearer k"}
        assert len(client.get("/v1/runs", headers=auth).json()["runs"]) == 3
        assert client.get("/runs", headers=auth).text.count('class="run"') == 3
        assert "/v1/runs/{key}" in client.get("/openapi.json").json()["paths"]
