"""Any OpenAI-compatible server (vLLM, SGLang, llama.cpp server, a hosted API).

One `openai` client per endpoint; clients are thread-safe, so many requests can be in
flight at once (`star eval/teach --concurrency N`). Several endpoints serving one model
share the requests (`starrec.llm.endpoints`: a thread keeps to one server, a failing one
is taken out and tried again later).

Retries are ours, not the client's (its `max_retries` is 0): the client would retry the
same endpoint, where a dead server should be left for another at once. They follow the
client's own rules: timeouts, connection errors, 408, 409, 429 and 5xx are retried with
exponential backoff and jitter, a server's Retry-After is honoured, and the connect
timeout is the client's default. Anything else the server rejects (4xx) raises
`LLMError` at once, since sending it again cannot help. A request no endpoint answered
raises `ServerUnavailable`, which ends a run instead of turning every remaining task into
a fallback; one that a server answering others keeps failing with 5xx raises `LLMError`.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import openai

from starrec.llm.base import (ChoiceConstraint, Completion, Constraint, JSONSchemaConstraint,
                              LLMError, Message, PermutationConstraint, ServerUnavailable)
from starrec.llm.constraints import gbnf_grammar, permutation_regex
from starrec.llm.endpoints import Endpoint, EndpointPool, Failure

GUIDED_MODES = ("none", "vllm", "vllm-legacy", "llamacpp")
CONNECT_TIMEOUT_S = 5.0  # the openai client's default
MAX_BACKOFF_S = 8.0  # the openai client's cap on its own backoff
MAX_RETRY_AFTER_S = 60.0  # a server asking for a longer wait is not waited for


def failure_kind(error: openai.APIError) -> Failure | None:
    """How a request failed, for retries and endpoint health; None: the server answered
    and refused it (a 4xx other than 408, 409 and 429), which no retry changes."""
    if isinstance(error, openai.APITimeoutError):
        return "timeout"
    if isinstance(error, openai.APIConnectionError):
        return "connection"
    if isinstance(error, openai.APIStatusError):
        if error.status_code >= 500:
            return "server"
        if error.status_code in (408, 409, 429):
            return "busy"
    return None


def retry_delay(backoff_s: float, attempt: int, error: Exception | None = None) -> float:
    """Seconds to wait before retry `attempt` (1, 2, ...): what the server's Retry-After
    (or retry-after-ms) header asks for, else `backoff_s` doubled per attempt, capped,
    less up to a quarter at random so that many threads do not retry in step."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None) or {}
    for header, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        try:
            asked = float(headers.get(header)) * scale
        except (TypeError, ValueError):
            continue
        if 0 < asked <= MAX_RETRY_AFTER_S:
            return asked
    return min(backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S) * (1 - 0.25 * random.random())


def cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    """Text before the first stop string (servers differ on whether they echo it)."""
    cut = min((i for i in (text.find(s) for s in stop or [] if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def guided_fields(constraint: Constraint, mode: str) -> dict[str, Any]:
    """Request fields that make the server decode under `constraint`. A permutation only
    gets its shape enforced (count and range of numbers, not distinctness)."""
    if mode in ("vllm", "vllm-legacy"):
        if isinstance(constraint, ChoiceConstraint):
            key, value = "choice", list(constraint.options)
        elif isinstance(constraint, PermutationConstraint):
            key, value = "regex", permutation_regex(constraint)
        else:
            key, value = "json", constraint.schema
        return {"structured_outputs": {key: value}} if mode == "vllm" else {f"guided_{key}": value}
    if mode == "llamacpp":
        if isinstance(constraint, JSONSchemaConstraint):
            return {"json_schema": constraint.schema}
        return {"grammar": gbnf_grammar(constraint)}
    return {}


class OpenAIChatModel:
    """`ChatModel` over one or several OpenAI-compatible endpoints serving one model."""

    # requests wait on the network, so threads can keep several in flight
    serves_concurrently = True

    def __init__(self, base_url: str | Sequence[str], model: str, *,
                 api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 120.0,
                 max_retries: int = 3, concurrency: int = 1, guided: str = "none",
                 backoff_s: float = 0.5, cooldown_s: float = 10.0,
                 tokenizer: Any = None) -> None:
        if guided not in GUIDED_MODES:
            raise ValueError(f"guided must be one of {GUIDED_MODES}, got {guided!r}")
        urls = [u.strip() for u in base_url.split(",")] if isinstance(base_url, str) else list(base_url)
        self.name = model
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.guided = guided
        self.backoff_s = backoff_s
        # Local servers ignore the key, but the client insists on having one.
        api_key = os.environ.get(api_key_env) or "not-needed"
        timeout = openai.Timeout(timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S))
        self.pool = EndpointPool(urls, lambda url: openai.OpenAI(
            base_url=url, api_key=api_key, timeout=timeout, max_retries=0), cooldown_s)
        self.base_url = ", ".join(e.url for e in self.pool.endpoints)
        self._tokenizer = tokenizer
        self._tokenizer_lock = threading.Lock()

    def supports(self, constraint: Constraint) -> bool:
        return self.guided != "none"

    def render_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """The server applies its own template; we reproduce it with the served model's
        tokenizer when it is available locally (a folder, or a cached hub id)."""
        with self._tokenizer_lock:
            if self._tokenizer is None or isinstance(self._tokenizer, str):
                from transformers import AutoTokenizer

                source = self._tokenizer or self.name
                try:
                    self._tokenizer = AutoTokenizer.from_pretrained(source)
                except (OSError, ValueError) as exc:
                    raise LLMError(
                        f"render_chat needs the tokenizer of {self.name!r}, which the server "
                        f"applies remotely; none found locally under {source!r} ({exc}). Pass "
                        "tokenizer= (a folder or cached hub id) to OpenAIChatModel.") from exc
        return self._tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                   add_generation_prompt=add_generation_prompt)

    def chat(self, messages: list[Message], *, max_tokens: int = 256, temperature: float = 0.0,
             stop: list[str] | None = None, constraint: Constraint | None = None,
             seed: int | None = None) -> Completion:
        def send(client: openai.OpenAI) -> Any:
            return client.chat.completions.create(
                model=self.name, messages=list(messages), **self._params(
                    max_tokens, temperature, stop, constraint, seed))

        return self._complete(send, lambda choice: choice.message.content, stop, constraint)

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0,
                 stop: list[str] | None = None, constraint: Constraint | None = None,
                 seed: int | None = None) -> Completion:
        def send(client: openai.OpenAI) -> Any:
            return client.completions.create(
                model=self.name, prompt=prompt, **self._params(
                    max_tokens, temperature, stop, constraint, seed))

        return self._complete(send, lambda choice: choice.text, stop, constraint)

    def _params(self, max_tokens: int, temperature: float, stop: list[str] | None,
                constraint: Constraint | None, seed: int | None) -> dict[str, Any]:
        params: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature}
        if stop:
            params["stop"] = list(stop)
        if seed is not None:
            params["seed"] = seed
        if constraint is not None and self.supports(constraint):
            params["extra_body"] = guided_fields(constraint, self.guided)
        return params

    def _complete(self, send: Callable[[openai.OpenAI], Any], text_of: Callable[[Any], str | None],
                  stop: list[str] | None, constraint: Constraint | None) -> Completion:
        start = time.perf_counter()
        response, attempts, endpoint = self._with_retries(send)
        if not response.choices:
            raise LLMError(f"{self.name}: the server returned no choices")
        choice = response.choices[0]
        text, stopped = cut_at_stop(text_of(choice) or "", stop)
        usage = response.usage
        extra: dict[str, Any] = {"attempts": attempts, "endpoint": endpoint}
        if usage is None:
            extra["usage_missing"] = True
        return Completion(
            text=text,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
            seconds=time.perf_counter() - start,
            finish_reason="stop" if stopped else ("length" if choice.finish_reason == "length" else "stop"),
            constrained=constraint is not None and self.supports(constraint),
            extra=extra)

    def _with_retries(self, send: Callable[[openai.OpenAI], Any]) -> tuple[Any, int, str]:
        """(response, attempts, endpoint URL). A failed attempt moves on to another
        endpoint that is up at once; with none, or when the server asked to slow down,
        it waits `retry_delay` first."""
        attempt = 0
        while True:
            endpoint = self.pool.acquire()
            try:
                response = send(endpoint.client)
            except openai.APIError as error:
                failure = failure_kind(error)
                self.pool.release(endpoint, failure)
                if failure is None:
                    status = getattr(error, "status_code", None)
                    raise LLMError(f"{self.name} at {endpoint.url} rejected the request"
                                   f"{f' (HTTP {status})' if status else ''}: {error.message}") from error
                attempt += 1
                if attempt > self.max_retries:
                    raise self._give_up(endpoint, failure, error, attempt) from error
                if failure == "busy" or not self.pool.any_up(exclude=endpoint):
                    time.sleep(retry_delay(self.backoff_s, attempt, error))
                continue
            except BaseException:
                self.pool.release(endpoint, None, abandoned=True)  # Ctrl-C, a bug: not the server
                raise
            self.pool.release(endpoint, None)
            return response, attempt + 1, endpoint.url

    def _give_up(self, endpoint: Endpoint, failure: Failure, error: Exception,
                 attempts: int) -> Exception:
        """What to raise after the last attempt: `LLMError` for a request a server that
        answers others keeps failing with 5xx (this task falls back, the run goes on),
        `ServerUnavailable` otherwise (the run stops, resumable)."""
        cause = f"{type(error).__name__}: {error}"
        if failure == "server" and self.pool.any_up():
            return LLMError(f"{self.name} at {endpoint.url}: no answer after {attempts} "
                            f"attempts ({cause})")
        return ServerUnavailable(
            f"{self.name}: no answer after {attempts} attempts from {self.base_url} (last "
            f"{endpoint.url}, {cause}); the run resumes where it stopped once a server "
            "answers (or raise timeout_s / max_retries of mars.llm or student.llm)")
