"""The student as an evaluation `System` (`star eval --system star --model DIR`)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from starrec.config import StarConfig, StudentFormatConfig
from starrec.cst.store import EvidenceStore
from starrec.data.tasks import Task
from starrec.evaluation.runner import Recommendation
from starrec.inference.student import Student
from starrec.training.card import read_model_card

log = logging.getLogger(__name__)


class StarSystem:
    """One LLM call per task: the single pass (tool look-ups are not LLM calls, and the
    continuations after them belong to the same generation)."""

    def __init__(self, student: Student, name: str = "star") -> None:
        self.student = student
        self.name = name

    def recommend(self, task: Task) -> Recommendation:
        answer = self.student.answer(task)
        return Recommendation(
            ranking=answer.ranking,
            llm_calls=1,
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens,
            details={
                "text": answer.text,
                "tool_calls": [asdict(call) for call in answer.tool_calls],
                "well_formed": answer.parsed.well_formed,
                "errors": answer.parsed.errors,
                "stop": answer.stop,
                "error": answer.error,
                "segments": answer.segments,
                "repaired": answer.repaired,
                "repaired_calls": answer.repaired_calls,
                "chosen_plan": answer.chosen_plan,
                "reflection_cut": answer.reflection_cut,
            },
        )


def load_star_system(model: str | Path, store: EvidenceStore, config: StarConfig) -> StarSystem:
    """A student model folder (its star_model.json gives the format it was trained on) or
    any model spec, prompted zero-shot in the full format, bound to `store` (the store
    built for the task set being answered)."""
    from starrec.llm.models import load_chat_model

    card = read_model_card(model) if Path(model).is_dir() else None
    if card is None:
        log.warning("%s has no star_model.json: prompting it as an untrained student in the "
                    "full format", model)
    fmt = card.format if card is not None else StudentFormatConfig()
    chat_model = load_chat_model(str(model), config.llm)
    plans = card.plan_choices if card is not None else []
    cap = card.max_reflection_tokens if card is not None else None
    return StarSystem(Student(chat_model, store, fmt, config.student, plan_choices=plans,
                              reflection_cap=cap))
