"""Structured answers from free text: parse, validate, and repair by asking again.

A 135M model gets the format wrong often; none of that may crash a teacher run. Every
parser here either returns a value or raises `ParseError` with a message written for
the model (what was wrong, what the answer must look like), which `generate_structured`
feeds back as a user message for a bounded number of repair rounds. Every attempt is
returned, so the trajectory shows what the model said and what it was told. (A tool
call in an answer is parsed by `starrec.core.parse_tool_call`, the one parser the
teacher and the student share.)
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from string import Template
from typing import Any, Generic, TypeVar

from starrec.core.resources import prompt_text
from starrec.core.tool_calls import ParseError
from starrec.labels import example_list, read_labels
from starrec.llm.base import ChatModel, Constraint, LLMError, Message

T = TypeVar("T")

_RECOMMEND_TAG = re.compile(r"<recommend>(.*?)(?:</recommend>|$)", re.S)
_BRACKETS = re.compile(r"\[([^\[\]]*)\]")


class RankingError(ParseError):
    """A list of labels that is not a permutation, with exactly what is wrong (a label
    the list does not know makes the list unreadable: `ParseError`)."""

    def __init__(self, message: str, duplicates: list[str], missing: list[str]) -> None:
        super().__init__(message)
        self.duplicates = duplicates
        self.missing = missing


def _label_list(body: str, labels: Sequence[str]) -> list[str] | None:
    """The items of a comma list when every one is a label; None otherwise."""
    parts = [p.strip() for p in body.split(",")]
    if parts and parts[-1] == "":
        parts.pop()  # "[C, A, ]"
    known = set(labels)
    if not parts or not all(p in known for p in parts):
        return None
    return parts


def _written_list(region: str, labels: Sequence[str]) -> list[str] | None:
    """The most plausible list of labels in `region`: the longest `[x, y, ...]`; else
    the order of `[x] title` lines (candidates echoed back); else a cut-off `[x, y, ...`;
    else a bare `x, y, ...` (inside <recommend> tags)."""
    lists = [v for v in (_label_list(m.group(1), labels) for m in _BRACKETS.finditer(region))
             if v is not None]
    longest = max(lists, key=len, default=None)
    if longest is not None and len(longest) > 1:
        return longest
    singles = [v[0] for v in lists if len(v) == 1]
    if len(singles) > 1:
        return singles
    opened = region.rfind("[")
    if opened >= 0 and "]" not in region[opened:]:
        cut = _label_list(re.sub(r",?\s*$", "", region[opened + 1:]), labels)
        if cut is not None:
            return cut
    return longest or _label_list(region.strip(), labels)


def ranking_prefix(text: str, labels: Sequence[str]) -> list[int]:
    """What can be kept of an answer that is not a permutation: the distinct labels of
    its most plausible list, first mention wins, as 0-based indices (DESIGN.md 3.4: a
    partial ranking is kept and completed, not replaced)."""
    tag = _RECOMMEND_TAG.search(text)
    region = tag.group(1) if tag else text
    bodies = [m.group(1) for m in _BRACKETS.finditer(region)]
    opened = region.rfind("[")
    if opened >= 0 and "]" not in region[opened:]:
        bodies.append(region[opened + 1:])  # cut off by the token budget
    best: list[int] = []
    if not bodies and tag:
        bodies = [region]  # a bare list inside the tags; free text elsewhere is not read,
        # where a capital such as "I" or "A" would be taken for a label
    for body in bodies:
        kept = list(dict.fromkeys(i for i in read_labels(body, labels)[0] if i >= 0))
        best = kept if len(kept) > len(best) else best
    return best


def parse_ranking(text: str, labels: Sequence[str]) -> list[int]:
    """A permutation of the candidates, as 0-based indices, from `[x, y, ...]` or
    `<recommend>[x, y, ...]</recommend>` written in `labels`; a `RankingError` names the
    duplicated and missing labels."""
    example = f"<recommend>{example_list(labels)}</recommend>"
    tag = _RECOMMEND_TAG.search(text)
    written = _written_list(tag.group(1) if tag else text, labels)
    if written is None:
        raise ParseError(f"no list of candidate labels found. Answer {example} listing every "
                         f"label from {labels[0]} to {labels[-1]} exactly once, best first.")
    counts = Counter(written)
    duplicates = [x for x in labels if counts[x] > 1]
    missing = [x for x in labels if counts[x] == 0]
    if duplicates or missing:
        problems = [f"{what} {', '.join(values)}" for what, values in
                    (("duplicated:", duplicates), ("missing:", missing)) if values]
        raise RankingError(
            f"the ranking must list each label from {labels[0]} to {labels[-1]} exactly once; "
            f"{'; '.join(problems)}. Answer {example}.", duplicates, missing)
    position = {label: i for i, label in enumerate(labels)}
    return [position[label] for label in written]


@dataclass
class Attempt:
    """One generation: the prompt as sent, the raw output, and what went wrong with it."""

    messages: list[Message]
    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    error: str | None = None
    constrained: bool = False
    backend_error: bool = False  # the backend raised `LLMError`; `text` is empty


@dataclass
class Structured(Generic[T]):
    """The parsed value (None when every attempt failed) and every attempt."""

    value: T | None
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The output the value was parsed from (or the last output)."""
        return self.attempts[-1].text if self.attempts else ""

    @property
    def error(self) -> str | None:
        return self.attempts[-1].error if self.attempts and self.value is None else None

    @property
    def backend_failed(self) -> bool:
        return bool(self.attempts) and self.attempts[-1].backend_error


@lru_cache(maxsize=1)
def _repair_template() -> Template:
    return Template(prompt_text("repair.md").strip())


def repair_message(error: str) -> str:
    return _repair_template().substitute(error=error)


def generate_structured(
    model: ChatModel,
    messages: list[Message],
    parse: Callable[[str], T],
    constraint: Constraint | None = None,
    max_repairs: int = 2,
    **gen: Any,
) -> Structured[T]:
    """Ask, parse, and on a `ParseError` show the model its answer and the error and ask
    again, up to `max_repairs` times, or until it repeats a rejected answer word for word
    (small models at temperature 0 do). The constraint is passed only when the model can
    enforce it. A backend `LLMError` ends the attempts (the backend already retried)."""
    use = constraint if constraint is not None and model.supports(constraint) else None
    conversation = list(messages)
    result: Structured[T] = Structured(None)
    for _ in range(max_repairs + 1):
        start = time.perf_counter()
        try:
            completion = model.chat(conversation, constraint=use, **gen)
        except LLMError as error:
            result.attempts.append(Attempt(list(conversation), "", 0, 0, time.perf_counter() - start,
                                           f"backend error: {error}", backend_error=True))
            return result
        attempt = Attempt(list(conversation), completion.text, completion.prompt_tokens,
                          completion.completion_tokens, completion.seconds,
                          constrained=completion.constrained)
        result.attempts.append(attempt)
        try:
            result.value = parse(completion.text)
            return result
        except ParseError as error:
            attempt.error = str(error)
        if any(a.text == completion.text for a in result.attempts[:-1]):
            break  # it repeats an answer already rejected: more rounds would too
        conversation = [*conversation, {"role": "assistant", "content": completion.text},
                        {"role": "user", "content": repair_message(attempt.error)}]
    return result
