"""Tool calls: the record, its one rendering, and its one parser.

The teacher's agents and the student both call the CST tools, and both write a call as
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (DESIGN.md 3.5): the teacher
in a chat, the student inside its single sequence. One record and one rendering serve
both, so a call in a teacher's trajectory is written exactly as the student is trained
and decoded to write it. They differ only in how forgiving the parse is, which
`parse_tool_call` takes as a parameter: a teacher's chat answer is read leniently
(small models wrap, fence, cut off or misquote their JSON), the student's sequence
strictly (its grammar is what the format reward judges).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

TOOL_CALL, TOOL_RESPONSE = "tool_call", "tool_response"

_TOOL_TAG = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
_FENCE = re.compile(r"```[a-zA-Z]*\s*(.*?)(?:```|$)", re.S)
_TOOL_CALL_START = re.compile(r"<tool_call>|\{\s*\"(?:name|function)\"\s*:")


class ParseError(ValueError):
    """An answer that does not have the required shape; the message is for the model."""


def tool_call_json(name: str, arguments: dict[str, Any]) -> str:
    """What is written inside `<tool_call>`."""
    return json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)


def render_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """The canonical form (DESIGN.md 3.5), as a call goes into a conversation or sequence."""
    return f"<{TOOL_CALL}>{tool_call_json(name, arguments)}</{TOOL_CALL}>"


@dataclass
class ToolCall:
    """A call and, once the runtime answered it, its response (None before, or when a
    sequence ended before one)."""

    name: str
    arguments: dict[str, Any]
    response: str | None = None

    def json(self) -> str:
        return tool_call_json(self.name, self.arguments)

    def render(self) -> str:
        return render_tool_call(self.name, self.arguments)


def looks_like_tool_call(text: str) -> bool:
    """Whether the model tried to call a tool (then a broken call is an error to repair,
    not a final answer)."""
    return _TOOL_CALL_START.search(text) is not None


def _close_brackets(text: str) -> str:
    """Append the closers a truncated JSON value is missing (strings respected)."""
    stack: list[str] = []
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            stack.append("}" if char == "{" else "]")
        elif char in "}]" and stack:
            stack.pop()
    return text + ('"' if in_string else "") + "".join(reversed(stack))


def _lenient_object(text: str) -> dict[str, Any]:
    """The first JSON object in `text`, trailing text ignored, with the repairs small
    models need most: trailing commas, single quotes, a cut-off end."""
    start = text.find("{")
    if start < 0:
        raise ParseError("no JSON object found")
    fragment = text[start:]
    decoder = json.JSONDecoder()
    variants = [fragment, re.sub(r",\s*([}\]])", r"\1", fragment)]
    if '"' not in fragment:
        variants.append(variants[-1].replace("'", '"'))
    variants.append(_close_brackets(variants[-1]))
    errors = []
    for variant in variants:
        try:
            return decoder.raw_decode(variant)[0]  # starts with "{": an object
        except json.JSONDecodeError as error:
            errors.append(error)
    raise ParseError(f"the tool call is not valid JSON ({errors[0].msg} at character "
                     f"{errors[0].pos})")


def _example_call(names: Sequence[str]) -> str:
    name = names[0] if names else "TOOL"
    return f'<tool_call>{{"name": "{name}", "arguments": {{...}}}}</tool_call>'


def _how(names: Sequence[str] | None) -> str:
    if names is None:
        return f"Call a tool as {_example_call(())}."
    return f"Call a tool as {_example_call(names)} with one of: {', '.join(names)}."


def _strict_call(content: str) -> dict[str, Any]:
    """The call object of exactly `{"name": str, "arguments": {...}}`, nothing around it."""
    try:
        value = json.loads(content)
    except json.JSONDecodeError as error:
        raise ParseError(
            f"the tool call is not valid JSON ({error.msg} at char {error.pos})") from None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        raise ParseError('a tool call must be {"name": "<tool>", "arguments": {...}}')
    arguments = value.get("arguments", {})
    if not isinstance(arguments, dict):
        raise ParseError("the tool call's arguments must be a JSON object")
    extra = set(value) - {"name", "arguments"}
    if extra:
        raise ParseError(f"unexpected keys in the tool call: {sorted(extra)}")
    return value


def _check_name(name: str, names: Sequence[str] | None, how: str) -> None:
    if names is not None and name not in names:
        raise ParseError(f"unknown tool {name!r}. {how}")


def _lenient_call(text: str, names: Sequence[str] | None, how: str) -> dict[str, Any]:
    """The call object in `text` as a chat model writes it: JSON inside <tool_call> tags,
    a fenced block, or bare, text after it ignored; OpenAI's function wrapper, argument
    key aliases and arguments given as a JSON string are accepted."""
    match = _TOOL_TAG.search(text) or _FENCE.search(text)
    region = match.group(1) if match else text
    try:
        call = _lenient_object(region)
    except ParseError as error:
        raise ParseError(f"{error}. {how}") from None
    if isinstance(call.get("function"), dict):  # OpenAI's {"type": "function", "function": {...}}
        call = call["function"]
    name = call.get("name")
    if not isinstance(name, str) or not name:
        raise ParseError(f'the tool call has no "name". {how}')
    _check_name(name, names, how)
    arguments = next((call[k] for k in ("arguments", "parameters", "args") if k in call), {})
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            raise ParseError(f"the arguments of {name} are not valid JSON ({error.msg}). "
                             f"{how}") from None
    if not isinstance(arguments, dict):
        raise ParseError(f'"arguments" of {name} must be a JSON object. {how}')
    return {"name": name, "arguments": arguments}


def parse_tool_call(text: str, names: Sequence[str] | None = None, *,
                    lenient: bool = False) -> ToolCall:
    """The call in `text`; `ParseError` (a `ValueError`) naming what is wrong otherwise,
    a message written for the model, which reads it back (as a tool response, or in a
    repair round).

    Strict (the student's sequence, whose grammar the format reward judges): `text` is
    the content of one `<tool_call>` and must be exactly `{"name": str, "arguments":
    {...}}` (arguments may be left out). `lenient` (a teacher's chat answer): the JSON may
    stand inside `<tool_call>` tags, in a fenced block or bare, with text after it,
    trailing commas, single quotes or a cut-off end; OpenAI's function wrapper,
    `parameters` or `args` for `arguments`, and arguments as a JSON string are accepted.
    With `names`, the call must name one of them. Argument values are checked by the tool
    executor either way, whose error message the model reads as the tool's response."""
    how = _how(names)
    if lenient:
        call = _lenient_call(text, names, how)
    else:
        call = _strict_call(text)
        _check_name(call["name"], names, how)
    return ToolCall(call["name"], call.get("arguments", {}))
