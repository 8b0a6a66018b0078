"""A teacher run as one student sequence: (prompt messages, completion text).

The prompt is what the student sees at inference: a system prompt describing its format
(`resources/prompts/student_system.md`, only the parts its format has) and the task
(`student_task.md`: scenario sentence, recent history titles, candidates with their
labels, titles and ids). The same two functions render it for training and for
`starrec.inference`, so the two cannot drift apart.

How a `TeacherRun` maps onto the tags of DESIGN.md 3.5:

- the Planner's plan (`run.plan`)                        -> `<plan>`
- every tool step, in recorded order, with its REAL
  recorded response (any agent; in MARS the analysts)   -> `<tool_call>` + `<tool_response>`
  (calls the tool answered with an error are dropped unless `keep_failed_tools`; an exact
  repeat of an earlier call adds nothing and is dropped; at most `max_tool_calls` kept)
- the analysts' final findings (`run.findings`, in the
  order of `schema.ANALYSTS`) and the Reflector's last
  verdict (`run.reflection`), one line each              -> `<reflection>`
- the Ranker's final order (`run.ranking_indices`)      -> `<recommend>[C, A, ...]</recommend>`
  (in the labels of `format.labels`, whatever labels the teacher was shown)

Ablations (`StudentFormatConfig.plan / tools / reflection = False`) leave their part
out of both the completion and the system prompt. Free text taken from the teacher has
the student's tags removed, so no plan or finding can close a tag early.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from string import Template

from starrec.config import StudentFormatConfig
from starrec.core import Task, ToolCall
from starrec.core.resources import PROMPT_VERSION, prompt_text, scenarios  # noqa: F401
from starrec.cst.tools import tool_line, tool_specs
from starrec.labels import candidate_labels
from starrec.llm.base import Message
from starrec.trajectories.format import TAGS, StudentSequence, render_sequence
from starrec.trajectories.schema import ANALYSTS, TeacherRun

# PROMPT_VERSION (`starrec.core.resources`, where the model card reads it) versions what
# this module renders: bump it there when the student's prompt files or this rendering
# change.

TitleLookup = Callable[[str], str]
_TAG = re.compile(r"</?(?:%s)>" % "|".join(TAGS))


@dataclass
class SerializedRun:
    task_id: str
    sample: int
    messages: list[Message]  # system + user: the prompt
    completion: str  # the assistant's answer in the student language


@lru_cache(maxsize=1)
def _system_sections() -> dict[str, str]:
    """`## name` sections of student_system.md: the parts an ablation can leave out."""
    sections: dict[str, str] = {}
    for block in prompt_text("student_system.md").split("## ")[1:]:
        name, _, body = block.partition("\n")
        sections[name.strip()] = body.strip()
    return sections


def format_labels(fmt: StudentFormatConfig, n_candidates: int) -> tuple[str, ...]:
    """The labels a student of this format gives `n_candidates` candidates."""
    return candidate_labels(n_candidates, fmt.labels)


def system_prompt(fmt: StudentFormatConfig, n_candidates: int) -> str:
    sections = _system_sections()
    labels = format_labels(fmt, n_candidates)
    parts = [sections["intro"]]
    parts += [sections[name] for name, on in (("plan", fmt.plan), ("tools", fmt.tools),
                                              ("reflection", fmt.reflection)) if on]
    parts.append(Template(sections["recommend"]).substitute(first=labels[0], last=labels[-1]))
    if fmt.tools:
        parts += [sections["tool_list"], *map(tool_line, tool_specs())]
    return "\n".join(parts)


def task_message(task: Task, titles: TitleLookup, history_items: int,
                 labels: Sequence[str]) -> str:
    shown = task.history[-history_items:] if history_items > 0 else []
    sentences = scenarios()  # the teacher's scenario sentences: both see the same task
    if task.scenario not in sentences:
        raise ValueError(f"task {task.task_id}: unknown scenario {task.scenario!r}; "
                         f"expected one of {sorted(sentences)}")
    return Template(prompt_text("student_task.md")).substitute(
        scenario=sentences[task.scenario],
        user_id=task.user_id,
        n_history=len(task.history),
        n_shown=len(shown),
        history="\n".join(f"- {titles(item)} [{item}]" for item in shown) or "- (none)",
        candidates="\n".join(f"{label}: {titles(item)} [{item}]"
                              for label, item in zip(labels, task.candidates)),
    ).strip()


def prompt_messages(task: Task, titles: TitleLookup, fmt: StudentFormatConfig) -> list[Message]:
    """The student's prompt for a task (training and inference alike)."""
    return [
        {"role": "system", "content": system_prompt(fmt, len(task.candidates))},
        {"role": "user", "content": task_message(task, titles, fmt.history_items,
                                                 format_labels(fmt, len(task.candidates)))},
    ]


def strip_tags(text: str) -> str:
    return _TAG.sub("", text or "").strip()


def run_task(run: TeacherRun) -> Task:
    try:
        return Task(**run.task)
    except TypeError as error:
        raise ValueError(f"run {run.key}: its task is not a task record ({error})") from None


def ranking_indices(run: TeacherRun) -> list[int]:
    """The final order as candidate indices; ValueError unless it is a full permutation."""
    candidates = run.task["candidates"]
    indices = list(run.ranking_indices)
    if not indices and run.ranking:
        position = {item: i for i, item in enumerate(candidates)}
        indices = [position.get(item, -1) for item in run.ranking]
    if sorted(indices) != list(range(len(candidates))):
        raise ValueError(f"run {run.key}: its ranking is not a permutation of the "
                         f"{len(candidates)} candidates")
    return indices


def tool_calls(run: TeacherRun, fmt: StudentFormatConfig) -> list[ToolCall]:
    kept: list[ToolCall] = []
    seen: set[str] = set()
    for step in run.steps:
        if len(kept) >= fmt.max_tool_calls:
            break
        if step.kind != "tool" or not step.tool or (not step.ok and not fmt.keep_failed_tools):
            continue
        arguments = step.arguments or {}
        key = json.dumps([step.tool, arguments], sort_keys=True)
        if key not in seen:
            seen.add(key)
            kept.append(ToolCall(step.tool, arguments, strip_tags(step.response or "")))
    return kept


def reflection_text(run: TeacherRun) -> str:
    analysts = [a for a in ANALYSTS if a in run.findings]
    analysts += [a for a in run.findings if a not in ANALYSTS]
    lines = [f"{a}: {strip_tags(run.findings[a])}" for a in analysts if strip_tags(run.findings[a])]
    if strip_tags(run.reflection):
        lines.append(f"verdict: {strip_tags(run.reflection)}")
    return "\n".join(lines)


def to_sequence(run: TeacherRun, fmt: StudentFormatConfig) -> StudentSequence:
    return StudentSequence(
        plan=strip_tags(run.plan) if fmt.plan else None,
        tool_calls=tool_calls(run, fmt) if fmt.tools else [],
        reflection=reflection_text(run) if fmt.reflection else None,
        ranking=ranking_indices(run),
    )


def serialize_run(run: TeacherRun, titles: TitleLookup, fmt: StudentFormatConfig) -> SerializedRun:
    """The (prompt, completion) pair of one teacher run."""
    return SerializedRun(
        task_id=run.task_id,
        sample=run.sample,
        messages=prompt_messages(run_task(run), titles, fmt),
        completion=render_sequence(to_sequence(run, fmt),
                                   format_labels(fmt, len(run.task["candidates"]))),
    )

