"""Every well-formed answer a role may give, for decoding under `ChoiceConstraint`.

A 135M model cannot follow the planner, reflector or tool-call formats, so its
trajectories would hold no plan, no verdict and no tool call. With `mars.constrain`
(and a backend that can enforce a choice) those answers are picked among the options
below: the model still decides which analysts, which verdict, which call on which item;
the options only guarantee that the decision is well-formed. Findings and the ranking
stay free text and a permutation.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

from starrec.agents.prompts import role_tool_specs, roles
from starrec.cst.store import EvidenceStore
from starrec.data.tasks import Task
from starrec.llm.structured import ToolCall

# tools that take one item id, and the items worth offering each: the ones the prompt shows
_HISTORY_TOOLS = ("item_neighbours", "next_items")
_ANY_ITEM_TOOLS = ("content_neighbours",)


def plan_options(analysts: Sequence[str]) -> tuple[str, ...]:
    """Every non-empty set of analysts (config order), one `name: description` line each."""
    return tuple(
        "\n".join(f"{a}: {roles()[a].description}" for a in chosen)
        for size in range(len(analysts), 0, -1) for chosen in combinations(analysts, size))


def verdict_options(analysts: Sequence[str]) -> tuple[str, ...]:
    """ACCEPT, or one analyst sent back with its role's fixed request."""
    return ("ACCEPT", *(f"{a}: {roles()[a].revise}" for a in analysts))


def tool_call_options(role: str, task: Task, store: EvidenceStore,
                      history_items: int) -> tuple[str, ...]:
    """The role's tool calls on what the prompt shows (the recent history, the
    candidates, the user), default arguments left out, in canonical form."""
    shown = task.history[-history_items:] if history_items > 0 else []
    calls: list[ToolCall] = []
    for spec in role_tool_specs(role):
        name = spec["function"]["name"]
        if name in _HISTORY_TOOLS:
            calls += [ToolCall(name, {"item_id": i}) for i in reversed(shown)]
        elif name in _ANY_ITEM_TOOLS:
            if store.embeddings is not None:  # the tool only errors on a store without them
                calls += [ToolCall(name, {"item_id": i}) for i in [*reversed(shown), *task.candidates]]
        elif name == "popularity":
            calls += [ToolCall(name, {"item_ids": list(task.candidates)})]
            if shown:
                calls.append(ToolCall(name, {"item_ids": list(shown)}))
        elif name == "similar_users":
            calls.append(ToolCall(name, {"user_id": task.user_id}))
        elif not spec["function"]["parameters"].get("required"):
            calls.append(ToolCall(name, {}))  # task-bound: sequence_candidates, candidate_evidence
    return tuple(dict.fromkeys(call.render() for call in calls))
