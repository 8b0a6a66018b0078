"""The student as an evaluation `System` (`star eval --system star --model DIR`)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from starrec.config import StarConfig, StudentFormatConfig
from starrec.core import Recommendation, Task
from starrec.cst.store import EvidenceStore
from starrec.inference.rank_head import RankHeadSystem, head_system
from starrec.inference.student import Student
from starrec.llm.card import read_model_card

if TYPE_CHECKING:
    from starrec.llm.base import ChatModel

log = logging.getLogger(__name__)


class StarSystem:
    """The student's single pass per task. A pass is several generation requests (free
    continuations after each tool response, choices and repairs under masks), so its
    `llm_calls` and `generation_requests` count them, not the pass: the teacher / student
    cost ratio is then like for like (DESIGN.md 3.4)."""

    def __init__(self, student: Student, name: str = "star") -> None:
        self.student = student
        self.name = name

    def recommend(self, task: Task) -> Recommendation:
        answer = self.student.answer(task)
        return Recommendation(
            ranking=answer.ranking,
            llm_calls=answer.segments,
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
            # the order the prompt showed (student.format.candidate_order)
            shown=list(self.student.shown(task).candidates),
            # the parse is taken before the ranking repair; a repaired call already
            # made it not well formed
            well_formed=answer.parsed.well_formed and not answer.repaired,
            repaired=answer.repaired or bool(answer.repaired_calls),
            constrained=answer.repaired,  # the list decoded again under a permutation mask
            generation_requests=answer.segments,
        )


def star_mode(card_head_mode: str | None, mode: str) -> str:
    """The mode a student runs in: `student.mode`, where `auto` is the card's head mode
    for a model with a ranking head and `generate` otherwise."""
    if mode == "auto":
        return card_head_mode or "generate"
    return mode


def load_star_system(model: str | Path, store: EvidenceStore,
                     config: StarConfig) -> StarSystem | RankHeadSystem:
    """A student model folder (its star_model.json gives the format it was trained on) or
    any model spec, prompted zero-shot in the full format, bound to `store` (the store
    built for the task set being answered). With `student.mode` fast or reason (or auto
    on a card with a ranking head), the ranking is read from the label logits
    (`starrec.inference.rank_head`)."""
    from starrec.llm.models import load_chat_model

    card = read_model_card(model) if Path(model).is_dir() else None
    if card is None:
        log.warning("%s has no star_model.json: prompting it as an untrained student in the "
                    "full format", model)
    fmt = card.format if card is not None else StudentFormatConfig()
    plans = card.plan_choices if card is not None else []
    cap = card.max_reflection_tokens if card is not None else None
    head = card.head if card is not None else None
    mode = star_mode(head.mode if head is not None else None, config.student.mode)
    if mode in ("fast", "reason"):
        if head is None:
            log.warning("%s has no ranking head: reading label logits of an untrained head", model)
        return head_system(str(model), store, head, mode, config.student, fmt,
                           threads=config.student.llm.threads, plan_choices=plans,
                           reflection_cap=cap)
    chat_model = load_chat_model(str(model), config.student.llm)
    return StarSystem(Student(chat_model, store, fmt, config.student, plan_choices=plans,
                              reflection_cap=cap))
