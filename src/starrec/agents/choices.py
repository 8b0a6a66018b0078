"""Every well-formed answer a role may give, for decoding under `ChoiceConstraint`.

A 135M model cannot follow the planner, reflector or tool-call formats, so its
trajectories would hold no plan, no verdict and no tool call. With `mars.constrain`
(and a backend that can enforce a choice) those answers are picked among the options
below, and a tool call among the calls on what the prompt shows
(`starrec.cst.tools.task_tool_calls`, which the student's repairs share): the model
still decides which analysts, which verdict, which call on which item; the options only
guarantee that the decision is well-formed. Findings and the ranking stay free text and
a permutation.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations

from starrec.agents.prompts import roles


def plan_options(analysts: Sequence[str]) -> tuple[str, ...]:
    """Every non-empty set of analysts (config order), one `name: description` line each."""
    return tuple(
        "\n".join(f"{a}: {roles()[a].description}" for a in chosen)
        for size in range(len(analysts), 0, -1) for chosen in combinations(analysts, size))


def verdict_options(analysts: Sequence[str]) -> tuple[str, ...]:
    """ACCEPT, or one analyst sent back with its role's fixed request."""
    return ("ACCEPT", *(f"{a}: {roles()[a].revise}" for a in analysts))
