"""Single-pass student inference.

The student writes its whole answer (plan, tool calls, reflection, ranking) as one
generation. The generation pauses at `</tool_call>`: the call is executed against the
CST store (a table look-up, not an LLM turn), `</tool_call><tool_response>...
</tool_response>` is appended, and the same generation continues from there. It ends at
`</recommend>`, at the end-of-turn token, when the token budget is spent, or when the
student keeps calling tools past the cap (the first call over the cap is answered with
a "limit reached" message, the second ends the pass).

With `student.constrain` (and a backend that masks tokens) the format's structure is
decoded under masks and its content is left to the student:

- the pass opens with `<plan>`; where the student's card lists `plan_choices` (the plans
  its teacher's planner chose among) the plan is decoded as one of them, as the
  teacher's was: a 135M student learns the plan's lines but not where the list ends,
  and writes invented analysts until its budget runs out. A plan of its own and the
  reflection pause at their closing tag; a reflection longer than the longest of its
  training data (the card's `max_reflection_tokens`, plus room for the closing tag) is
  cut there. Both apply to a part the pass opened itself or by a choice, so only where
  the backend masks choices;
- after the plan and after each tool response, what comes next is chosen among the parts
  the format allows there (a tool call while under the cap, or the reflection; after a
  reflection, or in a format without one, the ranking), so a student that has learned
  the parts but not their order stays in the format (it wrote a second, third, ...
  reflection where the ranking belongs);
- a tool call that does not parse, fails its tool's schema or names an item that does
  not exist is decoded again under `ChoiceConstraint`, over every call on what the
  prompt shows (so a look-up is made, not an error message read back); so is a call
  opened by a choice that runs past a bound no runnable call reaches (the longest
  one's bytes);
- when the pass ends without a `<recommend>` list that is a permutation, the list is
  decoded once more under `PermutationConstraint`, in place of the broken one or after
  the text.

`StudentAnswer.chosen_plan`, `repaired_calls` (the calls as the student wrote them) and
`repaired` say what happened. The parse (`parsed`, whose `well_formed` is the GRPO format
reward) is taken before the ranking repair, and a pass with a repaired call is not well
formed: the reward judges what the student wrote; choices made under a mask are the
student's own. Choices and repairs count in the token budget; one under way may finish
past it, and they are sampled as the pass is (`student.temperature`).

Continuations go through `ChatModel.complete` on the text so far: `prompt_tokens` sums
the prompt each continuation sends, as the backend reports it. An engine that keeps its
KV cache (llama.cpp in process, vLLM and SGLang with prefix caching) computes only what
is new since the last one; one without re-reads it all.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from string import Template
from typing import Any

from starrec.config import StudentConfig, StudentFormatConfig
from starrec.core import CompletedRanking, Task, complete_ranking
from starrec.core.resources import prompt_text
from starrec.core.tool_calls import parse_tool_call
from starrec.cst.ranker import present
from starrec.cst.store import EvidenceStore
from starrec.cst.tools import ToolError, ToolExecutor, task_tool_calls, tool_specs
from starrec.llm.base import (
    ChatModel,
    ChoiceConstraint,
    Completion,
    Constraint,
    LLMError,
    PermutationConstraint,
)
from starrec.trajectories.format import (
    PLAN,
    RECOMMEND,
    REFLECTION,
    SEPARATOR,
    STOP_STRINGS,
    TOOL_CALL,
    TOOL_RESPONSE,
    ParsedOutput,
    close_tag,
    closed,
    open_tag,
    parse_student_output,
    pending_tag,
    tags_written,
    unclosed_tag,
    wrap,
)
from starrec.trajectories.serialize import format_labels, prompt_messages


@dataclass
class ExecutedCall:
    name: str
    arguments: dict[str, Any]
    ok: bool
    seconds: float


@dataclass
class StudentAnswer:
    """One pass. `text` is the completion with the tool responses in it. `ranking` holds
    item ids in the student's order as written (None without a `<recommend>`); a token
    that is no candidate label becomes `#?`, which no candidate equals, so the
    evaluation counts the output invalid. `completed` is the full ranking of DESIGN.md
    3.4 (the student's order, then the rest in presented order)."""

    text: str
    parsed: ParsedOutput
    ranking: list[str] | None
    completed: CompletedRanking
    tool_calls: list[ExecutedCall] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    segments: int = 0  # generation requests: free continuations, choices and repairs decoded
    chosen_plan: bool = False  # the plan is one of the card's plan choices, taken under a mask
    # the reflection ran past the card's max_reflection_tokens (plus room for its closing
    # tag: the tag's characters, more than its tokens) and was cut there
    reflection_cut: bool = False
    repaired: bool = False  # the <recommend> list was decoded again under a permutation mask
    # broken tool calls (their content as written) decoded again under a choice mask
    repaired_calls: list[str] = field(default_factory=list)
    stop: str = ""  # recommend | end | length | tool_cap | error
    error: str | None = None
    seconds: float = 0.0


class Student:
    """A student model bound to the evidence store of the task set it answers."""

    def __init__(self, model: ChatModel, store: EvidenceStore,
                 fmt: StudentFormatConfig | None = None,
                 config: StudentConfig | None = None, plan_choices: Sequence[str] = (),
                 reflection_cap: int | None = None) -> None:
        self.model = model
        self.store = store
        self.fmt = fmt or StudentFormatConfig()
        self.config = config or StudentConfig()
        self.plan_choices = tuple(plan_choices)
        self.reflection_cap = reflection_cap

    def shown(self, task: Task) -> Task:
        """The task as the model sees it: candidates in `format.candidate_order`."""
        return present(task, self.store, self.fmt.candidate_order)

    def prompt(self, task: Task) -> str:
        """The exact text the model continues: its chat template over the student prompt."""
        return self._render(self.shown(task))

    def _render(self, shown: Task) -> str:
        return self.model.render_chat(prompt_messages(shown, self.store.title, self.fmt))

    def answer(self, task: Task) -> StudentAnswer:
        """One generation for `task`; labels in it name the candidates in the order the
        format shows them (`format.candidate_order`, `format.labels`), rankings are items."""
        started = time.perf_counter()
        shown = self.shown(task)
        prompt = self._render(shown)
        tools = ToolExecutor(self.store, shown, label_style=self.fmt.labels)
        labels = format_labels(self.fmt, len(shown.candidates))
        answer = StudentAnswer(text="", parsed=ParsedOutput(), ranking=None,
                               completed=complete_ranking(None, task.candidates))
        # an ablated student without tools gets no look-ups: its calls stay plain text
        stop = list(STOP_STRINGS) if self.fmt.tools else [close_tag(RECOMMEND)]
        refused = 0
        n = len(shown.candidates)
        constrain = self.config.constrain and self.model.supports(
            PermutationConstraint(n, style=self.fmt.labels))
        # every runnable call on what the prompt shows, written as training wrote them
        # (default arguments filled in, those a schema rejects left out): what a broken call
        # is decoded again among, and, by its longest option, a bound past which a call
        # cannot be runnable (the option's bytes, each at least one token)
        choosing = constrain and self.model.supports(ChoiceConstraint(()))
        offered = task_tool_calls(tool_specs(), shown, self.store, self.fmt.history_items,
                                  executor=tools) if choosing and self.fmt.tools else []
        calls = tuple(call.json() for call in offered)
        call_cap = ChoiceConstraint(calls).max_tokens + len(close_tag(TOOL_CALL))
        text = self._open_plan(prompt, answer) if constrain and self.fmt.plan else ""
        if answer.chosen_plan:
            text += self._next_part(prompt, text, answer)
        while True:
            remaining = self._left(answer)
            if remaining <= 0:
                answer.stop = "length"
                break
            # a plan of the student's own and a reflection pause at their end, so what
            # follows is chosen too
            pausing = unclosed_tag(text) if choosing else None
            pausing = pausing if pausing in (PLAN, REFLECTION) else None
            limit = remaining
            if calls and text.endswith(open_tag(TOOL_CALL)):
                # a call opened by a choice may not ramble on (a 135M student can write an
                # item id of 12,000,000,...): cut at the bound, decoded again as a broken one
                limit = min(remaining, call_cap)
            elif pausing == REFLECTION and self.reflection_cap:
                # nor a reflection past the longest one it was trained on: the ranking follows
                limit = min(remaining, self.reflection_cap + len(close_tag(REFLECTION)))
            completion = self._decode(prompt + text, None, limit, answer,
                                      stop=stop + [close_tag(pausing)] if pausing else stop)
            if completion is None:
                answer.stop = "error"
                break
            text += completion.text
            pending = pending_tag(text)
            cut = completion.finish_reason == "length" and limit < remaining
            if completion.finish_reason == "length" and not (cut and pending in (TOOL_CALL, REFLECTION)):
                answer.stop = "length"
                break
            if pausing and pending == pausing:
                answer.reflection_cut = answer.reflection_cut or (cut and pausing == REFLECTION)
                text = closed(text, pausing)
                text += self._next_part(prompt, text, answer)
                continue
            if pending == RECOMMEND:
                text = closed(text, RECOMMEND)
                answer.stop = "recommend"
                break
            if pending != TOOL_CALL or not self.fmt.tools:
                answer.stop = "end"
                break
            text = closed(text, TOOL_CALL)
            if len(answer.tool_calls) >= self.config.max_tool_calls:
                refused += 1
                if refused > 1:
                    answer.stop = "tool_cap"
                    break
                response = Template(prompt_text("student_tool_limit.md").strip()).substitute(
                    limit=self.config.max_tool_calls)
            else:
                if constrain and self._left(answer) > 0 and not self._runnable(call_content(text), tools):
                    text = self._repair_call(prompt, text, calls, answer)
                response = self._execute(text, tools, answer.tool_calls)
            text += wrap(TOOL_RESPONSE, response)
            if constrain:
                text += self._next_part(prompt, text, answer)
        answer.parsed = parse_student_output(text, labels, plan=self.fmt.plan,
                                             tools=self.fmt.tools, reflection=self.fmt.reflection)
        if answer.repaired_calls:
            answer.parsed.well_formed = False
            answer.parsed.errors += [f"a tool call was decoded again; the student wrote {c!r}"
                                     for c in answer.repaired_calls]
        if constrain and answer.stop != "error" and sorted(answer.parsed.ranking or []) != list(range(n)):
            text = self._repair_ranking(prompt, text, n, answer)
            answer.ranking = self.item_ranking(parse_student_output(text, labels), shown)
        else:
            answer.ranking = self.item_ranking(answer.parsed, shown)
        answer.text = text
        # DESIGN.md 3.4: what is missing follows in the task file's presented order
        answer.completed = complete_ranking(answer.ranking, task.candidates)
        answer.seconds = time.perf_counter() - started
        return answer

    def _open_plan(self, prompt: str, answer: StudentAnswer) -> str:
        """`<plan>`, followed by a whole plan chosen among `plan_choices` under a mask
        where there are choices and the backend can enforce one; the plan is left to the
        student if the backend fails or answers outside them."""
        head = open_tag(PLAN)
        plan = self._choose(prompt + head, self.plan_choices, answer)
        if plan is None:
            return head
        answer.chosen_plan = True
        return head + plan + close_tag(PLAN)

    def _repair_ranking(self, prompt: str, text: str, n: int, answer: StudentAnswer) -> str:
        """`text` with its `<recommend>` list (or, without one, a new one after the text)
        decoded under a permutation mask; unchanged if the backend fails. A part left
        open is closed first, so the list parses as the answer's own part."""
        cut = text.rfind(open_tag(RECOMMEND))
        body = text[:cut] if cut >= 0 else text.rstrip()
        unclosed = pending_tag(body)
        if unclosed:
            body = closed(body.rstrip(), unclosed)
        head = body.rstrip() + "\n" + open_tag(RECOMMEND)
        completion = self._decode(prompt + head, PermutationConstraint(n, style=self.fmt.labels),
                                  6 * n + 8, answer)
        if completion is None:
            return text
        answer.repaired = True
        return head + completion.text + close_tag(RECOMMEND)

    def _next_part(self, prompt: str, text: str, answer: StudentAnswer) -> str:
        """The opening of the part that follows `text` (which ends a plan, a tool
        response or a reflection), chosen among those the format allows there: a tool call
        (while under `max_tool_calls`) or the reflection, the ranking where the format has
        no reflection; after a reflection only the ranking (appended, nothing to choose).
        "" with the budget spent, or where the backend cannot choose, fails or answers
        outside them: the student then writes it."""
        if self._left(answer) <= 0:
            return ""
        if REFLECTION in tags_written(text):
            return self._choose(prompt + text, (SEPARATOR + open_tag(RECOMMEND),), answer) or ""
        allowed = ((TOOL_CALL, self.fmt.tools and len(answer.tool_calls) < self.config.max_tool_calls),
                   (REFLECTION, self.fmt.reflection), (RECOMMEND, not self.fmt.reflection))
        return self._choose(prompt + text, tuple(SEPARATOR + open_tag(tag)
                                                 for tag, on in allowed if on), answer) or ""

    def _repair_call(self, prompt: str, text: str, calls: tuple[str, ...],
                     answer: StudentAnswer) -> str:
        """`text`, which ends with a broken tool call, with that call decoded again among
        `calls`, every runnable call on what the prompt shows; unchanged if the backend fails,
        cannot mask a choice, or answers outside the options."""
        start = call_start(text)
        chosen = self._choose(prompt + text[:start], calls, answer)
        if chosen is None:
            return text
        answer.repaired_calls.append(call_content(text))
        return text[:start] + chosen + close_tag(TOOL_CALL)

    def _choose(self, text: str, options: tuple[str, ...], answer: StudentAnswer) -> str | None:
        """The continuation of `text` decoded under a mask among `options` (a single
        option without decoding: there is nothing to choose); None where there are none,
        the backend cannot mask them, fails, or answers outside them."""
        constraint = ChoiceConstraint(options)
        if not options or not self.model.supports(constraint):
            return None
        if len(options) == 1:
            return options[0]
        completion = self._decode(text, constraint, constraint.max_tokens, answer)
        return completion.text if completion is not None and completion.text in options else None

    def _left(self, answer: StudentAnswer) -> int:
        """Tokens left of the pass's budget: choices and repairs are the student's tokens
        too (one under way may finish past the budget)."""
        return self.config.max_new_tokens - answer.completion_tokens

    def _decode(self, text: str, constraint: Constraint | None, max_tokens: int,
                answer: StudentAnswer, stop: list[str] | None = None) -> Completion | None:
        """One continuation of `text` (masked by `constraint`, sampled as the pass is),
        counted in `answer`; None (the error kept in `answer.error`) if the backend fails."""
        try:
            completion = self.model.complete(
                text, max_tokens=max_tokens, temperature=self.config.temperature, stop=stop,
                constraint=constraint, seed=self.config.seed)
        except LLMError as error:
            answer.error = str(error)
            return None
        answer.segments += 1
        answer.prompt_tokens += completion.prompt_tokens
        answer.completion_tokens += completion.completion_tokens
        return completion

    @staticmethod
    def _runnable(content: str, tools: ToolExecutor) -> bool:
        """Whether a call parses, its arguments pass the tool's schema, and the items it
        names exist (a 135M student writes ids such as 12345, and reads the error back
        without learning from it)."""
        try:
            call = parse_tool_call(content)
            arguments = tools.arguments_for(call.name, call.arguments)
        except (ValueError, ToolError):
            return False
        return not tools.unknown_items(arguments)

    @staticmethod
    def _execute(text: str, tools: ToolExecutor, calls: list[ExecutedCall]) -> str:
        """Run the call that ends `text`; a call that does not parse is answered with the
        parse error, as a tool error would be."""
        began = time.perf_counter()
        try:
            call = parse_tool_call(call_content(text))
        except ValueError as error:
            calls.append(ExecutedCall("", {}, False, time.perf_counter() - began))
            return f"Error: {error}"
        result = tools.call(call.name, call.arguments)
        calls.append(ExecutedCall(call.name, result.arguments or call.arguments, result.ok,
                                  result.seconds))
        return result.text

    @staticmethod
    def item_ranking(parsed: ParsedOutput, task: Task) -> list[str] | None:
        """Items of the labels written; a token that is no label becomes `#?`, which no
        candidate equals, so the evaluation counts the output invalid."""
        if parsed.ranking is None:
            return None
        n = len(task.candidates)
        return [task.candidates[i] if 0 <= i < n else "#?" for i in parsed.ranking]


def call_start(text: str) -> int:
    """Where the content of the last tool call in `text` begins."""
    return text.rfind(open_tag(TOOL_CALL)) + len(open_tag(TOOL_CALL))


def call_content(text: str) -> str:
    """What is inside the tool call that ends `text`."""
    return text[call_start(text): len(text) - len(close_tag(TOOL_CALL))]
