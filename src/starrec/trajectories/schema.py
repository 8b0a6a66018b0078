"""The record of one teacher run: what `star teach` appends, one JSON line per task.

It is the raw material of distillation, so it keeps everything, in the order it
happened: every LLM call with its full prompt and output, every tool call with its real
response, token counts and wall time. `starrec.trajectories.serialize` turns it into the
single-agent sequence of DESIGN.md 3.5; nothing downstream needs the teacher again.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

AGENTS = ("planner", "user_profile", "long_term", "recent", "divergence", "reflector", "ranker")
ANALYSTS = ("user_profile", "long_term", "recent", "divergence")


@dataclass
class Step:
    """One event of a run. `kind` says which fields are filled:

    - "llm": `messages` (the prompt as sent), `output` (raw text), `prompt_tokens`,
      `completion_tokens`, `attempt` (0 first try, >0 repair rounds), `error` (a parse or
      backend error fed back or recorded), `constrained`;
    - "tool": `tool` (name), `arguments`, `response` (the text the agent read), `ok`;
    - "message": `output` holds an agent's final product (plan, findings, reflection
      verdict, ranking) as the agent stated it, `parsed` its structured form.
    """

    kind: Literal["llm", "tool", "message"]
    agent: str
    round: int = 0
    seconds: float = 0.0
    messages: list[dict[str, str]] | None = None
    output: str = ""
    parsed: Any = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    attempt: int = 0
    constrained: bool = False
    error: str | None = None
    tool: str | None = None
    arguments: dict[str, Any] | None = None
    response: str | None = None
    ok: bool = True


@dataclass
class TeacherRun:
    """One task, start to end. `ranking` holds item ids in the teacher's final order
    (complete and valid unless `fallback` says otherwise); `status` is "ok" or "error"
    (a run that raised is recorded too, with `error`, so a resume does not retry it
    forever; `star teach --retry-errors` does)."""

    task_id: str
    task: dict[str, Any]  # the Task as the model was shown it: candidates in mars.candidate_order
    model: str
    config: dict[str, Any]
    steps: list[Step] = field(default_factory=list)
    plan: str = ""
    findings: dict[str, str] = field(default_factory=dict)  # analyst -> final findings
    reflection: str = ""  # the reflector's last verdict
    ranking: list[str] = field(default_factory=list)
    ranking_indices: list[int] = field(default_factory=list)  # into task["candidates"]
    fallback: str | None = None  # why the ranking came from a fallback, if it did
    reflection_rounds: int = 0
    llm_calls: int = 0
    tool_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    sample: int = 0  # index of this sample when a task is run several times
    seed: int | None = None
    status: str = "ok"
    error: str | None = None

    def to_json(self) -> str:
        """One JSON line. The system prompt that the calls of a run share (the task and
        its evidence, tens of KB) is written once, as `system_prompt`; each message that
        carried it holds null content. `from_dict` restores the messages as sent."""
        record = asdict(self)
        shared = _shared_system(self.steps)
        if shared is not None:
            record["system_prompt"] = shared
            for step in record["steps"]:
                for message in step["messages"] or ():
                    if message["role"] == "system" and message["content"] == shared:
                        message["content"] = None
        return json.dumps(record, ensure_ascii=False)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> TeacherRun:
        record = dict(record)
        shared = record.pop("system_prompt", None)
        steps = []
        for step in record.get("steps", []):
            if shared is not None and step.get("messages"):
                step = {**step, "messages": [
                    {**m, "content": shared} if m["role"] == "system" and m.get("content") is None
                    else m for m in step["messages"]]}
            steps.append(Step(**step))
        return cls(**{**record, "steps": steps})

    @property
    def key(self) -> str:
        """Identity for resuming: a task may be sampled several times."""
        return f"{self.task_id}#{self.sample}"


def _shared_system(steps: list[Step]) -> str | None:
    """The system prompt sent with more than one LLM call of a run, if there is one (and
    none is null, so that a null in a written line can only mean this prompt)."""
    counts = Counter(m.get("content") for step in steps for m in step.messages or ()
                     if m["role"] == "system")
    if not counts or None in counts:
        return None
    content, count = counts.most_common(1)[0]
    return content if count > 1 else None
