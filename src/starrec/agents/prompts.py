"""The MARS prompt files and the task blocks every role's prompt shares.

Every call of a run shares one system prompt, `team.md`: the task (scenario, history,
candidates with their CST evidence). A role's own text comes after it, in the first user
message, so an engine that keeps its KV cache across calls (llama.cpp in process, vLLM
or SGLang prefix caching) reads the task once per run, not once per call.

`<role>.md` holds a role's brief and its request (sections `--- brief ---` and
`--- request ---`, `$name` placeholders; text before the first section is a note for
prompt authors), `roles.yaml` the roles' tools and descriptions, the other files small
shared pieces. Placeholders use `string.Template`, so JSON braces need no escaping.
The files, and the scenario sentences the student's prompt shares, are read through
`starrec.core.resources`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from string import Template
from typing import Any

import yaml

from starrec.core import Task
from starrec.core.resources import prompt_text, scenarios
from starrec.cst.evidence import candidate_evidence
from starrec.cst.store import EvidenceStore
from starrec.cst.tools import tool_line, tool_specs
from starrec.cst.verbalize import candidate_line

_SECTION = "--- {} ---"


def snippet(name: str, **fields: Any) -> str:
    """A one-section prompt file with its placeholders filled."""
    return Template(prompt_text(f"{name}.md").strip()).substitute(fields)


@dataclass(frozen=True)
class Role:
    name: str
    tools: tuple[str, ...]
    description: str
    aliases: tuple[str, ...]
    revise: str  # the Reflector's fixed request when it chooses among options


@lru_cache(maxsize=1)
def roles() -> dict[str, Role]:
    table = yaml.safe_load(prompt_text("roles.yaml"))
    known = {spec["function"]["name"] for spec in tool_specs()}
    result = {}
    for name, entry in table.items():
        unknown = set(entry.get("tools", [])) - known
        if unknown:
            raise ValueError(f"roles.yaml: role {name} lists unknown tool(s) {sorted(unknown)}")
        result[name] = Role(name, tuple(entry.get("tools", [])), entry.get("description", ""),
                            tuple(entry.get("aliases", [])), entry.get("revise", ""))
    return result


def role_tool_specs(role: str) -> list[dict[str, Any]]:
    allowed = roles()[role].tools
    return [spec for spec in tool_specs() if spec["function"]["name"] in allowed]


@dataclass(frozen=True)
class RolePrompt:
    brief: str  # who the role is and how it answers; opens its first user message
    request: Template  # what it is asked this time


@lru_cache(maxsize=None)
def role_prompt(role: str) -> RolePrompt:
    text = prompt_text(f"{role}.md")
    brief_mark, request_mark = _SECTION.format("brief"), _SECTION.format("request")
    if brief_mark not in text or request_mark not in text:
        raise ValueError(f"prompts/{role}.md needs a '{brief_mark}' and a '{request_mark}' line")
    brief, request = text.split(brief_mark, 1)[1].split(request_mark, 1)
    specs = role_tool_specs(role)
    tools = snippet("tools", tools="\n".join(map(tool_line, specs))) if specs else ""
    return RolePrompt(Template(brief.strip()).substitute(tools=tools).strip(),
                      Template(request.strip()))


def role_message(role: str, **fields: Any) -> str:
    """A role's first user message: its brief (fixed per role, so a transcript shows
    which agent spoke), then its request with `fields` filled in."""
    prompt = role_prompt(role)
    return f"{prompt.brief}\n\n{prompt.request.substitute(fields)}"


def _item(store: EvidenceStore, item: str) -> str:
    return f"{store.title(item)} (id {item})"


def context_block(task: Task, store: EvidenceStore, history_items: int) -> str:
    """Scenario and the most recent history: the part of every prompt about the user."""
    if task.scenario not in scenarios():
        raise ValueError(f"no scenario sentence for {task.scenario!r} in prompts/scenarios.yaml")
    shown = task.history[-history_items:] if history_items > 0 else []
    return snippet("context", scenario=scenarios()[task.scenario], user_id=task.user_id,
                   n_history=len(task.history), n_shown=len(shown),
                   history="\n".join(f"- {_item(store, i)}" for i in shown) or "- (none)")


def evidence_block(task: Task, store: EvidenceStore, labels: Sequence[str]) -> str:
    """Every candidate with its label and CST evidence sentence, never truncated: every
    role sees all candidates (the block is part of the shared system prompt)."""
    return "\n".join(candidate_line(label, e, len(task.history), store.title)
                     for label, e in zip(labels, candidate_evidence(store, task)))


@lru_cache(maxsize=1)
def candidate_headings() -> dict[str, str]:
    return yaml.safe_load(prompt_text("candidate_order.yaml"))


def team_prompt(task: Task, store: EvidenceStore, history_items: int, order: str,
                labels: Sequence[str]) -> str:
    """The system prompt every call of a run shares: the task and its evidence, the
    candidates introduced as listed in `order` (mars.candidate_order), each with its label."""
    return snippet("team", context=context_block(task, store, history_items),
                   candidates_heading=candidate_headings()[order],
                   evidence=evidence_block(task, store, labels))
