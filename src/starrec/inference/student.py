"""Single-pass student inference: the whole answer of DESIGN.md 3.5 in one generation.

`Student.answer` runs a small state machine over the parts of the student's grammar
(`starrec.trajectories.grammar`: which part may follow which). Each state decodes its
part's segment and returns the next; a tool response is the runtime's: the generation
pauses at `</tool_call>`, the call runs against the CST store, the response is appended
and the same generation goes on. The pass ends at `</recommend>` ("recommend"), at the
end-of-turn token ("end"), with the token budget spent ("length"), at a backend error
("error"), or at the second call past `max_tool_calls`, the first one being answered
with a "limit reached" message ("tool_cap"). With `student.evidence` off (an ablation), a
call that runs is answered with a fixed line instead of its evidence: the student keeps
its calls and reads no CST evidence.

With `student.constrain` and a backend that masks tokens, the format's structure is
decoded under masks and its content left to the student (each is a way a trained 135M
student left the format: docs/experiment-log.md). A part's policy:

- plan: the pass opens with `<plan>`; the plan is one of the card's `plan_choices` (the
  plans its teacher's planner chose among), else the student's own, paused at `</plan>`;
- between parts: the next part's opening is chosen among those the grammar allows there
  (a single one follows without a decode);
- tool_call: cut past the longest runnable call (its bytes); a call that does not parse,
  fails its tool's schema or names an item that does not exist is decoded again as a
  choice among every runnable call on what the prompt shows;
- reflection: paused at `</reflection>`, cut past the card's `max_reflection_tokens`;
- recommend: a pass that ends without a permutation has its list decoded once more under
  `PermutationConstraint`, in place of the broken one or after the text.

`explore_ranking` is for GRPO's rollouts, never inference: a `<recommend>` list opened
under the masks is decoded under `PermutationConstraint` at that temperature from the
start (`explored`), so a group samples orders other than the one shown while the list's
tokens stay the model's own choices among the labels left.

Where nothing is chosen (no choice mask, a failing backend, an answer outside the
options), the student writes on and the part its text stops in is the next state;
pausing and the caps need a choice mask. `parsed.well_formed` (the GRPO
format reward) judges what the student wrote: it is parsed before the ranking repair,
and a repaired call makes it False; choices made under a mask are the student's own.
Choices and repairs are sampled as the pass is and count in its token budget (one under
way may finish past it). `prompt_tokens` sums the prompt each continuation sends, as
the backend reports it (an engine that keeps its KV cache computes only what is new).
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
    open_tag,
    parse_student_output,
    pending_tag,
    tags_written,
    wrap,
)
from starrec.trajectories.grammar import DONE, START, Grammar
from starrec.trajectories.serialize import format_labels, prompt_messages

# parts that pause at their closing tag under a choice mask, so that what follows is chosen
PAUSING = (PLAN, REFLECTION)


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
    explored: bool = False  # the <recommend> list was sampled under the mask (explore_ranking)
    # broken tool calls (their content as written) decoded again under a choice mask
    repaired_calls: list[str] = field(default_factory=list)
    stop: str = ""  # recommend | end | length | tool_cap | error
    error: str | None = None
    seconds: float = 0.0
    # (start, end) character spans of `text` the runtime wrote, not the model, in order and
    # apart: the tool responses (a limit message too), the `<plan>` a constrained pass
    # opens with, what followed as the only option without a decode (`\n<recommend>` after
    # a reflection; `</plan>` after a chosen plan), `\n<recommend>` before a repaired list,
    # and closing tags the pass added (a part cut at a cap, or a backend that drops its
    # stop string though the model wrote it). The rest the model sampled, under a mask or
    # not: what a trainer keeps in its loss.
    inserted: list[tuple[int, int]] = field(default_factory=list)


class Student:
    """A student model bound to the evidence store of the task set it answers."""

    def __init__(self, model: ChatModel, store: EvidenceStore,
                 fmt: StudentFormatConfig | None = None,
                 config: StudentConfig | None = None, plan_choices: Sequence[str] = (),
                 reflection_cap: int | None = None,
                 explore_ranking: float | None = None) -> None:
        self.model = model
        self.store = store
        self.fmt = fmt or StudentFormatConfig()
        self.config = config or StudentConfig()
        self.plan_choices = tuple(plan_choices)
        self.reflection_cap = reflection_cap
        self.explore_ranking = explore_ranking

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
        format shows them (`format.candidate_order`, `format.labels`), rankings are items.
        The state is the part the text is in: each step writes it and returns the next."""
        run = _Pass(self, task)
        part = START
        while part != DONE:
            part = run.step(part)
        return run.finish()

    @staticmethod
    def item_ranking(parsed: ParsedOutput, task: Task) -> list[str] | None:
        """Items of the labels written; a token that is no label becomes `#?`, which no
        candidate equals, so the evaluation counts the output invalid."""
        if parsed.ranking is None:
            return None
        n = len(task.candidates)
        return [task.candidates[i] if 0 <= i < n else "#?" for i in parsed.ranking]


class _Pass:
    """One pass of `Student.answer`: the text so far and the answer it fills. The state
    is the part the text is in (a name of `starrec.trajectories.grammar.PARTS`); `step`
    writes it (the student decodes it under its part's policy; a tool response is the
    runtime's) and returns the part that follows: the one `next` chose among those the
    grammar allows there or, where nothing was chosen, the one the student's own text
    stops in (`write(None)`)."""

    def __init__(self, student: Student, task: Task) -> None:
        self.started = time.perf_counter()
        self.student, self.task = student, task
        self.model, self.fmt, self.config = student.model, student.fmt, student.config
        self.shown = student.shown(task)
        self.prompt = student._render(self.shown)
        self.tools = ToolExecutor(student.store, self.shown, label_style=self.fmt.labels)
        self.grammar = Grammar.of(self.fmt, self.config.max_tool_calls)
        self.answer = StudentAnswer(text="", parsed=ParsedOutput(), ranking=None,
                                    completed=complete_ranking(None, task.candidates))
        self.text = ""
        self.refused = 0  # calls past the cap
        # an ablated student without tools gets no look-ups: its calls stay plain text
        self.stop = list(STOP_STRINGS) if self.fmt.tools else [close_tag(RECOMMEND)]
        self.n = len(self.shown.candidates)
        self.constrain = self.config.constrain and self.model.supports(
            PermutationConstraint(self.n, style=self.fmt.labels))
        self.choosing = self.constrain and self.model.supports(ChoiceConstraint(()))
        # every runnable call on what the prompt shows, written as training wrote them
        # (default arguments filled in, those a schema rejects left out): what a broken call
        # is decoded again among, and, by its longest option, a bound past which a call
        # cannot be runnable (the option's bytes, each at least one token)
        offered = task_tool_calls(tool_specs(), self.shown, student.store, self.fmt.history_items,
                                  executor=self.tools) if self.choosing and self.fmt.tools else []
        self.calls = tuple(call.json() for call in offered)
        self.call_cap = ChoiceConstraint(self.calls).max_tokens + len(close_tag(TOOL_CALL))

    def step(self, part: str) -> str:
        """Write `part` and return the part that follows."""
        if part == START:
            return self.open()
        if part == TOOL_RESPONSE:
            return self.respond()
        if part == RECOMMEND and self.constrain and self.student.explore_ranking is not None:
            return self.explore()
        return self.write(part)

    def open(self) -> str:
        """A constrained pass opens with `<plan>` and a plan chosen among the card's
        `plan_choices`, else the student's own (state plan); otherwise the student writes
        from the start."""
        if not (self.constrain and self.fmt.plan):
            return self.write(None)
        self.add(open_tag(PLAN), inserted=True)
        plan = self.choose(self.text, self.student.plan_choices)
        if plan is None:
            return PLAN
        self.answer.chosen_plan = True
        self.add(plan, inserted=len(self.student.plan_choices) == 1)
        self.add(close_tag(PLAN), inserted=True)
        return self.next(PLAN)

    def write(self, part: str | None) -> str:
        """The student writes on in `part` (which the pass opened) or, for None, in
        whatever part comes; the part its text stops in says what follows."""
        remaining = self.left()
        if remaining <= 0:
            return self.end("length")
        pausing = part if self.choosing and part in PAUSING else None
        limit = remaining
        if part == TOOL_CALL and self.calls:
            # a call opened by a choice may not ramble on (a 135M student can write an
            # item id of 12,000,000,...): cut at the bound, decoded again as a broken one
            limit = min(remaining, self.call_cap)
        elif pausing == REFLECTION and self.student.reflection_cap:
            # nor a reflection past the longest one it was trained on: the ranking follows
            limit = min(remaining, self.student.reflection_cap + len(close_tag(REFLECTION)))
        completion = self.decode(self.text, None, limit,
                                 stop=self.stop + [close_tag(pausing)] if pausing else self.stop)
        if completion is None:
            return self.end("error")
        self.add(completion.text)
        pending = pending_tag(self.text)
        cut = completion.finish_reason == "length" and limit < remaining  # at a cap
        if completion.finish_reason == "length" and not (cut and pending in (TOOL_CALL, REFLECTION)):
            return self.end("length")
        if pausing and pending == pausing:
            self.answer.reflection_cut |= cut and pausing == REFLECTION
            self.close(pausing)
            return self.next(pausing)
        if pending == RECOMMEND:
            self.close(RECOMMEND)
            return self.end("recommend")
        if pending != TOOL_CALL or not self.fmt.tools:
            return self.end("end")
        self.close(TOOL_CALL)
        return TOOL_RESPONSE

    def explore(self) -> str:
        """The opened `<recommend>` list sampled under the permutation mask at the
        student's `explore_ranking` temperature (GRPO's exploration of orders)."""
        if self.left() <= 0:
            return self.end("length")
        completion = self.decode_list(self.text, temperature=self.student.explore_ranking)
        if completion is None:
            return self.end("error")
        self.answer.explored = True
        self.add(completion.text)
        self.close(RECOMMEND)
        return self.end("recommend")

    def respond(self) -> str:
        """The runtime answers the call that ends the text: with its tool's response (a
        call that does not run decoded again first), or past the cap with a limit message
        once; the second call past it ends the pass."""
        if len(self.answer.tool_calls) >= self.config.max_tool_calls:
            self.refused += 1
            if self.refused > 1:
                return self.end("tool_cap")
            response = Template(prompt_text("student_tool_limit.md").strip()).substitute(
                limit=self.config.max_tool_calls)
        else:
            if self.constrain and self.left() > 0 and not _runnable(call_content(self.text), self.tools):
                self.repair_call()
            response = _execute(self.text, self.tools, self.answer.tool_calls)
            if not self.config.evidence and self.answer.tool_calls[-1].ok:
                response = prompt_text("student_no_evidence.md").strip()
        self.add(wrap(TOOL_RESPONSE, response), inserted=True)
        return self.next(TOOL_RESPONSE)

    def next(self, after: str) -> str:
        """The part after `after`, its opening chosen among those the grammar allows
        there (after a reflection anywhere in the text, only the ranking: a call written
        after it does not reopen the calls). Where nothing is chosen, the student writes on."""
        if self.constrain and self.left() > 0:
            if REFLECTION in tags_written(self.text):
                after = REFLECTION
            parts = self.grammar.follows(after, len(self.answer.tool_calls))
            openings = tuple(SEPARATOR + open_tag(part) for part in parts)
            chosen = self.choose(self.text, openings)
            if chosen is not None:
                self.add(chosen, inserted=len(openings) == 1)
                return parts[openings.index(chosen)]
        return self.write(None)

    def end(self, stop: str) -> str:
        self.answer.stop = stop
        return DONE

    def finish(self) -> StudentAnswer:
        """The answer: the text parsed as written, then a ranking that is not a
        permutation decoded again under a mask (the recommend part's policy)."""
        answer, fmt = self.answer, self.fmt
        labels = format_labels(fmt, self.n)
        answer.parsed = parse_student_output(self.text, labels, plan=fmt.plan, tools=fmt.tools,
                                             reflection=fmt.reflection)
        if answer.repaired_calls:
            answer.parsed.well_formed = False
            answer.parsed.errors += [f"a tool call was decoded again; the student wrote {c!r}"
                                     for c in answer.repaired_calls]
        if (self.constrain and answer.stop != "error"
                and sorted(answer.parsed.ranking or []) != list(range(self.n))):
            self.repair_ranking()
            answer.ranking = Student.item_ranking(parse_student_output(self.text, labels), self.shown)
        else:
            answer.ranking = Student.item_ranking(answer.parsed, self.shown)
        answer.text = self.text
        # DESIGN.md 3.4: what is missing follows in the task file's presented order
        answer.completed = complete_ranking(answer.ranking, self.task.candidates)
        answer.seconds = time.perf_counter() - self.started
        return answer

    # -- repairs -----------------------------------------------------------------------

    def repair_call(self) -> None:
        """The broken call that ends the text decoded again among `calls`, every runnable
        call on what the prompt shows; left as written if the backend fails, cannot mask
        a choice, or answers outside the options."""
        start = call_start(self.text)
        chosen = self.choose(self.text[:start], self.calls)
        if chosen is None:
            return
        self.answer.repaired_calls.append(call_content(self.text))
        self.cut(start)
        self.add(chosen, inserted=len(self.calls) == 1)
        self.add(close_tag(TOOL_CALL), inserted=True)

    def repair_ranking(self) -> None:
        """The `<recommend>` list (or, without one, a new one after the text) decoded under
        a permutation mask; the text is left as it is if the backend fails. A part left
        open is closed first, so the list parses as the answer's own part."""
        kept, opening = list_opening(self.text)
        completion = self.decode_list(kept + opening)
        if completion is None:
            return
        self.answer.repaired = True
        self.cut(len(kept))
        self.add(opening, inserted=True)
        self.add(completion.text)
        self.add(close_tag(RECOMMEND), inserted=True)

    # -- decoding and the text ---------------------------------------------------------

    def choose(self, text: str, options: tuple[str, ...]) -> str | None:
        """The continuation of `text` decoded under a mask among `options` (a single
        option without decoding: there is nothing to choose); None where there are none,
        the backend cannot mask them, fails, or answers outside them."""
        constraint = ChoiceConstraint(options)
        if not options or not self.model.supports(constraint):
            return None
        if len(options) == 1:
            return options[0]
        completion = self.decode(text, constraint, constraint.max_tokens)
        return completion.text if completion is not None and completion.text in options else None

    def decode_list(self, text: str, temperature: float | None = None) -> Completion | None:
        """A `<recommend>` list continuing `text`, decoded under the permutation mask of
        the shown candidates (a repair's, or exploration's at its own `temperature`)."""
        return self.decode(text, PermutationConstraint(self.n, style=self.fmt.labels),
                           list_budget(self.n), temperature=temperature)

    def left(self) -> int:
        """Tokens left of the pass's budget: choices and repairs are the student's tokens
        too (one under way may finish past the budget)."""
        return self.config.max_new_tokens - self.answer.completion_tokens

    def decode(self, text: str, constraint: Constraint | None, max_tokens: int,
               stop: list[str] | None = None, temperature: float | None = None
               ) -> Completion | None:
        """One continuation of the prompt and `text` (masked by `constraint`, sampled as
        the pass is unless `temperature` says otherwise), counted in the answer; None (the
        error kept) if the backend fails."""
        answer = self.answer
        temperature = self.config.temperature if temperature is None else temperature
        try:
            completion = self.model.complete(
                self.prompt + text, max_tokens=max_tokens, temperature=temperature,
                stop=stop, constraint=constraint, seed=self.config.seed)
        except LLMError as error:
            answer.error = str(error)
            return None
        answer.segments += 1
        answer.prompt_tokens += completion.prompt_tokens
        answer.completion_tokens += completion.completion_tokens
        return completion

    def add(self, text: str, inserted: bool = False) -> None:
        """Append `text`: the model's, or `inserted` by the runtime (kept as a span)."""
        start = len(self.text)
        self.text += text
        spans = self.answer.inserted
        if inserted and text:
            if spans and spans[-1][1] == start:
                spans[-1] = (spans[-1][0], len(self.text))
            else:
                spans.append((start, len(self.text)))

    def close(self, tag: str) -> None:
        """Close the `tag` part that ends the text, unless a backend that keeps its stop
        string already did."""
        if not self.text.endswith(close_tag(tag)):
            self.add(close_tag(tag), inserted=True)

    def cut(self, end: int) -> None:
        """Keep the text up to `end`: a repair replaces what follows."""
        self.text = self.text[:end]
        self.answer.inserted = [(s, min(e, end)) for s, e in self.answer.inserted if s < end]


def list_opening(text: str) -> tuple[str, str]:
    """Where a `<recommend>` list decoded again starts: the text before the last
    `<recommend>` (all of it if there is none), and the opening that follows it (a part
    left open closed first, so the list parses as the answer's own part)."""
    start = text.rfind(open_tag(RECOMMEND))
    kept = (text[:start] if start >= 0 else text).rstrip()
    unclosed = pending_tag(kept)
    opening = (close_tag(unclosed) if unclosed and not kept.endswith(close_tag(unclosed))
               else "") + SEPARATOR + open_tag(RECOMMEND)
    return kept, opening


def list_budget(n_candidates: int) -> int:
    """Tokens a masked list of `n_candidates` labels may take (labels, separators, the
    brackets)."""
    return 6 * n_candidates + 8


def _runnable(content: str, tools: ToolExecutor) -> bool:
    """Whether a call parses, its arguments pass the tool's schema, and the items it names
    exist (a 135M student writes ids such as 12345, and reads the error back without
    learning from it)."""
    try:
        call = parse_tool_call(content)
        arguments = tools.arguments_for(call.name, call.arguments)
    except (ValueError, ToolError):
        return False
    return not tools.unknown_items(arguments)


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


def call_start(text: str) -> int:
    """Where the content of the last tool call in `text` begins."""
    return text.rfind(open_tag(TOOL_CALL)) + len(open_tag(TOOL_CALL))


def call_content(text: str) -> str:
    """What is inside the tool call that ends `text`."""
    return text[call_start(text): len(text) - len(close_tag(TOOL_CALL))]
