"""The teacher as an evaluation `System`: `star eval --system mars` and `star teach`
run the same `MarsTeacher.run`, and eval can keep its runs as trajectories too."""

from __future__ import annotations

from starrec.agents.mars import MarsTeacher
from starrec.core import Recommendation, Task
from starrec.trajectories.recorder import TrajectoryWriter
from starrec.trajectories.schema import TeacherRun


def recommendation(run: TeacherRun) -> Recommendation:
    """A run as the evaluation sees it: a fallback ranking counts, but not as valid.

    How the ranking came about is read from the run's recorded steps: its Ranker's LLM
    attempts (`kind == "llm"`, one per generation, with the parse error that led to a
    re-ask and whether the backend decoded it under a mask). A run is repaired when any
    Ranker attempt failed to parse or a fallback gave the ranking; it is well formed when
    the Ranker's first answer was a complete permutation as the model wrote it."""
    attempts = [s for s in run.steps if s.kind == "llm" and s.agent == "ranker"]
    fallback = run.fallback is not None
    repaired = fallback or any(s.error is not None for s in attempts)
    shown = list(run.task.get("candidates") or []) or None
    complete = shown is not None and sorted(run.ranking_indices) == list(range(len(shown)))
    return Recommendation(
        ranking=list(run.ranking) or None,
        fallback=fallback,
        llm_calls=run.llm_calls,
        prompt_tokens=run.prompt_tokens,
        completion_tokens=run.completion_tokens,
        details={"fallback": run.fallback, "status": run.status,
                 "tool_calls": run.tool_calls, "reflection_rounds": run.reflection_rounds},
        shown=shown,
        well_formed=bool(attempts) and not repaired and run.status == "ok" and complete,
        repaired=repaired,
        # the ranking in use was decoded under a permutation mask (none for a fallback)
        constrained=not fallback and bool(attempts) and attempts[-1].constrained,
        # every recorded LLM step is one generation request, repairs included
        generation_requests=sum(1 for s in run.steps if s.kind == "llm"),
    )


class MarsSystem:
    name = "mars"

    def __init__(self, teacher: MarsTeacher, writer: TrajectoryWriter | None = None) -> None:
        """`writer`, opened by the caller, receives every run (sample 0)."""
        self.teacher = teacher
        self.writer = writer

    def recommend(self, task: Task) -> Recommendation:
        run = self.teacher.run(task)
        if self.writer is not None:
            self.writer.append(run)
        return recommendation(run)
