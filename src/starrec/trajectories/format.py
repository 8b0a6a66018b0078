"""The student's language (DESIGN.md 3.5), rendered and parsed in one place.

One sequence, parts in this order::

    <plan>...</plan>
    <tool_call>{"name": ..., "arguments": {...}}</tool_call><tool_response>...</tool_response>
    ...                                      (zero or more calls, each answered at once)
    <reflection>...</reflection>
    <recommend>[l1, l2, ..., ln]</recommend>   (candidate labels, starrec.labels)

Parts are separated by one newline; a tool response follows its call with no separator,
because at inference the student stops at `</tool_call>` and the runtime appends the
response right there. Ablated students (no plan, no tools, no reflection) speak the same
language with parts left out, so the parser takes the set of required parts.

`parse_student_output` is strict on form (the GRPO format reward uses `well_formed`) and
lenient on content (it still returns whatever ranking indices it could read, so a
malformed answer is completed and scored, DESIGN.md 3.4). A tool call is the teacher's
record, rendered and parsed (strictly) by `starrec.core.tool_calls`, so the student writes
a call exactly as its teacher's trajectory shows it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from starrec.core.tool_calls import (
    TOOL_CALL,
    TOOL_RESPONSE,
    ToolCall,
    parse_tool_call,
)
from starrec.labels import candidate_labels, example_list, label_list, read_labels

Labels = int | Sequence[str]


def as_labels(labels: Labels) -> tuple[str, ...]:
    """Labels as given, or the default letters of that many candidates."""
    return candidate_labels(labels) if isinstance(labels, int) else tuple(labels)

PLAN, REFLECTION, RECOMMEND = "plan", "reflection", "recommend"
TAGS = (PLAN, TOOL_CALL, TOOL_RESPONSE, REFLECTION, RECOMMEND)
SEPARATOR = "\n"
# Where a generation must pause: a tool call is answered by the runtime, a ranking ends it.
STOP_STRINGS = (f"</{TOOL_CALL}>", f"</{RECOMMEND}>")

_OPEN = re.compile(r"<(%s)>" % "|".join(TAGS))
_LIST = re.compile(r"\[\s*(?:[^,\[\]\s]+\s*(?:,\s*[^,\[\]\s]+\s*)*)?\]")


def open_tag(name: str) -> str:
    return f"<{name}>"


def close_tag(name: str) -> str:
    return f"</{name}>"


def wrap(name: str, content: str) -> str:
    return f"{open_tag(name)}{content}{close_tag(name)}"


def closed(text: str, name: str) -> str:
    """`text`, which ends inside a `name` part, with that part closed; unchanged where a
    backend that keeps its stop string already wrote the closing tag."""
    return text if text.endswith(close_tag(name)) else text + close_tag(name)


@dataclass
class StudentSequence:
    """The parts of one sequence; None (or no calls) for a part that is absent."""

    plan: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    reflection: str | None = None
    ranking: list[int] | None = None


@dataclass
class ParsedOutput(StudentSequence):
    """A parsed generation. `ranking` holds the indices as written (possibly with
    duplicates or out-of-range values, or a prefix when the list was cut off);
    `well_formed` is True only when every required part is there once, in order, with
    nothing but whitespace between parts, every call is valid JSON answered by one
    response, and the ranking is a permutation of the labels. `errors` says what was wrong."""

    well_formed: bool = False
    errors: list[str] = field(default_factory=list)


def render_ranking(indices: Iterable[int], labels: Labels) -> str:
    """`<recommend>[C, A, ...]</recommend>` for 0-based `indices`."""
    return wrap(RECOMMEND, label_list(indices, as_labels(labels)))


def render_sequence(sequence: StudentSequence, labels: Labels) -> str:
    """The text of a sequence; parts that are None are left out."""
    parts: list[str] = []
    if sequence.plan is not None:
        parts.append(wrap(PLAN, sequence.plan))
    for call in sequence.tool_calls:
        text = call.render()
        if call.response is not None:
            text += wrap(TOOL_RESPONSE, call.response)
        parts.append(text)
    if sequence.reflection is not None:
        parts.append(wrap(REFLECTION, sequence.reflection))
    if sequence.ranking is not None:
        parts.append(render_ranking(sequence.ranking, labels))
    return SEPARATOR.join(parts)


@dataclass
class _Segment:
    tag: str
    content: str
    closed: bool
    start: int
    end: int


def _segments(text: str) -> tuple[list[_Segment], list[str]]:
    """Split into tagged segments. Content runs to the matching close tag (no nesting), so
    a tool response quoting `<plan>` cannot derail the parse; non-blank text between
    segments is reported."""
    segments: list[_Segment] = []
    stray: list[str] = []
    position = 0
    while True:
        match = _OPEN.search(text, position)
        between = text[position: match.start() if match else len(text)]
        if between.strip():
            stray.append(between.strip()[:40])
        if match is None:
            break
        tag = match.group(1)
        closing = text.find(close_tag(tag), match.end())
        if closing < 0:
            segments.append(_Segment(tag, text[match.end():], False, match.start(), len(text)))
            break
        end = closing + len(close_tag(tag))
        segments.append(_Segment(tag, text[match.end():closing], True, match.start(), end))
        position = end
    return segments, stray


def parse_ranking_list(content: str, labels: Labels) -> tuple[list[int], list[str]]:
    """0-based indices of the labels written in `[x, ..., z]` (-1 for a token that is no
    label), plus what makes them not a permutation of the labels. Without a proper list,
    any label-like tokens found are returned (and it is an error)."""
    labels = as_labels(labels)
    stripped = content.strip()
    errors: list[str] = []
    if not _LIST.fullmatch(stripped):
        errors.append(f"the ranking is not a list like {example_list(labels)}")
    indices, problems = read_labels(stripped, labels)
    return indices, errors + problems


def parse_student_output(text: str, labels: Labels, *, plan: bool = True, tools: bool = True,
                         reflection: bool = True) -> ParsedOutput:
    """Parse a full generation (tool responses included) of a task whose candidates carry
    `labels` (or letters for an int: the number of candidates).

    The flags say which parts the student's format has (False = ablated): a required part
    that is missing, or an ablated part that is present, makes the output malformed. Tool
    calls are optional even when allowed."""
    flags = ((PLAN, plan), (REFLECTION, reflection), (RECOMMEND, True))
    required = [tag for tag, on in flags if on]
    segments, stray = _segments(text)
    out = ParsedOutput()
    errors = out.errors
    errors += [f"text outside the tags: {s!r}" for s in stray]
    # Expected grammar: plan? (tool_call tool_response)* reflection? recommend, as a
    # sequence of stages that only move forward.
    stage = {PLAN: 0, TOOL_CALL: 1, TOOL_RESPONSE: 1, REFLECTION: 2, RECOMMEND: 3}
    current = -1
    counts = dict.fromkeys(TAGS, 0)
    expect_response = False
    for index, segment in enumerate(segments):
        tag = segment.tag
        counts[tag] += 1
        if not segment.closed:
            errors.append(f"{open_tag(tag)} is not closed")
        if stage[tag] < current:
            errors.append(f"{open_tag(tag)} comes after a later part")
        current = max(current, stage[tag])
        if tag == TOOL_RESPONSE:
            if not expect_response:
                errors.append("a tool response without a tool call before it")
            elif out.tool_calls:
                out.tool_calls[-1].response = segment.content
            expect_response = False
            continue
        if expect_response:
            errors.append("a tool call without a response")
            expect_response = False
        if tag == PLAN:
            out.plan = segment.content if out.plan is None else out.plan
        elif tag == REFLECTION:
            out.reflection = segment.content if out.reflection is None else out.reflection
        elif tag == TOOL_CALL:
            if not tools:
                errors.append("tool calls are not part of this format")
            try:
                call = parse_tool_call(segment.content)
            except ValueError as error:
                errors.append(str(error))
                call = ToolCall("", {})
            out.tool_calls.append(call)
            expect_response = segment.closed
        elif tag == RECOMMEND:
            if out.ranking is None:
                out.ranking, ranking_errors = parse_ranking_list(segment.content, labels)
                errors += ranking_errors
            if index != len(segments) - 1:
                errors.append(f"parts after {close_tag(RECOMMEND)}")
    if expect_response:
        errors.append("a tool call without a response")
    for tag in (PLAN, REFLECTION, RECOMMEND):
        if counts[tag] > 1:
            errors.append(f"{open_tag(tag)} appears {counts[tag]} times")
    errors += [f"missing {open_tag(tag)}" for tag in required if counts[tag] == 0]
    errors += [f"{open_tag(tag)} is not part of this format" for tag in (PLAN, REFLECTION)
               if counts[tag] and tag not in required]
    out.well_formed = not errors
    return out


def tool_response_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of every `<tool_response>...</tool_response>`, tags
    included: the runtime inserts them, the student never writes them."""
    return [(s.start, s.end) for s in _segments(text)[0] if s.tag == TOOL_RESPONSE]


def tags_written(text: str) -> list[str]:
    """The tags of the parts in `text`, in order (a tool response quoting a tag counts
    as the response only)."""
    return [segment.tag for segment in _segments(text)[0]]


def part_content(text: str, tag: str) -> str | None:
    """The content of the first `tag` part of `text`; None without one."""
    return next((segment.content for segment in _segments(text)[0] if segment.tag == tag), None)


def unclosed_tag(text: str) -> str | None:
    """The tag of the last part of `text` while it is still open."""
    segments, _ = _segments(text)
    return segments[-1].tag if segments and not segments[-1].closed else None


def pending_tag(text: str) -> str | None:
    """The tag a generation stopped in: the last part when it is still open (a backend
    that cuts the stop string) or closes exactly at the end (one that keeps it)."""
    segments, _ = _segments(text)
    if not segments:
        return None
    last = segments[-1]
    return last.tag if not last.closed or last.end == len(text.rstrip()) else None
