"""CST signals as tools an LLM can call (one `Tool` object each, in
`starrec.cst.toolbox`), their schemas, and one executor that never raises.

The executor is bound to a task (its user, history and candidates), validates arguments
against each tool's JSON schema, and answers every call with text: evidence, or an error
message the model can act on. It counts calls, errors and time per tool.
`task_tool_calls` lists the calls a prompt offers, the one list the teacher's and the
student's constrained decoding both choose among.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import jsonschema

from starrec.core import Task, ToolCall
from starrec.cst.store import EvidenceStore
from starrec.cst.toolbox import TOOLS, Tool, ToolError, described
from starrec.cst.verbalize import TokenCounter, approx_tokens, fit_budget, render
from starrec.labels import LabelStyle

ITEM_FIELDS = ("item_id", "user_id")
ITEM_LIST_FIELDS = ("item_ids",)

__all__ = ["TOOLS", "Tool", "ToolError", "ToolExecutor", "ToolResult", "ToolStats",
           "task_tool_calls", "tool_line", "tool_names", "tool_specs"]


@lru_cache(maxsize=1)
def tool_specs() -> tuple[dict[str, Any], ...]:
    """The tools in OpenAI function-calling format (`tools=` of a chat request)."""
    names = list(described())
    if sorted(names) != sorted(TOOLS):
        raise RuntimeError(f"cst/tools.yaml describes {sorted(names)}, the toolbox has "
                           f"{sorted(TOOLS)}")
    return tuple(TOOLS[name].spec for name in names)


def tool_names() -> list[str]:
    return [spec["function"]["name"] for spec in tool_specs()]


def tool_line(spec: dict[str, Any]) -> str:
    """`name(required, optional=default): description`, the shortest faithful signature:
    how the teacher's role prompts and the student's system prompt list the tools."""
    function = spec["function"]
    parameters = function["parameters"]
    required = parameters.get("required", [])
    args = [name if name in required else
            f"{name}={json.dumps(prop['default'])}" if "default" in prop else f"[{name}]"
            for name, prop in parameters["properties"].items()]
    return f"- {function['name']}({', '.join(args)}): {' '.join(function['description'].split())}"


def task_tool_calls(specs: Sequence[dict[str, Any]], task: Task, store: EvidenceStore,
                    history_items: int, executor: ToolExecutor | None = None) -> list[ToolCall]:
    """Every distinct call of the tools `specs` on what a prompt of `task` shows (the
    recent `history_items`, the candidates, the user), as each tool offers them: the
    options when a model's choice of call is decoded under a mask, the teacher's and the
    student's alike.

    Default arguments are left out, as the teacher's prompts show its tools; with
    `executor`, the arguments are those it runs the call with (defaults filled in, as the
    student was trained on the teacher's recorded calls) and a call its schema rejects (a
    list over its length limit) is left out."""
    shown = task.history[-history_items:] if history_items > 0 else []
    distinct: dict[str, ToolCall] = {}
    for spec in specs:
        name = spec["function"]["name"]
        for arguments in TOOLS[name].offers(task, store, shown):
            if executor is not None:
                try:
                    arguments = executor.arguments_for(name, arguments)
                except ToolError:
                    continue
            call = ToolCall(name, arguments)
            distinct.setdefault(call.json(), call)
    return list(distinct.values())


@dataclass
class ToolResult:
    name: str
    arguments: dict[str, Any]
    text: str
    ok: bool
    seconds: float


@dataclass
class ToolStats:
    calls: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"calls": dict(self.calls), "errors": dict(self.errors),
                "seconds": round(self.seconds, 4)}


class ToolExecutor:
    def __init__(self, store: EvidenceStore, task: Task | None = None,
                 budget: int | None = None, count_tokens: TokenCounter = approx_tokens,
                 label_style: LabelStyle = "letters") -> None:
        """`label_style` names the candidates in evidence lines as the prompt labels them."""
        self.store = store
        self.task = task
        self.label_style = label_style
        self.budget = budget if budget is not None else store.config.token_budget
        self.count_tokens = count_tokens
        self.stats = ToolStats()
        self._specs = {s["function"]["name"]: s["function"] for s in tool_specs()}

    def call(self, name: str, arguments: dict[str, Any] | str | None = None) -> ToolResult:
        start = time.perf_counter()
        self.stats.calls[name] += 1
        parsed: dict[str, Any] = {}
        try:
            parsed = self.arguments_for(name, arguments)
            lines = TOOLS[name].run(self, **parsed)
            text = "\n".join(fit_budget(lines, self.budget, self.count_tokens))
            ok = True
        except ToolError as error:
            text, ok = f"Error: {error}", False
        except Exception as error:  # a tool bug must not end a teacher run; it is recorded
            text, ok = f"Error: tool {name} failed ({type(error).__name__}: {error})", False
        if not ok:
            self.stats.errors[name] += 1
        seconds = time.perf_counter() - start
        self.stats.seconds += seconds
        return ToolResult(name, parsed, text, ok, seconds)

    def arguments_for(self, name: str, arguments: dict[str, Any] | str | None) -> dict[str, Any]:
        """The arguments a call runs with: validated against the tool's schema, ids as
        strings, defaults filled in. ToolError (its message for the model) otherwise."""
        if name not in self._specs:
            raise ToolError(f"unknown tool {name!r}; available: {', '.join(self._specs)}")
        if arguments is None or arguments == "":
            arguments = {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as error:
                raise ToolError(f"arguments are not valid JSON ({error.msg})") from None
        if not isinstance(arguments, dict):
            raise ToolError("arguments must be a JSON object")
        # ids written as numbers (50 for "50") are what a model most often gets wrong
        arguments = {
            key: (str(value) if key in ITEM_FIELDS and isinstance(value, int | float) else
                  [str(v) if isinstance(v, int | float) else v for v in value]
                  if key in ITEM_LIST_FIELDS and isinstance(value, list) else value)
            for key, value in arguments.items()
        }
        schema = self._specs[name]["parameters"]
        try:
            jsonschema.validate(arguments, schema)
        except jsonschema.ValidationError as error:
            where = ".".join(map(str, error.absolute_path)) or "arguments"
            raise ToolError(f"invalid {where}: {error.message}") from None
        defaults = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
        return {**defaults, **arguments}

    def unknown_items(self, arguments: dict[str, Any]) -> list[str]:
        """The item ids in `arguments` (as `arguments_for` returns them) that the store
        does not hold: the call would only return an error."""
        ids = [arguments["item_id"]] if "item_id" in arguments else []
        ids += [i for key in ITEM_LIST_FIELDS for i in arguments.get(key) or []]
        return [i for i in ids if i not in self.store.items.index]

    def item(self, item: str) -> str:
        """`item` if the store holds it; ToolError (its message for the model) otherwise."""
        if item not in self.store.items.index:
            raise ToolError(render("unknown_item", item=item))
        return item

    def require_task(self, name: str) -> Task:
        """The bound task; ToolError for a task-bound tool called without one."""
        if self.task is None:
            raise ToolError(f"{name} needs a task context")
        return self.task
