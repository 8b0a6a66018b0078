"""The teacher as an evaluation `System`: `star eval --system mars` and `star teach`
run the same `MarsTeacher.run`, and eval can keep its runs as trajectories too."""

from __future__ import annotations

from starrec.agents.mars import MarsTeacher
from starrec.data.tasks import Task
from starrec.evaluation.runner import Recommendation
from starrec.trajectories.recorder import TrajectoryWriter
from starrec.trajectories.schema import TeacherRun


def recommendation(run: TeacherRun) -> Recommendation:
    """A run as the evaluation sees it: a fallback ranking counts, but not as valid."""
    return Recommendation(
        ranking=list(run.ranking) or None,
        fallback=run.fallback is not None,
        llm_calls=run.llm_calls,
        prompt_tokens=run.prompt_tokens,
        completion_tokens=run.completion_tokens,
        details={"fallback": run.fallback, "status": run.status,
                 "tool_calls": run.tool_calls, "reflection_rounds": run.reflection_rounds},
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
