"""A scripted `ChatModel` for tests: answers come from a script, not from a model.

The script is a list consumed in call order, or a dict from MARS role to answers (the
role is recognised from the brief that opens its first user message,
`starrec.agents.prompts.role_prompt`).
An answer is a string, an exception instance (raised, e.g. `LLMError("timeout")`), or a
callable `(messages) -> str`. A dict value that is not a list answers every call of
that role. Every call is kept in `calls` for assertions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

from starrec.agents.prompts import role_prompt, roles
from starrec.labels import candidate_labels, label_list
from starrec.llm.base import Completion, Constraint, Message

Answer = Union[str, BaseException, Callable[[list[Message]], str]]


def role_of(messages: Sequence[Message]) -> str | None:
    if len(messages) < 2 or messages[0]["role"] != "system":
        return None
    opening = messages[1]["content"]
    return next((r for r in roles() if opening.startswith(role_prompt(r).brief + "\n")), None)


@dataclass
class Call:
    role: str | None
    messages: list[Message]
    kwargs: dict[str, Any]
    text: str


def permutation(n: int = 20, first: Sequence[int] = ()) -> str:
    """`<recommend>[...]</recommend>` in letter labels with the candidates at 0-based
    `first` at the top, then the rest in order."""
    return f"<recommend>{ranking(n, first)}</recommend>"


def ranking(n: int = 20, first: Sequence[int] = ()) -> str:
    """`[F, A, B, ...]`: a list of letter labels with 0-based `first` at the top."""
    order = list(first) + [i for i in range(n) if i not in first]
    return label_list(order, candidate_labels(n))


class ScriptedModel:
    def __init__(self, script: list[Answer] | dict[str, Answer | list[Answer]],
                 supports: Sequence[type] = (), name: str = "scripted",
                 honour_max_tokens: bool = False) -> None:
        self.name = name
        # cut an answer at max_tokens (4 characters a token) with finish_reason "length"
        self.honour_max_tokens = honour_max_tokens
        self._supports = tuple(supports)
        self._lock = threading.Lock()
        if isinstance(script, dict):
            self._by_role = {r: list(a) if isinstance(a, list) else a for r, a in script.items()}
            self._queue = None
        else:
            self._by_role, self._queue = None, list(script)
        self.calls: list[Call] = []

    def supports(self, constraint: Constraint) -> bool:
        return isinstance(constraint, self._supports)

    def _next(self, role: str | None) -> Answer:
        with self._lock:
            if self._queue is not None:
                source: Any = self._queue
                where = "the script"
            else:
                if role not in self._by_role:
                    raise AssertionError(f"no scripted answer for role {role!r}")
                source, where = self._by_role[role], f"the script of {role}"
            if not isinstance(source, list):
                return source
            if not source:
                raise AssertionError(f"{where} is exhausted")
            return source.pop(0)

    def chat(self, messages: list[Message], *, max_tokens: int = 256, temperature: float = 0.0,
             stop: list[str] | None = None, constraint: Constraint | None = None,
             seed: int | None = None) -> Completion:
        role = role_of(messages)
        answer = self._next(role)
        kwargs = {"max_tokens": max_tokens, "temperature": temperature, "stop": stop,
                  "constraint": constraint, "seed": seed}
        if isinstance(answer, BaseException):
            self.calls.append(Call(role, list(messages), kwargs, ""))
            raise answer
        text = answer(messages) if callable(answer) else answer
        for s in stop or []:  # like an OpenAI server: the stop string is not returned
            text = text.split(s)[0]
        finish = "stop"
        if self.honour_max_tokens and len(text) // 4 + 1 > max_tokens:
            text, finish = text[:(max_tokens - 1) * 4], "length"
        self.calls.append(Call(role, list(messages), kwargs, text))
        prompt = sum(len(m["content"]) for m in messages) // 4 + 1
        return Completion(text, prompt, len(text) // 4 + 1, 0.001, finish_reason=finish,
                          constrained=constraint is not None and self.supports(constraint))

    def complete(self, prompt: str, **kwargs: Any) -> Completion:
        return self.chat([{"role": "user", "content": prompt}], **kwargs)

    def render_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")

    def roles_called(self) -> list[str | None]:
        return [c.role for c in self.calls]
