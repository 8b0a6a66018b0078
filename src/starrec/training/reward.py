"""The GRPO reward of DESIGN.md 3.6, as pure functions: R = R_format + R_outcome.

`R_outcome` is the task's own metric: 1, 2/3, 1/3 or 0 for the target at rank 1, within 3,
within 5 or elsewhere, which is the per-task AvgHR (the mean of HR@1, HR@3 and HR@5). It
is read from the completed ranking (DESIGN.md 3.4), the one the evaluation scores, so a
pass is rewarded for what it would be counted for.

`R_format` is +1 for a pass that is well formed *as the student wrote it* and -1
otherwise. What the runtime did for the student does not count as the student's: a pass
whose ranking or tool call a mask decoded again, a pass the runtime ended (the token
budget, the tool-call cap, a backend error), a reflection cut at its cap, or a part whose
closing tag the runtime wrote (the student ran out or stopped inside it) is malformed.
Duplicate or out-of-range labels are malformed (the parse says so). A choice the student
made under a mask among well-formed options (its plan among the card's plan choices, the
part that follows a tool response) is its own: the mask only kept it inside the format.

The ranking-head trainer (`starrec.training.rank`) uses the same tiers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from starrec.core.stats import bootstrap_ci

if TYPE_CHECKING:
    from starrec.inference.student import StudentAnswer

# (rank cut-off, reward): the target within the first `cut-off` ranks earns `reward`
OUTCOME_TIERS: tuple[tuple[int, float], ...] = ((1, 1.0), (3, 2 / 3), (5, 1 / 3))
FORMAT_GOOD = 1.0
FORMAT_BAD = -1.0
# how a pass can end without the student having finished it (StudentAnswer.stop)
RUNTIME_STOPS = ("length", "tool_cap", "error")


def outcome_reward(rank: int | None) -> float:
    """R_outcome of a 1-based target rank; None (the target is not ranked) earns 0."""
    if rank is None:
        return 0.0
    for cutoff, reward in OUTCOME_TIERS:
        if rank <= cutoff:
            return reward
    return 0.0


def outcome_rewards(ranks: Any) -> np.ndarray:
    """`outcome_reward` of every 1-based rank of an array (float64, same shape)."""
    ranks = np.asarray(ranks)
    return np.select([ranks <= cutoff for cutoff, _ in OUTCOME_TIERS],
                     [reward for _, reward in OUTCOME_TIERS], 0.0).astype(np.float64)


def target_rank(ranking: Sequence[str], target: str) -> int | None:
    """The 1-based position of `target` in `ranking`; None when it is not there."""
    try:
        return list(ranking).index(target) + 1
    except ValueError:
        return None


@dataclass(frozen=True)
class FormatVerdict:
    """Whether a pass was well formed as written, and every reason it was not."""

    well_formed: bool
    reasons: tuple[str, ...] = ()

    @property
    def reward(self) -> float:
        return format_reward(self.well_formed)


def format_reward(well_formed: bool) -> float:
    return FORMAT_GOOD if well_formed else FORMAT_BAD


def total_reward(rank: int | None, well_formed: bool) -> float:
    """R = R_outcome + R_format of one pass (DESIGN.md 3.6): what GRPO's two reward
    functions sum to."""
    return outcome_reward(rank) + format_reward(well_formed)


def judge_format(answer: StudentAnswer, n_candidates: int, *,
                 runtime_closed: Sequence[str] = ()) -> FormatVerdict:
    """The format verdict of one student pass (`starrec.inference.student.StudentAnswer`).

    `answer.parsed` is the parse of the text before the ranking repair, so its ranking is
    the one the student wrote. `runtime_closed` names the parts whose closing tag the
    runtime wrote rather than the student (the rollout knows, from which characters the
    model generated; `starrec.training.rollout`). A list sampled under the mask by design
    (`answer.explored`, GRPO's `explore_ranking`) is a permutation by construction, so
    the verdict then judges the rest of the pass."""
    parsed = answer.parsed
    reasons = list(parsed.errors)
    if not parsed.well_formed and not reasons:
        reasons.append("the output does not parse as the student format")
    ranking = parsed.ranking
    if ranking is not None and sorted(ranking) != list(range(n_candidates)):
        reasons.append(f"the ranking as written is not a permutation of the {n_candidates} "
                       "candidate labels (duplicate, missing or out-of-range labels)")
    if answer.repaired:
        reasons.append("the <recommend> list was decoded again under a permutation mask")
    if answer.repaired_calls and not any("decoded again" in r for r in reasons):
        reasons.append(f"{len(answer.repaired_calls)} tool call(s) decoded again under a mask")
    if answer.reflection_cut:
        reasons.append("the reflection ran past its cap and was cut")
    if answer.stop in RUNTIME_STOPS:
        reasons.append(f"the runtime ended the pass ({answer.stop})")
    reasons += [f"the runtime closed <{tag}>" for tag in runtime_closed]
    return FormatVerdict(not reasons, tuple(reasons))


def paired_ranks(ranks: Sequence[int], reference: Sequence[int], n_resamples: int = 1000,
                 seed: int = 0) -> dict[str, Any]:
    """Per-task AvgHR (x100) of `ranks` minus that of `reference` (the target's ranks on
    the same tasks, in the same order: step 0 of a curve, another system): the mean
    difference, its paired bootstrap 95% interval, wins / ties / losses."""
    if len(ranks) != len(reference):
        raise ValueError(f"{len(ranks)} ranks against {len(reference)} of the reference: "
                         "other tasks")
    difference = 100 * (np.array([outcome_reward(k) for k in ranks])
                        - np.array([outcome_reward(k) for k in reference]))
    low, high = bootstrap_ci(difference, n_resamples, seed)
    return {"difference": round(float(difference.mean()), 2),
            "ci95": [round(low, 2), round(high, 2)],
            "wins": int((difference > 0).sum()), "ties": int((difference == 0).sum()),
            "losses": int((difference < 0).sum())}


def compare_to_start(points: Sequence[dict[str, Any]]) -> None:
    """Adds `vs_step_0` (`paired_ranks`) to every valid-curve point after step 0 whose
    per-task `ranks` are as many as step 0's (GRPO's and the ranking head's curves)."""
    start = next((p for p in points if p["step"] == 0 and p.get("ranks")), None)
    for point in points:
        if (start is not None and point["step"] != 0 and point.get("ranks")
                and len(point["ranks"]) == len(start["ranks"])):
            point["vs_step_0"] = paired_ranks(point["ranks"], start["ranks"])
