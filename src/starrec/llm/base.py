"""The one interface every LLM backend implements, and the records it returns.

Agents, the trajectory recorder and student inference only ever see `ChatModel`; which
engine runs underneath (an OpenAI-compatible server, in-process transformers, in-process
llama.cpp) is a config choice. Constraints describe the *shape* an output must have; a
backend that can enforce one while decoding does so, the others return free text that
the caller parses, validates and repairs (`starrec.llm.structured`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol, TypedDict, runtime_checkable

from starrec.labels import LabelStyle, candidate_labels


class Message(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class ChoiceConstraint:
    """The output must be exactly one of `options` (e.g. every well-formed tool call the
    task admits, enumerated over its item ids)."""

    options: tuple[str, ...]

    @property
    def max_tokens(self) -> int:
        """Enough tokens for the longest option: a token of a byte-level vocabulary covers
        at least one byte, so an enforced choice always ends within this."""
        return max((len(option.encode("utf-8")) for option in self.options), default=0)


@dataclass(frozen=True)
class PermutationConstraint:
    """The output must be `prefix[l1, l2, ..., ln]`: every candidate label exactly once,
    comma-separated, after `prefix` written as is. Labels are `style`'s
    (`starrec.labels`: A, B, ... or 1, 2, ...). A prefix such as `<recommend>` lets a
    small model continue the answer format its prompt showed, rather than start a bare
    list."""

    n: int
    prefix: str = ""
    style: LabelStyle = "letters"

    @property
    def labels(self) -> tuple[str, ...]:
        return candidate_labels(self.n, self.style)


@dataclass(frozen=True)
class JSONSchemaConstraint:
    """The output must be one JSON value valid against `schema`."""

    schema: dict


Constraint = ChoiceConstraint | PermutationConstraint | JSONSchemaConstraint


@dataclass
class Completion:
    """One generation. Token counts come from the backend's own tokenizer (or the
    server's usage report); the in-process backends do not count the end-of-sequence
    token. `seconds` is wall time including queueing and retries."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    finish_reason: str = "stop"  # stop | length
    constrained: bool = False  # the constraint was enforced while decoding
    extra: dict = field(default_factory=dict)


class LLMError(RuntimeError):
    """The backend could not answer (timeout, server error after retries, OOM).
    Callers record it in the trajectory and fall back; it never ends a whole run. Raised
    while a model is loaded or preflighted (`starrec.llm.models.check_chat_model`), it
    stops the run before its first task instead: a model that cannot answer at all would
    otherwise be scored as the fallback on every task."""


class ServerUnavailable(RuntimeError):
    """No server answered: every endpoint refused the connection, timed out, failed with
    5xx or stayed rate-limited through all retries. Not an `LLMError` on purpose: callers
    turn an `LLMError` into a recorded fallback for one task, but here the next task
    would fail the same way, and a run would record its remaining tasks as fallbacks in
    seconds. It ends the run instead; what finished is kept, and the same command resumes
    once a server answers again."""


class NoChatTemplateError(LLMError):
    """The model has no chat template, so no conversation can be rendered for it (base
    models, and GGUF files written without one). Says how to give it one."""

    def __init__(self, name: str) -> None:
        super().__init__(f"model {name!r} has no chat template; pass --chat-template FILE "
                         f"(a Jinja file) or a model folder with one (mars.llm.chat_template or "
                         f"student.llm.chat_template)")


@runtime_checkable
class ChatModel(Protocol):
    name: str

    def supports(self, constraint: Constraint) -> bool:
        """Whether `chat`/`complete` can enforce this constraint while decoding."""

    def chat(
        self,
        messages: list[Message],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        stop: list[str] | None = None,
        constraint: Constraint | None = None,
        seed: int | None = None,
    ) -> Completion:
        """Answer the conversation (chat template applied by the backend)."""

    def complete(
        self,
        prompt: str,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        stop: list[str] | None = None,
        constraint: Constraint | None = None,
        seed: int | None = None,
    ) -> Completion:
        """Continue raw text (no template): the student's single pass, which stops at
        `</tool_call>`, gets the tool response appended, and continues."""

    def render_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        """The exact text `chat` would feed the model for these messages."""
