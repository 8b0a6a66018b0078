"""`star serve` over a real socket: uvicorn on a free loopback port, started by the test,
on tiny data. A baseline, cst and a student (scripted) answer; auth, every limit, unknown
ids, overload (503 at once, not a hang), timeouts, errors without tracebacks, metrics, the
OpenAPI contract, and a shutdown that finishes the request in flight."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from starrec.api.app import ServerSettings, bind_socket, create_app, make_server, read_api_keys
from starrec.api.logs import JsonFormatter
from starrec.api.schemas import ErrorResponse, RecommendRequest, RecommendResponse
from starrec.api.service import RecommendService, ServiceLimits, _retry_after, load_service
from starrec.config import CSTConfig, LLMConfig, MarsConfig, StarConfig
from starrec.cst.ranker import CSTRanker
from starrec.data.splits import fit_interactions
from starrec.data.tasks import Task, build_split_tasks
from starrec.llm.base import ServerUnavailable
from tests.conftest import make_dataset, run_together
from tests.fakes import ScriptedModel, permutation

CONFIG = StarConfig(cst=CSTConfig(content=False))  # no MiniLM in tests
KEY = "k-123"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    dataset = make_dataset()
    return dataset, build_split_tasks(dataset, "test"), tmp_path_factory.mktemp("serve") / "s.sqlite"


def service(system: str, data, **kwargs) -> RecommendService:
    dataset, tasks, store = data
    return load_service(system, dataset, config=CONFIG, tasks=tasks, store_path=store,
                        progress=False, **kwargs)


@pytest.fixture(scope="module")
def pop(data) -> RecommendService:
    return service("pop", data)


@pytest.fixture(scope="module")
def cst(data) -> RecommendService:
    return service("cst", data)


class Gate:
    """Holds every generation of a scripted model until released, and counts how many
    ran at once: a slow model that keeps the one LLM worker busy."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.active = self.most = 0

    def __enter__(self) -> None:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        self.entered.set()
        assert self.release.wait(20), "the test never released the model"

    def __exit__(self, *_: object) -> None:
        with self.lock:
            self.active -= 1


def student_model(gate: Gate | None = None) -> ScriptedModel:
    """A student that plans, looks up the candidates' evidence, reflects and puts the
    second candidate first (`permutation`, letter labels)."""

    def answer(messages) -> str:
        with gate or contextlib.nullcontext():
            prompt = messages[-1]["content"]
            written = prompt.rsplit("<|im_start|>assistant\n", 1)[-1]
            n = len(re.findall(r"^[A-Z]: .*\[[^\]]+\]", prompt, re.M))
            if "<tool_response>" not in written:
                return ('<plan>check the candidates\' evidence</plan>\n'
                        '<tool_call>{"name": "candidate_evidence", "arguments": {}}</tool_call>')
            return "\n<reflection>B has the strongest evidence</reflection>\n" + permutation(n, [1])

    return ScriptedModel({None: answer})


@contextlib.contextmanager
def on_loopback(app) -> Iterator[tuple[str, object]]:
    """`app` on uvicorn on a free loopback port, in a thread: (base URL, server) once it
    accepts connections. Stopped gracefully (as on SIGTERM) when the block ends."""
    sock = bind_socket("127.0.0.1", 0)
    server = make_server(app, json_logs=False, graceful_timeout_s=20)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive())
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(20)
        assert not thread.is_alive(), "the server did not stop"


@contextlib.contextmanager
def running(svc: RecommendService, **settings) -> Iterator[tuple[httpx.Client, object]]:
    """The service's app on a loopback port; the client is given once /v1/ready says 200."""
    app = create_app(svc, ServerSettings(**settings))
    with on_loopback(app) as (base, _), httpx.Client(base_url=base, timeout=15) as client:
        def ready() -> bool:
            response = client.get("/v1/ready")
            assert response.json()["status"] != "failed", response.text
            return response.status_code == 200

        wait_for(ready, 15)
        yield client, app


def in_thread(call) -> tuple[threading.Thread, dict]:
    box: dict = {}

    def run() -> None:
        try:
            box["response"] = call()
        except Exception as error:  # noqa: BLE001 - handed to the test
            box["error"] = error

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def error_of(response: httpx.Response, status: int, code: str) -> dict:
    """The error body, checked: status, code, the schema, and no traceback."""
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text and 'File "' not in response.text
    body = ErrorResponse.model_validate(response.json()).error
    assert body.code == code and body.message and body.request_id
    return response.json()["error"]


def task_of(tasks: list[Task], user: str) -> Task:
    return next(t for t in tasks if t.user_id == user)


# --- each kind of system ------------------------------------------------------------


def test_a_baseline_ranks_given_and_proposed_candidates(pop, data):
    dataset, tasks, _ = data
    task = task_of(tasks, "u3")
    with running(pop) as (client, _):
        candidates = task.candidates[:6]
        response = client.post("/v1/recommend", json={"user_id": "u3", "candidates": candidates})
        assert response.status_code == 200 and response.headers["x-request-id"]
        body = RecommendResponse.model_validate(response.json())
        # the served history is the user's sequence in the test split's fit data: the
        # test task's history, never its target
        assert body.history_source == "stored" and body.history_length == len(task.history)
        assert body.candidates_source == "request" and body.proposer is None
        assert sorted(i.item_id for i in body.ranking) == sorted(candidates)
        counts = fit_interactions(dataset, "test")["item"].value_counts()
        assert [i.score for i in body.ranking] == [float(counts.get(i.item_id, 0))
                                                   for i in body.ranking]
        scores = [i.score for i in body.ranking]
        assert scores == sorted(scores, reverse=True) and [i.rank for i in body.ranking] == [1, 2, 3, 4, 5, 6]
        assert body.ranking[0].title == dataset.title(body.ranking[0].item_id)
        assert body.evidence is None and body.reasoning is None and body.tool_calls is None
        # the same answer in process (`star recommend` uses this)
        again = pop.recommend(RecommendRequest(user_id="u3", candidates=candidates))
        assert [i.item_id for i in again.ranking] == [i.item_id for i in body.ranking]

        # no candidates: its own top N of the catalogue minus the history
        response = client.post("/v1/recommend", json={"user_id": "u3",
                                                      "options": {"n_candidates": 5}})
        body = RecommendResponse.model_validate(response.json())
        assert body.candidates_source == "proposed" and body.proposer == "pop"
        assert len(body.ranking) == 5 and not {i.item_id for i in body.ranking} & set(task.history)
        unseen = counts[[i for i in counts.index if i not in set(task.history)]]
        assert body.ranking[0].score == unseen.max()

        # a new user: a history and no known id (ids sent as numbers are read as text)
        response = client.post("/v1/recommend", json={"user_id": "someone-new",
                                                      "history": ["i1", "i2"],
                                                      "candidates": ["i3", "i4"]})
        assert response.status_code == 200 and response.json()["history_source"] == "request"


def test_cst_answers_with_its_scores_and_evidence(cst, data):
    _, tasks, _ = data
    task = task_of(tasks, "u5")
    with running(cst) as (client, _):
        response = client.post("/v1/recommend", json={
            "user_id": "u5", "candidates": task.candidates[:8], "options": {"explain": True}})
        body = RecommendResponse.model_validate(response.json())
    assert body.system == "cst" and body.mode == "score"
    # the scores are the evaluated ranker's on the same store
    expected = CSTRanker.on_store(cst.system.store).score(
        Task("x", "u5", "classic", task.history, task.candidates[:8], ""))
    assert {i.item_id: i.score for i in body.ranking} == pytest.approx(
        dict(zip(task.candidates[:8], map(float, expected))))
    # one evidence sentence per candidate, numbered in the request's order
    assert len(body.evidence) == 8 and body.evidence[0].startswith("[1] ")
    assert f"(id {task.candidates[0]})" in body.evidence[0]
    assert body.timings.rank_ms > 0 and body.timings.total_ms >= body.timings.rank_ms


def test_a_student_answers_with_its_reasoning_and_tool_calls(data):
    svc = service("star", data, chat_model=student_model())
    _, tasks, _ = data
    task = task_of(tasks, "u2")
    assert not svc.concurrent and svc.max_candidates == 26  # letters A-Z
    with running(svc) as (client, _):
        response = client.post("/v1/recommend", json={
            "user_id": "u2", "candidates": task.candidates[:5], "options": {"explain": True}})
        body = RecommendResponse.model_validate(response.json())
        assert body.system == "star" and body.mode == "single_pass" and body.valid
        assert body.ranking[0].item_id == task.candidates[1]  # B first
        assert [i.item_id for i in body.ranking[1:]] == [task.candidates[i] for i in (0, 2, 3, 4)]
        assert all(i.score is None for i in body.ranking)
        assert body.reasoning.plan == "check the candidates' evidence"
        assert body.reasoning.reflection == "B has the strongest evidence"
        assert "<tool_response>" in body.reasoning.text
        assert [c.name for c in body.tool_calls] == ["candidate_evidence"]
        assert body.tool_calls[0].ok and body.evidence
        assert body.tool_calls[0].response.splitlines()[0].startswith("[A] ")
        assert body.usage.llm_calls == 2 and body.usage.prompt_tokens > 0

        # without candidates, cst proposes them, over the same store
        response = client.post("/v1/recommend", json={"user_id": "u2",
                                                      "options": {"n_candidates": 4}})
        body = RecommendResponse.model_validate(response.json())
        assert body.candidates_source == "proposed" and body.proposer == "cst"
        assert len(body.ranking) == 4 and body.reasoning is None and body.tool_calls is None
        # a mode it does not have
        error = error_of(client.post("/v1/recommend", json={
            "user_id": "u2", "options": {"mode": "beam"}}), 422, "invalid_mode")
        assert "single_pass" in error["message"]
        # 27 candidates cannot be labelled A-Z
        error_of(client.post("/v1/recommend", json={
            "user_id": "u2", "candidates": [f"i{i}" for i in range(27)]}), 422, "candidate_count")


def test_the_teacher_explains_with_its_agents_tool_calls(data):
    _, tasks, _ = data
    task = task_of(tasks, "u4")
    model = ScriptedModel({
        "planner": "recent: what follows the last items",
        "recent": [f'<tool_call>{{"name": "next_items", "arguments": {{"item_id": "{task.history[-1]}"}}}}'
                   '</tool_call>', "C follows the last item."],
        "reflector": "ACCEPT",
        "ranker": permutation(4, [2]),
    })
    svc = service("mars", data, chat_model=model)
    answer = svc.recommend(RecommendRequest(user_id="u4", candidates=task.candidates[:4],
                                            options={"explain": True}))
    assert answer.system == "mars" and answer.valid and answer.fallback is None
    assert answer.ranking[0].item_id == task.candidates[2]
    assert [(c.agent, c.name) for c in answer.tool_calls] == [("recent", "next_items")]
    assert answer.reasoning.findings == {"recent": "C follows the last item."}
    assert answer.reasoning.plan.startswith("recent:") and answer.reasoning.reflection == "ACCEPT"
    assert len(answer.evidence) == 4 and answer.evidence[2].startswith("[C] ")
    assert answer.usage.llm_calls == 5


# --- under pressure -------------------------------------------------------------------


def test_api_keys(pop, tmp_path, monkeypatch):
    keys = tmp_path / "keys.txt"
    keys.write_text("# service keys\nk-file-1\nk-file-2, k-file-3  # a comment\n\n")
    assert read_api_keys(keys, {"STAR_API_KEYS": "k-env, k-file-1"}) == [
        "k-file-1", "k-file-2", "k-file-3", "k-env"]
    assert read_api_keys(None, {}) == []
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(ValueError, match="holds no key"):
        read_api_keys(tmp_path / "empty.txt", {})

    request = {"user_id": "u1", "candidates": ["i1", "i2"]}
    with running(pop, api_keys=[KEY, "other"]) as (client, _):
        response = client.post("/v1/recommend", json=request)
        error_of(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"
        error_of(client.post("/v1/recommend", json=request,
                             headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
        error_of(client.post("/v1/recommend", json=request,
                             headers={"Authorization": f"Basic {KEY}"}), 401, "unauthorized")
        for key in (KEY, "other"):
            assert client.post("/v1/recommend", json=request,
                               headers={"Authorization": f"Bearer {key}"}).status_code == 200
        # probes and scraping stay open
        assert client.get("/v1/health").json() == {"status": "ok"}
        assert client.get("/metrics").status_code == 200


def test_every_limit_is_a_422_with_a_message_and_the_body_a_413(data):
    svc = service("pop", data, limits=ServiceLimits(max_history=5, max_candidates=4))
    post = lambda client, body: client.post("/v1/recommend", json=body)  # noqa: E731
    with running(svc, max_body_bytes=600) as (client, _):
        error = error_of(post(client, {"history": [f"i{i}" for i in range(6)],
                                       "candidates": ["i30", "i31"]}), 422, "too_many_history_items")
        assert "6 items; at most 5" in error["message"]
        error = error_of(post(client, {"user_id": "u1", "candidates": [f"i{i}" for i in range(5)]}),
                         422, "candidate_count")
        assert "5 candidates" in error["message"] and "2 to 4" in error["message"]
        error_of(post(client, {"user_id": "u1", "candidates": ["i1"]}), 422, "candidate_count")
        error_of(post(client, {"user_id": "u1", "options": {"n_candidates": 9}}), 422,
                 "candidate_count")
        error = error_of(post(client, {"user_id": "u1", "candidates": ["i1", "i2", "i1"]}), 422,
                         "duplicate_candidates")
        assert "'i1'" in error["message"]
        # what the schema refuses: named by where it is
        error = error_of(post(client, {"user_id": "u1", "options": {"n_candidates": 0}}), 422,
                         "invalid_request")
        assert error["details"][0]["loc"] == ["body", "options", "n_candidates"]
        error = error_of(post(client, {"candidates": ["i1", "i2"]}), 422, "invalid_request")
        assert "user_id, a history, or both" in error["message"]
        error_of(post(client, {"user_id": "u1", "candidates": "i1,i2"}), 422, "invalid_request")
        error = error_of(post(client, {"user_id": "u1", "optoins": {}}), 422, "invalid_request")
        assert "optoins" in error["message"]
        error = error_of(client.post("/v1/recommend", content=b'{"user_id": ',
                                     headers={"Content-Type": "application/json"}),
                         422, "invalid_request")
        assert "not valid JSON" in error["message"]
        # the body limit: from Content-Length, and for a body sent without one (chunked)
        big = {"user_id": "u1", "history": ["i1"] * 120, "candidates": ["i2", "i3"]}
        error = error_of(post(client, big), 413, "body_too_large")
        assert "at most 600" in error["message"]

        def chunks():
            yield b'{"user_id": "u1", "history": ['
            for _ in range(120):
                yield b'"i1", '
            yield b'"i2"]}'

        error_of(client.post("/v1/recommend", content=chunks(),
                             headers={"Content-Type": "application/json"}), 413, "body_too_large")
        # within every limit, the same service answers
        assert post(client, {"history": ["i1"] * 5, "candidates": ["i2", "i3", "i4", "i5"]}
                    ).status_code == 200


def test_unknown_ids_are_named_in_a_422(pop):
    with running(pop) as (client, _):
        error = error_of(client.post("/v1/recommend", json={"user_id": "u404"}), 422, "unknown_ids")
        assert error["unknown_users"] == ["u404"] and "'u404'" in error["message"]
        error = error_of(client.post("/v1/recommend", json={
            "history": ["i1", "nope-1"], "candidates": ["i2", "nope-2", "nope-1"]}), 422, "unknown_ids")
        assert error["unknown_items"] == ["nope-1", "nope-2"]
        assert "'nope-1', 'nope-2'" in error["message"]
        error_of(client.get("/v1/nothing-here"), 404, "not_found")
        error_of(client.get("/v1/recommend"), 405, "method_not_allowed")


def test_an_internal_error_is_json_without_a_traceback(data, monkeypatch):
    svc = service("pop", data)

    def broken(*_args, **_kwargs):
        raise RuntimeError("secret internals at /srv/app.py line 12")

    with running(svc) as (client, _):
        monkeypatch.setattr(svc.system, "answer", broken)
        response = client.post("/v1/recommend", json={"user_id": "u1", "candidates": ["i1", "i2"]})
        error_of(response, 500, "internal")
        assert "secret" not in response.text and "RuntimeError" not in response.text
        # the service keeps answering
        assert client.get("/v1/health").status_code == 200


class DeadServerSystem:
    """An LLM system whose model server never answers: every call raises
    `ServerUnavailable`, as the OpenAI backend does after its retries."""

    name = "star"
    kind = "llm"
    modes = ("single_pass",)
    max_candidates = None

    def __init__(self, batch_modes: tuple[str, ...] = ()) -> None:
        self.batch_modes = batch_modes
        self.alone = self.batched = 0

    def _dead(self) -> ServerUnavailable:
        return ServerUnavailable("star: no answer after 3 attempts from http://10.9.8.7:8080/v1 "
                                 "(ConnectError: connection refused)")

    def answer(self, task, mode, explain):
        self.alone += 1
        raise self._dead()

    def answer_many(self, tasks, mode, explain):
        self.batched += 1
        raise self._dead()

    def warm_up(self) -> None:
        pass


def test_no_llm_server_is_a_503_with_retry_after_not_a_500(pop):
    system = DeadServerSystem()
    svc = RecommendService(system, pop.data, proposer=pop.proposer, retry_after_s=7)
    request = {"user_id": "u1", "candidates": ["i1", "i2", "i3"]}
    with running(svc) as (client, _):
        for _ in range(2):  # the service stays up and says the same each time
            response = client.post("/v1/recommend", json=request)
            error = error_of(response, 503, "llm_unavailable")
            assert response.headers["retry-after"] == "7" and "7 s" in error["message"]
            assert "10.9.8.7" not in response.text  # the servers are the log's, not the client's
        assert system.alone == 2
        assert client.get("/v1/health").status_code == 200
        assert 'code="llm_unavailable"' in client.get("/metrics").text
    # batched: every request of the batch gets the 503 at once, none is retried alone
    batching = DeadServerSystem(batch_modes=("single_pass",))
    svc = RecommendService(batching, pop.data, proposer=pop.proposer, retry_after_s=7)
    prepared = svc.prepare(RecommendRequest(**request))
    answers = svc.answer_many([prepared] * 3)
    assert [(a.status, a.code, a.headers) for a in answers] == \
        [(503, "llm_unavailable", {"Retry-After": "7"})] * 3
    assert (batching.batched, batching.alone) == (1, 0)
    # what a served LLM system tells its clients: its endpoints' cooldown
    config = StarConfig(mars=MarsConfig(llm=LLMConfig(endpoint_cooldown_s=2.5)))
    assert _retry_after("mars", config) == 3 and _retry_after("star", config) == 10


def test_overload_is_a_503_at_once_with_retry_after(data):
    gate = Gate()
    svc = service("star", data, chat_model=student_model(gate))
    request = {"user_id": "u1", "candidates": ["i1", "i2", "i3"]}
    with running(svc, max_queue=2, timeout_s=20) as (client, app):
        runner = app.state.runner
        first, first_box = in_thread(lambda: client.post("/v1/recommend", json=request))
        assert gate.entered.wait(10)  # the one LLM worker is busy
        second, second_box = in_thread(lambda: client.post("/v1/recommend", json=request))
        wait_for(lambda: runner.admitted == 2)
        started = time.monotonic()
        response = client.post("/v1/recommend", json=request)  # max_queue + 1
        assert time.monotonic() - started < 5
        error_of(response, 503, "overloaded")
        assert int(response.headers["retry-after"]) >= 1
        metrics = client.get("/metrics").text
        assert "star_queue_depth 1\n" in metrics and "star_requests_in_flight 2\n" in metrics
        gate.release.set()
        first.join(15)
        second.join(15)
        assert first_box["response"].status_code == 200 == second_box["response"].status_code
        # one at a time: an in-process engine is not thread-safe
        assert gate.most == 1
        assert second_box["response"].json()["timings"]["queue_ms"] > 0
        wait_for(lambda: runner.admitted == 0)
        assert client.post("/v1/recommend", json=request).status_code == 200


def test_a_request_past_its_timeout_is_a_504_and_its_slot_is_bounded(data):
    gate = Gate()
    model = student_model(gate)
    svc = service("star", data, chat_model=model)
    request = {"user_id": "u1", "candidates": ["i1", "i2", "i3"]}
    with running(svc, max_queue=4, timeout_s=0.5) as (client, app):
        runner = app.state.runner
        first, first_box = in_thread(lambda: client.post("/v1/recommend", json=request))
        assert gate.entered.wait(10)
        response = client.post("/v1/recommend", json=request)  # waits behind it
        error = error_of(response, 504, "timeout")
        assert "0.5 s" in error["message"]
        first.join(10)
        error_of(first_box["response"], 504, "timeout")
        # the running one keeps its slot until its thread is done; the waiting one was
        # cancelled and never reached the model
        assert runner.admitted == 1
        gate.release.set()
        wait_for(lambda: runner.admitted == 0)
        assert len(model.calls) == 2  # the first request's two generations only
        assert 'star_errors_total{code="timeout"} 2' in client.get("/metrics").text


def test_rankers_answer_concurrently_and_agree(cst):
    request = {"user_id": "u6", "candidates": ["i1", "i2", "i3", "i4", "i5"]}
    with running(cst, workers=4) as (client, app):
        assert app.state.runner.workers == 4
        threads = [in_thread(lambda: client.post("/v1/recommend", json=request)) for _ in range(8)]
        for thread, _ in threads:
            thread.join(15)
        rankings = {tuple(i["item_id"] for i in box["response"].json()["ranking"])
                    for _, box in threads}
        assert len(rankings) == 1 and all(box["response"].status_code == 200 for _, box in threads)


def test_shutdown_finishes_the_request_in_flight(data):
    gate = Gate()
    svc = service("star", data, chat_model=student_model(gate))
    request = {"user_id": "u1", "candidates": ["i1", "i2", "i3"]}
    with on_loopback(create_app(svc, ServerSettings(timeout_s=20))) as (base, server):
        in_flight, box = in_thread(lambda: httpx.post(f"{base}/v1/recommend", json=request,
                                                      timeout=20))
        assert gate.entered.wait(10)
        server.should_exit = True  # what uvicorn's SIGTERM / SIGINT handler does

        def refused() -> bool:
            try:
                httpx.get(f"{base}/v1/health", timeout=1)
            except httpx.TransportError:
                return True
            return False

        wait_for(refused)  # no new connections while the one in flight goes on
        assert in_flight.is_alive()
        gate.release.set()
        in_flight.join(15)
    response = box["response"]
    assert response.status_code == 200 and response.json()["ranking"][0]["item_id"] == "i2"


# --- what the service reports -----------------------------------------------------------


def test_ready_only_after_the_warm_up_and_not_after_a_failed_one(data, monkeypatch):
    svc = service("pop", data)
    warming = threading.Event()
    warm_up = svc.warm_up
    monkeypatch.setattr(svc, "warm_up", lambda: warming.wait(10) and warm_up())
    with on_loopback(create_app(svc)) as (base, _), httpx.Client(base_url=base) as client:
        assert client.get("/v1/health").status_code == 200  # alive, not yet ready
        response = client.get("/v1/ready")
        assert response.status_code == 503 and response.json()["status"] == "starting"
        assert "star_ready 0" in client.get("/metrics").text
        warming.set()
        wait_for(lambda: client.get("/v1/ready").status_code == 200)

    def broken() -> None:
        raise RuntimeError("no store")

    monkeypatch.setattr(svc, "warm_up", broken)
    with on_loopback(create_app(svc)) as (base, _), httpx.Client(base_url=base) as client:
        wait_for(lambda: client.get("/v1/ready").json()["status"] == "failed")
        response = client.get("/v1/ready")
        assert response.status_code == 503
        assert response.json()["message"] == "warm-up failed: RuntimeError"


def test_metrics_readiness_openapi_and_request_ids(pop, caplog):
    caplog.set_level(logging.INFO, logger="starrec.api.access")
    with running(pop, api_keys=[KEY]) as (client, _):
        ok = client.post("/v1/recommend", json={"user_id": "u1", "candidates": ["i1", "i2"]},
                         headers={"Authorization": f"Bearer {KEY}", "X-Request-ID": "req-42"})
        assert ok.status_code == 200 and ok.headers["x-request-id"] == "req-42"
        client.post("/v1/recommend", json={"user_id": "u1"})  # 401
        ready = client.get("/v1/ready").json()
        assert ready["ready"] and ready["system"] == "pop" and ready["kind"] == "ranker"
        assert ready["modes"] == ["score"] and ready["proposer"] == "pop"
        assert ready["limits"]["max_queue"] == 32 and ready["limits"]["max_candidates"] == 100
        assert ready["compute_threads"] == 1  # a ranker: parallel requests, 1 thread each
        response = client.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = response.text
        assert ('star_http_requests_total{method="POST",path="/v1/recommend",status="200"} 1'
                in text)
        assert ('star_http_requests_total{method="POST",path="/v1/recommend",status="401"} 1'
                in text)
        assert 'star_http_request_duration_seconds_bucket{method="POST",path="/v1/recommend",le="+Inf"} 2' in text
        assert 'star_errors_total{code="unauthorized"} 1' in text
        assert "star_queue_depth 0" in text and "star_ready 1" in text
        assert 'star_info{kind="ranker",system="pop"} 1' in text
        client.get("/no/such/path/123")
        assert 'path="unmatched",status="404"' in client.get("/metrics").text

        schema = client.get("/openapi.json").json()
        operation = schema["paths"]["/v1/recommend"]["post"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
            "/RecommendRequest")
        assert {"200", "401", "413", "422", "503", "504"} <= set(operation["responses"])
        assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        assert {"/v1/health", "/v1/ready", "/metrics"} <= set(schema["paths"])
    lines = [r for r in caplog.records if r.name == "starrec.api.access"]
    logged = next(r for r in lines if getattr(r, "request_id", None) == "req-42")
    assert logged.status == 200 and logged.path == "/v1/recommend" and logged.ms > 0


def test_log_lines_are_json():
    formatter = JsonFormatter()
    record = logging.LogRecord("starrec.api.access", logging.INFO, __file__, 1, "POST %s %d",
                               ("/v1/recommend", 200), None)
    record.request_id, record.status = "abc", 200
    line = json.loads(formatter.format(record))
    assert line["message"] == "POST /v1/recommend 200" and line["level"] == "info"
    assert line["request_id"] == "abc" and line["status"] == 200 and "time" in line
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("starrec", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = json.loads(formatter.format(record))
    assert "ValueError: boom" in line["exception"] and "\n" not in formatter.format(record)


def test_compute_threads_default_by_kind_and_apply_process_wide(pop):
    from starrec.api.app import compute_threads_for
    from starrec.paths import available_cores

    assert compute_threads_for(ServerSettings(), pop) == 1
    assert compute_threads_for(ServerSettings(compute_threads=3), pop) == 3

    class OneAtATime:  # an LLM system answers one request at a time
        concurrent = False

    assert compute_threads_for(ServerSettings(), OneAtATime()) == available_cores()
    code = ("import torch, numpy; from threadpoolctl import threadpool_info; "
            "from starrec.api.app import limit_compute_threads; limit_compute_threads(1); "
            "assert torch.get_num_threads() == 1, torch.get_num_threads(); "
            "assert all(p['num_threads'] == 1 for p in threadpool_info()), threadpool_info()")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_metrics_of_several_processes_add_up(tmp_path):
    """`Metrics.share`: counters and histograms of every process are summed (an exited
    one's too), gauges only over live processes, `ready` as their minimum."""
    from starrec.api.metrics import Metrics, merge_snapshots

    own = Metrics()
    own.gauge("ready", "ready", lambda: 1, combine="min")
    own.gauge("processes", "processes", lambda: 1)
    own.observe_request("POST", "/v1/recommend", 200, 0.004)
    own.observe_batch(3)
    other = own.snapshot() | {"pid": own.snapshot()["pid"] + 10**7}  # no such process
    other["gauges"] = [["ready", "ready", 0.0, "min"], ["processes", "processes", 1.0, "sum"]]
    merged = merge_snapshots([own.snapshot(), other])
    assert {tuple(r[:3]): r[3] for r in merged["requests"]}[("POST", "/v1/recommend", "200")] == 2
    assert merged["batches"][1:] == [2, 6.0]
    # the dead process's gauges are left out: 1 live process, ready
    assert {g[0]: g[2] for g in merged["gauges"]} == {"ready": 1.0, "processes": 1.0}
    live = dict(other, pid=own.snapshot()["pid"])
    gauges = {g[0]: g[2] for g in merge_snapshots([own.snapshot(), live])["gauges"]}
    assert gauges == {"ready": 0.0, "processes": 2.0}

    shared = Metrics()
    shared.observe_request("GET", "/v1/health", 200, 0.001)
    (tmp_path / "123456789.json").write_text(json.dumps(other))
    shared.share(tmp_path)
    text = shared.render()
    assert 'star_http_requests_total{method="POST",path="/v1/recommend",status="200"} 1' in text
    assert 'star_http_requests_total{method="GET",path="/v1/health",status="200"} 1' in text
    assert (tmp_path / f"{shared.snapshot()['pid']}.json").exists()


def test_scrapes_racing_the_sharing_thread_never_fail(tmp_path):
    """A scrape and the sharing thread write the process's snapshot at the same moment;
    each writes through a file of its own, so neither fails and the thread keeps going."""
    from starrec.api.metrics import Metrics

    metrics = Metrics()
    metrics.observe_request("GET", "/v1/health", 200, 0.001)
    metrics.share(tmp_path, interval_s=0.0005)
    errors: list[BaseException] = []

    def scrape() -> None:
        for _ in range(150):
            try:
                metrics.render()
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

    run_together([scrape] * 3)
    assert not errors
    own = tmp_path / f"{metrics.snapshot()['pid']}.json"
    # the thread keeps writing, so any listing may catch a write in flight (on a busy
    # machine nearly every one does); such a temporary file is renamed a moment later,
    # while one left behind by a failed race would stay: follow those of one listing
    names = {p.name for p in tmp_path.iterdir()}
    assert own.name in names
    in_flight = names - {own.name}
    deadline = time.monotonic() + 2.0
    while in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
        in_flight &= {p.name for p in tmp_path.iterdir()}
    assert not in_flight, f"temporary files left behind: {sorted(in_flight)}"
    own.unlink()  # the sharing thread, still running, writes it again
    for _ in range(200):
        if own.exists():
            break
        time.sleep(0.01)
    assert own.exists(), "the sharing thread stopped"
