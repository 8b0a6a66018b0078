"""CST signals as tools an LLM can call, and one executor that never raises.

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
import yaml

from starrec.core import Task, ToolCall
from starrec.core.resources import resource_text
from starrec.cst.evidence import candidate_evidence, similar_users
from starrec.cst.latent import FACTORS, SEQUENCE, latent_scores
from starrec.cst.store import EvidenceStore
from starrec.cst.verbalize import (
    TokenCounter,
    approx_tokens,
    candidate_line,
    fit_budget,
    latent_lines,
    neighbour_lines,
    popularity_line,
    render,
)
from starrec.labels import LabelStyle, candidate_labels

ITEM_FIELDS = ("item_id", "user_id")
ITEM_LIST_FIELDS = ("item_ids",)


@lru_cache(maxsize=1)
def tool_specs() -> tuple[dict[str, Any], ...]:
    """The tools in OpenAI function-calling format (`tools=` of a chat request)."""
    text = resource_text("cst/tools.yaml")
    return tuple({"type": "function", "function": spec} for spec in yaml.safe_load(text))


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


# tools that take one item id, and the items worth offering each: the ones the prompt shows
_HISTORY_TOOLS = ("item_neighbours", "next_items")
_ANY_ITEM_TOOLS = ("content_neighbours",)
# task-bound tools that read a latent model of the store, by the model kind they read
_LATENT_TOOLS = {"sequence_model": SEQUENCE, "factor_model": FACTORS}


def task_tool_calls(specs: Sequence[dict[str, Any]], task: Task, store: EvidenceStore,
                    history_items: int, executor: ToolExecutor | None = None) -> list[ToolCall]:
    """Every distinct call of the tools `specs` on what a prompt of `task` shows (the
    recent `history_items`, the candidates, the user): the options when a model's choice
    of call is decoded under a mask, the teacher's and the student's alike.

    Default arguments are left out, as the teacher's prompts show its tools; with
    `executor`, the arguments are those it runs the call with (defaults filled in, as the
    student was trained on the teacher's recorded calls) and a call its schema rejects (a
    list over its length limit) is left out."""
    shown = task.history[-history_items:] if history_items > 0 else []
    calls: list[tuple[str, dict[str, Any]]] = []
    for spec in specs:
        name = spec["function"]["name"]
        if name in _HISTORY_TOOLS:
            calls += [(name, {"item_id": i}) for i in reversed(shown)]
        elif name in _ANY_ITEM_TOOLS:
            if store.embeddings is not None:  # the tool only errors on a store without them
                calls += [(name, {"item_id": i}) for i in [*reversed(shown), *task.candidates]]
        elif name == "popularity":
            calls.append((name, {"item_ids": list(task.candidates)}))
            if shown:
                calls.append((name, {"item_ids": list(shown)}))
        elif name == "similar_users":
            calls.append((name, {"user_id": task.user_id}))
        elif name in _LATENT_TOOLS:
            if _LATENT_TOOLS[name] in store.latent_states:  # else the tool only errors
                calls.append((name, {}))
        elif not spec["function"]["parameters"].get("required"):
            calls.append((name, {}))  # task-bound: sequence_candidates, candidate_evidence
    distinct: dict[str, ToolCall] = {}
    for name, arguments in calls:
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


class ToolError(Exception):
    """A call the model got wrong; its message goes back to the model."""


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
            lines = getattr(self, f"_tool_{name}")(**parsed)
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

    def _item(self, item: str) -> str:
        if item not in self.store.items.index:
            raise ToolError(render("unknown_item", item=item))
        return item

    def _require_task(self, name: str) -> Task:
        if self.task is None:
            raise ToolError(f"{name} needs a task context")
        return self.task

    def _tool_item_neighbours(self, item_id: str, k: int) -> list[str]:
        rows = self.store.neighbours("cooccurrence", self._item(item_id), k)
        return neighbour_lines(self.store, "cooccurrence", item_id, rows) or [
            f"No user consumed {self.store.title(item_id)} together with another item."]

    def _tool_next_items(self, item_id: str, k: int) -> list[str]:
        rows = self.store.neighbours("transition", self._item(item_id), k)
        return neighbour_lines(self.store, "transition", item_id, rows) or [
            f"No recorded next step after {self.store.title(item_id)}."]

    def _tool_content_neighbours(self, item_id: str, k: int) -> list[str]:
        rows = self.store.neighbours("content", self._item(item_id), k)
        if not rows and self.store.embeddings is None:
            raise ToolError("this store was built without content signals")
        return neighbour_lines(self.store, "content", item_id, rows)

    def _tool_popularity(self, item_ids: list[str]) -> list[str]:
        cutoff_time = self.task.cutoff_time if self.task is not None else None
        return [popularity_line(self.store, self._item(i), cutoff_time) for i in item_ids]

    def _tool_similar_users(self, user_id: str, k: int, candidates_only: bool) -> list[str]:
        task = self.task
        if task is not None and user_id == task.user_id:
            history = task.history
        elif self.store.knows_user(user_id):
            history = self.store.user_history(user_id)
        else:
            raise ToolError(f"unknown user id {user_id!r}")
        rows, overlaps = similar_users(self.store, history, user_id, k)
        if len(rows) == 0:
            return [render("similar_users_none")]
        graph = self.store.graph
        lines = [render("similar_users_header", n=len(rows), min_overlap=int(overlaps.min()),
                        max_overlap=int(overlaps.max()))]
        counts = graph.matrix[rows].sum(axis=0).A1
        seen = set(history)
        if candidates_only and task is not None:
            pool = [c for c in task.candidates if c not in seen]
        else:
            pool = [graph.items[i] for i in counts.argsort()[::-1][:50] if graph.items[i] not in seen][:10]
        columns = graph.items.get_indexer(pool)
        ranked = sorted(((int(counts[c]), item) for item, c in zip(pool, columns) if c >= 0 and counts[c] > 0),
                        key=lambda pair: -pair[0])
        lines += [render("similar_users_item", votes=v, title=self.store.title(i)) for v, i in ranked]
        return lines

    def _tool_sequence_candidates(self, recent: int) -> list[str]:
        task = self._require_task("sequence_candidates")
        recent_items = [i for i in reversed(task.history) if i in self.store.items.index][:recent]
        graph = self.store.graph
        candidates = [c for c in task.candidates if c in self.store.items.index]
        columns = graph.items.get_indexer(candidates)
        lines = []
        for base in recent_items:
            row = graph.transitions[graph.item_column(base)]
            total = row.sum()
            counts = row[:, columns].toarray().ravel()
            for count, item in sorted(zip(counts, candidates), key=lambda pair: -pair[0]):
                if count > 0:
                    lines.append(render("sequence_item", title=self.store.title(item),
                                        base=self.store.title(base), count=int(count),
                                        share=f"{100 * count / max(total, 1):.0f}%"))
        return lines or ["No candidate was consumed right after the recent history items."]

    def _latent(self, name: str, k: int) -> list[str]:
        task = self._require_task(name)
        model = self.store.latent_models.get(_LATENT_TOOLS[name])
        if model is None:
            raise ToolError("this store was built without latent models")
        scores = latent_scores(model, task)
        labels = candidate_labels(len(task.candidates), self.label_style)
        order = sorted((rank, j) for j, rank in enumerate(scores.ranks.tolist()) if rank > 0)
        ranked = [(rank, render("candidate", label=labels[j], title=self.store.title(task.candidates[j]),
                                item=task.candidates[j]),
                   float(scores.scores[j]), float(scores.shares[j])) for rank, j in order[:k]]
        kind = "sequence" if _LATENT_TOOLS[name] == SEQUENCE else "factors"
        return latent_lines(kind, scores.n_scored, ranked)

    def _tool_sequence_model(self, k: int) -> list[str]:
        return self._latent("sequence_model", k)

    def _tool_factor_model(self, k: int) -> list[str]:
        return self._latent("factor_model", k)

    def _tool_candidate_evidence(self, item_ids: list[str] | None = None) -> list[str]:
        task = self._require_task("candidate_evidence")
        wanted = set(item_ids) if item_ids else None
        if wanted is not None:
            unknown = wanted - set(task.candidates)
            if unknown:
                raise ToolError(f"not candidates of this task: {sorted(unknown)}")
        labels = candidate_labels(len(task.candidates), self.label_style)
        return [
            candidate_line(label, evidence, len(task.history), self.store.title)
            for label, evidence in zip(labels, candidate_evidence(self.store, task))
            if wanted is None or evidence.item in wanted
        ]
