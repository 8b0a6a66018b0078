"""Micro-batching in `star serve` (issue 17): the batch runner on its own (batches form,
errors and timeouts stay per request, the queue depth counts waiting requests), then
over a real socket for the engines that gain from it, the student's fast ranking head
(tests/tiny_lm.py's random model), SASRec and the cst ranker: concurrent requests are
answered as they are without batching, a bad request in a batch fails alone, and the
metrics show the batches."""

from __future__ import annotations

import asyncio
import re
import functools
import threading
import time
from pathlib import Path

import httpx
import pytest

from starrec.api.app import BatchRunner, BoundedRunner, ServerSettings, TimedOut, create_app
from starrec.api.runners import Batch, Overloaded
from starrec.api.service import HeadSystem, RecommendService, load_service
from starrec.config import BaselinesConfig, CSTConfig, SASRecConfig, StarConfig, StudentConfig
from starrec.data.tasks import build_split_tasks
from tests.conftest import make_dataset, run_together
from tests.test_api import in_thread, on_loopback, wait_for

CONFIG = StarConfig(cst=CSTConfig(content=False), student=StudentConfig(mode="fast"),
                    baselines=BaselinesConfig(sasrec=SASRecConfig(epochs=1)))

# --- the batch runner alone ------------------------------------------------------------


class Recorder:
    """A batch handler: doubles each item, fails item 13 alone, and holds the first
    batch until released."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.seen: list[int] = []
        self.release = threading.Event()
        self.entered = threading.Event()

    def __call__(self, items: list[int], batch: Batch) -> list[int | Exception]:
        assert batch.size == len(items) == len(batch.waited_s)
        self.sizes.append(len(items))
        self.seen += items
        self.entered.set()
        assert self.release.wait(10)
        return [ValueError(f"item {i} is bad") if i == 13 else 2 * i for i in items]


def test_the_batch_runner_gathers_waiting_requests_and_keeps_errors_per_request():
    handler = Recorder()

    async def scenario() -> tuple[list, int, int]:
        runner = BatchRunner(handler, max_queue=8, timeout_s=5, max_batch_size=16,
                             max_wait_s=0.05)
        first = asyncio.create_task(runner.run(1))
        await asyncio.to_thread(handler.entered.wait, 5)  # a batch of one runs at once
        rest = [asyncio.create_task(runner.run(i)) for i in (2, 3, 13, 5, 6, 7, 8)]
        while runner.admitted < 8:
            await asyncio.sleep(0.001)
        depth = runner.queue_depth  # the seven waiting, not the one running
        with pytest.raises(Overloaded):
            await runner.run(99)  # the ninth in flight: 503 at once
        handler.release.set()
        results = await asyncio.gather(first, *rest, return_exceptions=True)
        await asyncio.to_thread(runner.shutdown)
        return results, depth, runner.largest_batch

    results, depth, largest = asyncio.run(scenario())
    assert handler.sizes == [1, 7] and largest == 7 and depth == 7
    values = [r if isinstance(r, Exception) else r[0] for r in results]
    assert values[:3] == [2, 4, 6] and values[4:] == [10, 12, 14, 16]
    assert isinstance(values[3], ValueError) and "item 13" in str(values[3])
    assert 99 not in handler.seen


def test_a_waiting_request_times_out_alone_and_never_runs():
    handler = Recorder()

    async def scenario() -> tuple[object, object, list[int]]:
        runner = BatchRunner(handler, max_queue=8, timeout_s=0.3, max_batch_size=4,
                             max_wait_s=0)
        first = asyncio.create_task(runner.run(1))
        await asyncio.to_thread(handler.entered.wait, 5)
        waiting = await asyncio.gather(runner.run(2), return_exceptions=True)
        released = runner.admitted  # the timed-out waiting one freed its slot at once
        handler.release.set()
        done = await asyncio.gather(first, return_exceptions=True)
        await asyncio.to_thread(runner.shutdown)
        return waiting[0], done[0], [released, runner.admitted]

    waiting, first, counts = asyncio.run(scenario())
    assert isinstance(waiting, TimedOut) and isinstance(first, TimedOut)  # 0.3 s each
    assert counts == [1, 0] and handler.seen == [1]


def test_batch_workers_answer_batches_side_by_side():
    lock = threading.Condition()
    active = [0, 0]  # now, most at once

    def handle(items: list[int], batch: Batch) -> list[int]:
        with lock:
            active[0] += 1
            active[1] = max(active)
            lock.notify_all()
            lock.wait_for(lambda: active[1] >= 2, 5)  # held until two run at once
            active[0] -= 1
        return items

    async def scenario() -> list:
        runner = BatchRunner(handle, max_queue=8, timeout_s=10, max_batch_size=2, max_wait_s=0,
                             workers=2)
        results = await asyncio.gather(*(runner.run(i) for i in range(4)))
        await asyncio.to_thread(runner.shutdown)
        return [value for value, _ in results]

    assert asyncio.run(scenario()) == [0, 1, 2, 3]
    assert active[1] == 2


# --- over a socket ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    dataset = make_dataset()
    store = tmp_path_factory.mktemp("batch") / "s.sqlite"
    return dataset, build_split_tasks(dataset, "test"), store


@pytest.fixture(scope="module")
def student(data, tiny_lm_dir) -> RecommendService:
    dataset, tasks, store = data
    return load_service("star", dataset, config=CONFIG, model=str(tiny_lm_dir), tasks=tasks,
                        store_path=store, progress=False)


@pytest.fixture(scope="module")
def cst(data) -> RecommendService:
    dataset, tasks, store = data
    return load_service("cst", dataset, config=CONFIG, tasks=tasks, store_path=store,
                        progress=False)


@pytest.fixture(scope="module")
def sasrec(data) -> RecommendService:
    dataset, tasks, store = data
    return load_service("sasrec", dataset, config=CONFIG, tasks=tasks, store_path=store,
                        progress=False)


def requests_of(data, n_candidates: int = 8) -> list[dict]:
    _, tasks, _ = data
    return [{"user_id": t.user_id, "candidates": t.candidates[:n_candidates]} for t in tasks]


def post_together(base: str, bodies: list[dict]) -> list[httpx.Response]:
    """Every body posted at once, one thread each."""
    out: list[httpx.Response | None] = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def send(i: int) -> None:
        with httpx.Client(base_url=base, timeout=30) as client:
            start.wait(10)
            out[i] = client.post("/v1/recommend", json=bodies[i])

    run_together([functools.partial(send, i) for i in range(len(bodies))])
    assert all(r is not None for r in out)
    return out  # type: ignore[return-value]


def hold_first_batch(svc: RecommendService, app, everyone: int, monkeypatch) -> None:
    """The first batch waits until every request is admitted: the rest then queue behind
    it and form the next batch, whatever the threads' timing."""
    answer_many = svc.answer_many
    calls = []

    def held(requests):
        if not calls:
            wait_for(lambda: app.state.runner.admitted >= everyone, 20)
        calls.append(len(requests))
        return answer_many(requests)

    monkeypatch.setattr(svc, "answer_many", held)


def serve_and_post(svc: RecommendService, bodies: list[dict], monkeypatch, **settings):
    app = create_app(svc, ServerSettings(max_queue=64, **settings))
    if settings.get("batching", True):
        hold_first_batch(svc, app, len(bodies), monkeypatch)
    with on_loopback(app) as (base, _):
        responses = post_together(base, bodies)
        metrics = httpx.get(f"{base}/metrics").text
    monkeypatch.undo()
    return app, responses, metrics


def answers(responses: list[httpx.Response]) -> list[list[tuple[str, float]]]:
    return [[(i["item_id"], i["score"]) for i in r.json()["ranking"]] for r in responses]


@pytest.mark.parametrize("system", ["student", "sasrec", "cst"])
def test_batched_answers_are_the_answers_alone_and_batches_form(system, request, data,
                                                                monkeypatch):
    svc: RecommendService = request.getfixturevalue(system)
    assert svc.batchable
    if system == "student":
        assert isinstance(svc.system, HeadSystem) and svc.system.modes == ("fast",)
    bodies = requests_of(data)
    app, batched, metrics = serve_and_post(svc, bodies, monkeypatch, max_batch_size=16,
                                           max_wait_ms=20, workers=1)
    assert isinstance(app.state.runner, BatchRunner)
    assert all(r.status_code == 200 for r in batched), [r.text for r in batched]
    # the first batch gathers what arrives within max_wait_ms; the rest queue behind it
    sizes = [r.json()["timings"]["batch_size"] for r in batched]
    count = int(re.search(r"^star_batch_size_count (\d+)$", metrics, re.M).group(1))
    total = int(re.search(r"^star_batch_size_sum (\d+)$", metrics, re.M).group(1))
    assert total == len(bodies) and count <= 2 and max(sizes) >= len(bodies) / 2
    assert sum(1 / size for size in sizes) == pytest.approx(count)  # k requests say k

    app, alone, metrics = serve_and_post(svc, bodies, monkeypatch, batching=False)
    assert isinstance(app.state.runner, BoundedRunner) and "star_batch_size" not in metrics
    assert all(r.json()["timings"]["batch_size"] == 1 for r in alone)
    for one, many in zip(answers(alone), answers(batched)):
        assert [item for item, _ in one] == [item for item, _ in many]
        # a batch runs the models on other shapes than one request alone: float rounding
        # (left padding, and some CPUs' kernels for other batch sizes) only
        assert [s for _, s in one] == pytest.approx([s for _, s in many], abs=1e-5)
    # in process, one by one: what `star recommend` answers
    from starrec.api.schemas import RecommendRequest

    direct = svc.recommend(RecommendRequest(**bodies[0]))
    assert [i.item_id for i in direct.ranking] == [item for item, _ in answers(alone)[0]]


def test_the_fast_student_explains_with_scores_and_the_evidence_it_read(student, data):
    from starrec.api.schemas import RecommendRequest

    body = requests_of(data, 5)[2]
    answer = student.recommend(RecommendRequest(**body, options={"explain": True}))
    assert answer.system == "star" and answer.mode == "fast" and answer.valid
    assert sorted(i.item_id for i in answer.ranking) == sorted(body["candidates"])
    scores = [i.score for i in answer.ranking]
    assert None not in scores and scores == sorted(scores, reverse=True)
    # one evidence line per candidate, labelled as the head's prompt labels them
    assert [line[:4] for line in answer.evidence] == ["[A] ", "[B] ", "[C] ", "[D] ", "[E] "]
    assert answer.reasoning is None and answer.tool_calls is None
    assert answer.usage.llm_calls == 1 and answer.usage.prompt_tokens > 100
    with pytest.raises(ValueError, match="no mode 'reason'"):
        student.prepare(RecommendRequest(**body, options={"mode": "reason"}))


def test_a_bad_request_in_a_batch_fails_alone(student, data, monkeypatch):
    head = student.system.system.head
    prompt = head.prompt

    def fragile(task, store):
        if task.user_id == "u3":
            raise RuntimeError("this prompt breaks the engine")
        return prompt(task, store)

    bodies = requests_of(data)
    monkeypatch.setattr(head, "prompt", fragile)
    app = create_app(student, ServerSettings(max_queue=64, max_wait_ms=20, workers=1))
    hold_first_batch(student, app, len(bodies), monkeypatch)
    with on_loopback(app) as (base, _):
        responses = post_together(base, bodies)
        metrics = httpx.get(f"{base}/metrics").text
    monkeypatch.undo()
    for body, response in zip(bodies, responses):
        if body["user_id"] == "u3":
            assert response.status_code == 500 and response.json()["error"]["code"] == "internal"
            assert "breaks" not in response.text
        else:
            assert response.status_code == 200, response.text
            assert response.json()["timings"]["batch_size"] >= 1
    assert 'star_errors_total{code="internal"} 1' in metrics
    assert re.search(r"^star_batch_size_count [12]$", metrics, re.M)


def test_shutdown_finishes_the_batch_in_flight(student, data, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    answer_many = student.answer_many

    def held(requests):
        entered.set()
        assert release.wait(20)
        return answer_many(requests)

    monkeypatch.setattr(student, "answer_many", held)
    body = requests_of(data)[0]
    with on_loopback(create_app(student, ServerSettings(timeout_s=20))) as (base, server):
        thread, box = in_thread(lambda: httpx.post(f"{base}/v1/recommend", json=body, timeout=20))
        assert entered.wait(10)
        server.should_exit = True  # what SIGTERM does
        time.sleep(0.3)
        assert thread.is_alive()
        release.set()
        thread.join(15)
    assert box["response"].status_code == 200 and box["response"].json()["mode"] == "fast"


def test_batching_applies_only_where_the_engine_gains(data, monkeypatch):
    dataset, tasks, store = data
    pop = load_service("pop", dataset, config=CONFIG, tasks=tasks, store_path=store, progress=False)
    assert not pop.batchable  # counts: one task at a time costs nothing more
    app = create_app(pop, ServerSettings())
    assert isinstance(app.state.runner, BoundedRunner)
    with on_loopback(app) as (base, _):
        assert "star_batch_size" not in httpx.get(f"{base}/metrics").text


def test_the_student_answers_alone_without_waiting(student, data):
    """A request alone is not held for `max_wait_ms`: nothing else is arriving."""
    app = create_app(student, ServerSettings(max_wait_ms=2000))
    body = requests_of(data)[0]
    with on_loopback(app) as (base, _), httpx.Client(base_url=base, timeout=30) as client:
        client.post("/v1/recommend", json=body)  # the first pays the first-call costs
        started = time.perf_counter()
        response = client.post("/v1/recommend", json=body)
        assert response.status_code == 200
        assert time.perf_counter() - started < 1.5
        assert response.json()["timings"]["batch_size"] == 1


def test_settings_are_checked(tmp_path: Path):
    with pytest.raises(ValueError):
        ServerSettings(max_batch_size=0)
    with pytest.raises(ValueError):
        ServerSettings(max_wait_ms=-1)
