"""The student's grammar (DESIGN.md 3.5) as a table: which part may follow which.

    start -> plan -> (tool_call -> tool_response)* -> reflection -> recommend -> done

A format's switches leave parts out (`plan`, `tools`, `reflection`: the ablations), and
the tool-call cap ends the loop of calls. A part is named by its tag (`<plan>` is
"plan"); "start" and "done" are the two ends. `Grammar.table()` is the whole table, e.g.
for the full format under the cap:

    start          -> plan
    plan           -> tool_call | reflection
    tool_call      -> tool_response
    tool_response  -> tool_call | reflection
    reflection     -> recommend
    recommend      -> done

and without a reflection the ranking takes its place (`plan -> tool_call | recommend`).
The student's runtime (`starrec.inference.student`) chooses the next part among these
under a mask; the parser (`starrec.trajectories.format`) judges a whole sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

from starrec.config import StudentFormatConfig
from starrec.trajectories.format import PLAN, RECOMMEND, REFLECTION, TOOL_CALL, TOOL_RESPONSE

START, DONE = "start", "done"
PARTS = (START, PLAN, TOOL_CALL, TOOL_RESPONSE, REFLECTION, RECOMMEND, DONE)


@dataclass(frozen=True)
class Grammar:
    """The parts of one student format (False: the part is left out) and its cap on
    tool calls (None: no cap)."""

    plan: bool = True
    tools: bool = True
    reflection: bool = True
    max_tool_calls: int | None = None

    @classmethod
    def of(cls, fmt: StudentFormatConfig, max_tool_calls: int | None = None) -> Grammar:
        return cls(fmt.plan, fmt.tools, fmt.reflection, max_tool_calls)

    def table(self, calls: int = 0) -> dict[str, tuple[str, ...]]:
        """Each part and the parts that may follow it, after `calls` tool calls, in the
        order a choice offers them."""
        more = self.tools and (self.max_tool_calls is None or calls < self.max_tool_calls)
        # after the plan and after each response: another call, or the conclusion
        evidence = ((TOOL_CALL,) if more else ()) + ((REFLECTION,) if self.reflection else (RECOMMEND,))
        return {
            START: (PLAN,) if self.plan else evidence,
            PLAN: evidence,
            TOOL_CALL: (TOOL_RESPONSE,),
            TOOL_RESPONSE: evidence,
            REFLECTION: (RECOMMEND,),
            RECOMMEND: (DONE,),
            DONE: (),
        }

    def follows(self, part: str, calls: int = 0) -> tuple[str, ...]:
        """The parts that may follow `part` after `calls` tool calls."""
        return self.table(calls)[part]
