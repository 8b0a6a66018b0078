"""`star_model.json`: what a student model folder is and how it must be prompted.

Written last into a finished model folder (a folder without it is an unfinished run).
Inference reads the student's format from it, so an ablated model is prompted and parsed
exactly as it was trained; GRPO reads it to continue from an SFT model; the model loader
follows its `base_model` to the GGUF an export copies. It lives with the loader, below
training (which writes it) and inference (which reads it).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError, field_validator

from starrec.config import StudentFormatConfig
from starrec.core.files import write_text_atomic
from starrec.core.resources import PROMPT_VERSION
from starrec.labels import LabelStyle

log = logging.getLogger(__name__)

CARD_FILE = "star_model.json"


class HeadSpec(BaseModel):
    """How a ranking head reads a ranking (`starrec.inference.rank_head`): the compact
    prompt it was trained on and the labels whose logits are its scores. Kept in the card
    so that inference renders exactly the prompt training saw."""

    mode: Literal["fast", "reason"] = "fast"  # the mode it was trained for (and defaults to)
    label_style: LabelStyle = "letters"
    labels: list[str] = []  # the label of each candidate position, as trained
    history_items: int = 5  # most recent history titles shown
    evidence_tokens: int = 40  # evidence per candidate, in tokenizer tokens; 0: titles only
    cst_rank: bool = False  # add the candidate's rank under the non-LLM cst ranker
    answer_prefix: str = "<recommend>["  # after the prompt; the label logits are read here
    # where a candidate's score is read: `label`, the logit of its label at the answer
    # position (one position, the model must point at a line); `line`, at the last token
    # of its own line, the logit of `score_token` (the end-of-sequence token when None),
    # a judgement of the line it has just read, still one forward pass
    readout: Literal["label", "line"] = "label"
    score_token: str | None = None
    # the evidence as sentences (the teacher's templates) or compact (n/N, plain ranks)
    evidence_style: Literal["sentences", "compact"] = "sentences"
    # the kinds of evidence clause shown (starrec.cst.verbalize.CLAUSE_KINDS), in priority
    # order within evidence_tokens; empty: all, in the verbalizer's order
    evidence_clauses: list[str] = []

    @field_validator("evidence_clauses")
    @classmethod
    def _known_clauses(cls, value: list[str]) -> list[str]:
        from starrec.cst.verbalize import CLAUSE_KINDS

        unknown = [kind for kind in value if kind not in CLAUSE_KINDS]
        if unknown or len(set(value)) != len(value):
            raise ValueError(f"evidence_clauses {value}: each at most once, among {list(CLAUSE_KINDS)}")
        return value


class ModelCard(BaseModel):
    kind: str = "star-student"
    stage: str  # sft | grpo | rank
    base_model: str  # the spec given (smollm2, a folder, a hub id)
    base_model_path: str  # what transformers loaded
    prompt_version: str = PROMPT_VERSION
    format: StudentFormatConfig = StudentFormatConfig()
    lora: bool = False
    merged: bool = True  # False: the folder holds a LoRA adapter over base_model_path
    # the plans its teacher's planner chose among (under mars.constrain), which inference
    # decodes the student's <plan> among; empty when the teacher wrote free plans
    plan_choices: list[str] = []
    # the longest <reflection> of its training data, in tokens: inference cuts a longer one
    # (a 135M student copies evidence into it until its budget runs out); None: no cut
    max_reflection_tokens: int | None = None
    data: dict[str, Any] = {}  # trajectory files, counts kept/dropped, examples, tokens
    training: dict[str, Any] = {}  # the settings used
    metrics: dict[str, Any] = {}  # steps, final train / eval loss, seconds
    created: str = ""
    # a ranking head (`star distill rank`): rankings are read from label logits; None: the
    # student writes its ranking
    head: HeadSpec | None = None


def write_model_card(folder: Path, card: ModelCard) -> Path:
    card.created = card.created or datetime.now(timezone.utc).isoformat(timespec="seconds")
    path = folder / CARD_FILE
    write_text_atomic(path, card.model_dump_json(indent=2) + "\n")
    return path


def read_model_card(folder: str | Path) -> ModelCard | None:
    """The card of a model folder; None when it has none (a plain base model)."""
    path = Path(folder) / CARD_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("prompt_version") in ("student-v1", "student-v2"):
            # their rankings are 0-based indices, which no label style reads back
            raise ValueError(f"{path}: this student ({raw['prompt_version']}) was trained to "
                             "rank with 0-based indices; retrain it with this version "
                             "(`star distill sft`)")
        card = ModelCard.model_validate(raw)
    except (json.JSONDecodeError, ValidationError, AttributeError) as error:
        raise ValueError(f"{path}: not a STAR model card ({error})") from None
    if card.prompt_version != PROMPT_VERSION:
        log.warning("%s was trained with prompt %s; this code renders %s", folder,
                    card.prompt_version, PROMPT_VERSION)
    return card
