"""A small agent core: one role, its prompt, its tools, a bounded loop.

An agent sends its conversation to the model; each answer is either a tool call, which
is executed (`ToolExecutor` never raises) and its response appended, or the final
answer, parsed by the role's parser. Unparsable answers are repaired by
`generate_structured`. The loop is bounded twice: by turns and by tool calls; at either
cap the agent's next turn must be its final answer, and the result says which cap
forced it. Everything that happens is appended to the run's `TeacherRun` record.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from starrec.agents.prompts import role_tool_specs, snippet
from starrec.core.tool_calls import ParseError, ToolCall, looks_like_tool_call, parse_tool_call
from starrec.cst.tools import ToolExecutor, ToolResult
from starrec.llm.base import ChatModel, ChoiceConstraint, Constraint, Message
from starrec.llm.structured import Attempt, generate_structured
from starrec.trajectories.schema import Step, TeacherRun

T = TypeVar("T")


class BackendFailure(RuntimeError):
    """The model backend raised `LLMError`: the run cannot go on with LLM calls."""


def record_attempts(run: TeacherRun, agent: str, round: int, attempts: list[Attempt]) -> None:
    for number, attempt in enumerate(attempts):
        run.steps.append(Step(
            kind="llm", agent=agent, round=round, seconds=attempt.seconds,
            messages=[dict(m) for m in attempt.messages], output=attempt.text,
            prompt_tokens=attempt.prompt_tokens, completion_tokens=attempt.completion_tokens,
            attempt=number, constrained=attempt.constrained, error=attempt.error))
        run.llm_calls += 1
        run.prompt_tokens += attempt.prompt_tokens
        run.completion_tokens += attempt.completion_tokens


def record_tool(run: TeacherRun, agent: str, round: int, result: ToolResult) -> None:
    run.steps.append(Step(kind="tool", agent=agent, round=round, seconds=result.seconds,
                          tool=result.name, arguments=result.arguments, response=result.text,
                          ok=result.ok))
    run.tool_calls += 1


def record_message(run: TeacherRun, agent: str, round: int, output: str, parsed: Any = None,
                   error: str | None = None) -> None:
    run.steps.append(Step(kind="message", agent=agent, round=round, output=output,
                          parsed=parsed, error=error))


def tool_response(text: str) -> str:
    """How a tool's answer enters the conversation (DESIGN.md 3.5 tags)."""
    return f"<tool_response>\n{text}\n</tool_response>"


@dataclass(frozen=True)
class AgentSpec:
    """A role and its caps. Tools come from the role (prompts/roles.yaml)."""

    role: str
    max_tokens: int
    max_turns: int = 1
    max_tool_calls: int = 0
    max_repairs: int = 2


@dataclass
class AgentResult(Generic[T]):
    text: str  # the final answer as the model wrote it
    value: T | None  # its parsed form; None when it never parsed
    forced: str | None = None  # the cap that forced the final answer, if one did
    error: str | None = None  # why `value` is None


class Agent:
    def __init__(self, spec: AgentSpec, model: ChatModel, run: TeacherRun, system: str,
                 tools: ToolExecutor | None = None, temperature: float = 0.0,
                 seed: int | None = None, tool_choices: Sequence[str] = ()) -> None:
        """`system`: the run's shared system prompt (`prompts.team_prompt`).
        `tool_choices`: canonical tool calls; when given (and the backend can enforce
        a choice), every turn that may call a tool calls one of them, each at most once."""
        self.spec = spec
        self.system = system
        self.model = model
        self.run_record = run
        self.specs = role_tool_specs(spec.role) if tools is not None else []
        self.tool_names = [s["function"]["name"] for s in self.specs]
        self.tools = tools
        self.temperature = temperature
        self.seed = seed
        self.tool_choices = tuple(tool_choices)

    def run(self, user: str, parse_final: Callable[[str], T], *, round: int = 0,
            constraint: Constraint | None = None) -> AgentResult[T]:
        """Loop until a final answer; raises `BackendFailure` if the backend does."""
        spec = self.spec
        conversation: list[Message] = [{"role": "system", "content": self.system},
                                       {"role": "user", "content": user}]
        calls = 0
        made: set[str] = set()
        for turn in range(spec.max_turns):
            forced = None
            if self.specs and calls >= spec.max_tool_calls:
                forced = f"Tool-call limit ({spec.max_tool_calls}) reached."
            elif self.specs and turn == spec.max_turns - 1:
                forced = f"Turn limit ({spec.max_turns}) reached."
            may_call = bool(self.specs) and forced is None
            if forced:
                conversation.append({"role": "user", "content": snippet("final_now", reason=forced)})
            turn_constraint = self._tool_constraint(made) if may_call else constraint
            result = generate_structured(
                self.model, conversation,
                (lambda text: self._turn(text, parse_final)) if may_call else
                (lambda text: self._final(text, parse_final)),
                constraint=turn_constraint, max_repairs=spec.max_repairs,
                max_tokens=self._max_tokens(turn_constraint), temperature=self.temperature,
                seed=self.seed, stop=["</tool_call>"] if may_call else None)
            record_attempts(self.run_record, spec.role, round, result.attempts)
            if result.backend_failed:
                raise BackendFailure(result.error)
            if result.value is None:
                return AgentResult(result.text, None, forced, result.error)
            if not isinstance(result.value, ToolCall):
                return AgentResult(result.text, result.value, forced)
            assert self.tools is not None
            done = self.tools.call(result.value.name, result.value.arguments)
            record_tool(self.run_record, spec.role, round, done)
            calls += 1
            made.add(result.value.render())
            conversation += [{"role": "assistant", "content": result.value.render()},
                             {"role": "user", "content": tool_response(done.text)}]
        # only reachable with max_turns < 1: nothing was asked
        return AgentResult("", None, None, f"max_turns is {spec.max_turns}: no turn was taken")

    def _max_tokens(self, constraint: Constraint | None) -> int:
        """An enforced choice ends by itself, so it may always finish its longest option."""
        if isinstance(constraint, ChoiceConstraint) and self.model.supports(constraint):
            return max(self.spec.max_tokens, constraint.max_tokens)
        return self.spec.max_tokens

    def _tool_constraint(self, made: set[str]) -> ChoiceConstraint | None:
        options = tuple(o for o in self.tool_choices if o not in made)
        return ChoiceConstraint(options) if options else None

    def _turn(self, text: str, parse_final: Callable[[str], T]) -> ToolCall | T:
        if looks_like_tool_call(text):
            return parse_tool_call(text, self.tool_names, lenient=True)
        return parse_final(text)

    def _final(self, text: str, parse_final: Callable[[str], T]) -> T:
        if self.specs and looks_like_tool_call(text):
            raise ParseError("no more tool calls are allowed. Write your final answer as "
                             "plain sentences, without a tool call.")
        return parse_final(text)
