"""`star recommend` (one question in the terminal) and `star serve` (a real process on a
loopback port, stopped with SIGTERM) on a folder of tiny tables."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from starrec.api.schemas import RecommendResponse
from starrec.cli.main import app
from tests.conftest import write_dataset_folder
from tests.fakes import ScriptedModel, permutation

runner = CliRunner()
NO_CONTENT = ["--set", "cst.content=false"]  # no MiniLM in tests


@pytest.fixture
def shop(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("STAR_HOME", str(tmp_path / "home"))
    folder = tmp_path / "shop"
    write_dataset_folder(folder)
    return folder


def star(*args: str):
    return runner.invoke(app, list(args))


def one_error(result, *fragments: str) -> str:
    """Bad input: exit code 2 and one `error:` line saying what is wrong, no traceback."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_recommend_prints_the_ranking_with_titles(shop):
    result = star("recommend", "--system", "pop", "--user", "u1", "--dataset", str(shop),
                  "--n-candidates", "5")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    header = next(line for line in lines if line.startswith("pop (score) for user u1"))
    assert "5 candidates proposed by pop from the catalogue" in header
    ranked = [line for line in lines if re.match(r"\s+\d+\. \[", line)]
    assert len(ranked) == 5 and ranked[0].lstrip().startswith("1. [")
    assert re.search(r"\] Item \d+  score \d", ranked[0])
    assert not any(line.startswith("Evidence") for line in lines)

    result = star("recommend", "--system", "cst", "--user", "u1", "--dataset", str(shop),
                  "--candidates", "i1,i2,i3", "--explain", *NO_CONTENT)
    assert result.exit_code == 0, result.output
    evidence = result.output.split("\nEvidence\n", 1)[1]
    assert evidence.lstrip().startswith("[1] Item 1 (id i1):") and "[3] Item 3 (id i3)" in evidence

    result = star("recommend", "--system", "pop", "--history", "i1,i2", "--candidates",
                  "i3,i4", "--dataset", str(shop), "--json")
    assert result.exit_code == 0, result.output
    answer = RecommendResponse.model_validate(json.loads(result.output))
    assert answer.history_source == "request" and answer.user_id is None
    assert sorted(i.item_id for i in answer.ranking) == ["i3", "i4"]


def test_recommend_explains_a_students_reasoning(shop, tmp_path, monkeypatch):
    from starrec.llm import models

    def answer(messages) -> str:
        written = messages[-1]["content"].rsplit("<|im_start|>assistant\n", 1)[-1]
        if "<tool_response>" not in written:
            return ('<plan>compare the candidates</plan>\n'
                    '<tool_call>{"name": "popularity", "arguments": {"item_ids": ["i3"]}}</tool_call>')
        return "\n<reflection>C is the most popular</reflection>\n" + permutation(3, [2])

    monkeypatch.setattr(models, "load_chat_model",
                        lambda spec, cfg: ScriptedModel({None: answer}))
    student = tmp_path / "student"
    student.mkdir()  # a folder without a card: prompted in the full format
    result = star("recommend", "--system", "star", "--model", str(student), "--user", "u2",
                  "--candidates", "i1,i2,i3", "--explain", "--dataset", str(shop), *NO_CONTENT)
    assert result.exit_code == 0, result.output
    out = result.output
    assert re.search(r"\n\s+1\. \[i3\] Item 3\n", out)
    reasoning = out.split("\nReasoning\n", 1)[1]
    assert "plan:\n    compare the candidates" in reasoning
    assert "reflection:\n    C is the most popular" in reasoning
    calls = out.split("\nTool calls\n", 1)[1]
    assert calls.startswith('  1. popularity {"item_ids": ["i3"]}')
    assert "Item 3: consumed by" in calls
    assert "2 LLM calls" in out


@pytest.mark.parametrize("args, fragments", [
    (["--system", "svd", "--user", "u1"], ["unknown system 'svd'"]),
    (["--system", "pop", "--user", "nobody"], ["unknown user id 'nobody'"]),
    (["--system", "pop", "--user", "u1", "--candidates", "i1,zz9"], ["unknown item ids: 'zz9'"]),
    (["--system", "pop"], ["give a user_id, a history, or both"]),
    (["--system", "pop", "--user", "u1", "--candidates", "i1"], ["1 candidates"]),
    (["--system", "star", "--user", "u1"], ["--system star needs --model"]),
    (["--system", "pop", "--user", "u1", "--mode", "beam"], ["no mode 'beam'"]),
])
def test_recommend_bad_input_is_one_error_line(shop, args, fragments):
    one_error(star("recommend", *args, "--dataset", str(shop)), *fragments)


def test_serve_bad_input_is_one_error_line(shop, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# none yet\n")
    one_error(star("serve", "--system", "pop", "--dataset", str(shop), "--api-keys", str(keys)),
              "holds no key")
    one_error(star("serve", "--system", "pop", "--dataset", str(shop), "--api-keys",
                   str(tmp_path / "missing.txt")), "missing.txt")
    one_error(star("serve", "--system", "svd", "--dataset", str(shop), "--port", "0"),
              "unknown system 'svd'")
    one_error(star("serve", "--system", "pop", "--dataset", str(shop), "--port", "0",
                   "--max-queue", "0"), "--max-queue")
    one_error(star("serve", "--system", "pop", "--dataset", str(shop), "--port", "0",
                   "--log-level", "loud"), "--log-level")
    one_error(star("serve", "--system", "pop", "--dataset", str(shop), "--port", "0",
                   "--max-batch-size", "0"), "--max-batch-size")
    one_error(star("serve", "--system", "pop", "--dataset", str(shop), "--port", "0",
                   "--max-wait-ms", "-1"), "--max-wait-ms")
    one_error(star("serve", "--system", "pop", "--dataset", str(shop), "--port", "0",
                   "--compute-threads", "0"), "--compute-threads")
    one_error(star("serve", "--system", "pop", "--dataset", str(shop), "--port", "0",
                   "--processes", "0"), "--processes")
    one_error(star("serve", "--system", "mars", "--dataset", str(shop), "--port", "0",
                   "--processes", "2"), "only rankers")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        one_error(star("serve", "--system", "pop", "--dataset", str(shop), "--port", port),
                  f"127.0.0.1:{port}")


def _lines(stream, into: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        into.put(line)
    into.put(None)


@dataclass
class Served:
    """A `star serve` process started by a test: its base URL and its stderr lines."""

    process: subprocess.Popen
    base: str
    lines: queue.Queue
    seen: list[str]


@contextlib.contextmanager
def served(*args: str, env: dict[str, str] | None = None,
           start_s: float = 60) -> Iterator[Served]:
    """`star serve ARGS --port 0` as a real process, once its start line names the URL;
    killed on the way out if the test left it running."""
    command = [str(Path(sys.executable).parent / "star"), "serve", *args, "--port", "0"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(process.stderr, lines), daemon=True).start()
    seen: list[str] = []
    try:
        while True:
            line = lines.get(timeout=start_s)
            assert line is not None, "".join(seen)
            seen.append(line)
            match = re.search(r"serving \S+ on (http://127\.0\.0\.1:\d+)", line)
            if match:
                break
        yield Served(process, match.group(1), lines, seen)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def test_serve_runs_as_a_process_and_stops_on_sigterm(shop, tmp_path):
    env = {**os.environ, "STAR_API_KEYS": "key-1"}
    with served("--system", "pop", "--dataset", str(shop), env=env) as server:
        process, base, lines, seen = server.process, server.base, server.lines, server.seen
        with httpx.Client(base_url=base, timeout=10) as client:
            for _ in range(500):
                try:
                    if client.get("/v1/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                threading.Event().wait(0.02)
            request = {"user_id": "u1", "candidates": ["i1", "i2", "i3"]}
            assert client.post("/v1/recommend", json=request).status_code == 401
            response = client.post("/v1/recommend", json=request,
                                   headers={"Authorization": "Bearer key-1"})
            assert response.status_code == 200 and response.json()["system"] == "pop"
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    assert process.returncode in (0, -signal.SIGTERM)
    while (line := lines.get(timeout=10)) is not None:
        seen.append(line)
    # after the start line, the log is JSON lines: the request, then the shutdown
    logged = [json.loads(line) for line in seen if line.startswith("{")]
    assert logged and all(set(entry) >= {"time", "level", "logger", "message"} for entry in logged)
    requests = [e for e in logged if e.get("event") == "request" and e["path"] == "/v1/recommend"]
    assert [e["status"] for e in requests] == [401, 200]
    assert any(e["message"] == "Shutting down" for e in logged)
    assert not any("Traceback" in line and not line.startswith("{") for line in seen)


def test_recommend_without_a_live_llm_server_is_one_error_line(shop):
    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = runner.invoke(app, ["recommend", "--system", "mars", "--dataset", str(shop),
                                 "--model", f"http://127.0.0.1:{port}/v1", "--user", "u1",
                                 "--set", "mars.llm.timeout_s=2", "--set", "mars.llm.max_retries=0",
                                 "--set", "mars.llm.backoff_s=0.1", *NO_CONTENT])
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1].startswith("error:")
    assert "Traceback" not in result.output


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def _children(pid: int) -> list[int]:
    """The live child processes of `pid` (Linux /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                out.append(int(entry.name))
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_serve_with_several_processes_answers_as_one_service(shop):
    """`--processes 2`: two forked workers on one port; /metrics from either counts the
    requests of both; a worker killed is replaced; SIGTERM stops them all."""
    with served("--system", "cst", "--dataset", str(shop), "--processes", "2", *NO_CONTENT,
                start_s=120) as server:
        process, base = server.process, server.base
        assert "2 processes" in server.seen[-1]

        def service_metrics() -> str:
            with httpx.Client(base_url=base, timeout=10) as client:
                return client.get("/metrics").text

        def wait_for(condition, what: str) -> None:
            for _ in range(300):
                try:
                    if condition():
                        return
                except httpx.TransportError:
                    pass
                threading.Event().wait(0.05)
            raise AssertionError(f"{what}: {service_metrics()}")

        wait_for(lambda: _metric(service_metrics(), "star_processes") == 2
                 and _metric(service_metrics(), "star_ready") == 1, "two ready workers")
        workers = _children(process.pid)
        assert len(workers) == 2
        sent = 40
        for n in range(sent):  # a connection each: the kernel spreads them over the workers
            with httpx.Client(base_url=base, timeout=10) as client:
                answer = client.post("/v1/recommend",
                                     json={"user_id": f"u{n % 12}", "candidates": ["i1", "i2", "i3"]})
                assert answer.status_code == 200 and answer.json()["system"] == "cst"

        def answered() -> float:
            text = service_metrics()
            return sum(float(v) for v in re.findall(
                r'^star_http_requests_total\{method="POST",path="/v1/recommend",status="200"\} (\S+)$',
                text, re.M))

        # every scrape, whichever worker answers it, counts both workers' requests (the
        # other's as of its last snapshot, at most a second old)
        wait_for(lambda: answered() == sent, "all requests counted")
        os.kill(workers[0], signal.SIGKILL)
        wait_for(lambda: workers[0] not in _children(process.pid)
                 and len(_children(process.pid)) == 2
                 and _metric(service_metrics(), "star_processes") == 2, "a replaced worker")
        assert answered() == sent, "a dead worker's requests still count"
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    assert process.returncode == 0
    assert not _children(process.pid)
