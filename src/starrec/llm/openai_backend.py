"""Any OpenAI-compatible server (vLLM, SGLang, llama.cpp server, a hosted API).

One `openai` client per backend; it is thread-safe, so many requests can be in flight at
once (see `map_concurrent`). Transient failures (timeouts, 5xx, 429, dropped
connections) are retried with exponential backoff, then raised as `LLMError`; anything
else the server rejects (4xx) is raised at once, since sending it again cannot help.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import openai

from starrec.llm.base import (ChoiceConstraint, Completion, Constraint, JSONSchemaConstraint,
                              LLMError, Message, PermutationConstraint)
from starrec.llm.constraints import gbnf_grammar, permutation_regex

GUIDED_MODES = ("none", "vllm", "vllm-legacy", "llamacpp")
_RETRYABLE = (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError)


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
    """`ChatModel` over an OpenAI-compatible HTTP API."""

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY",
                 timeout_s: float = 120.0, max_retries: int = 3, concurrency: int = 8,
                 guided: str = "none", backoff_s: float = 0.5, tokenizer: Any = None) -> None:
        if guided not in GUIDED_MODES:
            raise ValueError(f"guided must be one of {GUIDED_MODES}, got {guided!r}")
        self.name = model
        self.base_url = base_url
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.guided = guided
        self.backoff_s = backoff_s
        # Local servers ignore the key, but the client insists on having one.
        api_key = os.environ.get(api_key_env) or "not-needed"
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s,
                                    max_retries=0)
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
        def send():
            return self.client.chat.completions.create(
                model=self.name, messages=list(messages), **self._params(
                    max_tokens, temperature, stop, constraint, seed))

        return self._complete(send, lambda choice: choice.message.content, stop, constraint)

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0,
                 stop: list[str] | None = None, constraint: Constraint | None = None,
                 seed: int | None = None) -> Completion:
        def send():
            return self.client.completions.create(
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

    def _complete(self, send: Callable[[], Any], text_of: Callable[[Any], str | None],
                  stop: list[str] | None, constraint: Constraint | None) -> Completion:
        start = time.perf_counter()
        response, attempts = self._with_retries(send)
        if not response.choices:
            raise LLMError(f"{self.name}: the server returned no choices")
        choice = response.choices[0]
        text, stopped = cut_at_stop(text_of(choice) or "", stop)
        usage = response.usage
        extra: dict[str, Any] = {"attempts": attempts}
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

    def _with_retries(self, send: Callable[[], Any]) -> tuple[Any, int]:
        last: Exception | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                return send(), attempt + 1
            except _RETRYABLE as exc:
                last = exc
            except openai.APIStatusError as exc:
                raise LLMError(f"{self.name} at {self.base_url} rejected the request "
                               f"(HTTP {exc.status_code}): {exc.message}") from exc
        raise LLMError(f"{self.name} at {self.base_url}: no answer after {self.max_retries + 1} "
                       f"attempts ({type(last).__name__}: {last})") from last
