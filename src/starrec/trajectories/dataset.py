"""Serialized runs as a Hugging Face `datasets.Dataset` with the loss mask built in.

Each row keeps the chat form (`messages`: system, user, assistant) for people and other
trainers, and the tokenized form for SFT: `input_ids` and `labels`, where `labels` is
-100 on every position that must not be learned:

- the prompt (system and user turns, and the assistant header);
- every `<tool_response>...</tool_response>` span, the two tags included: the runtime
  appends them after `</tool_call>`, the student never writes them (DESIGN.md 3.5).

Everything else of the completion is trained, including the `<tool_call>` tags and the
newline after a tool response (the student writes those), and the chat template's
end-of-turn text after the answer, so the student learns to stop.

The text is tokenized piece by piece at the mask boundaries, so a token never straddles a
trained and a masked span; within a piece the tokenization is the tokenizer's own.
Sequences longer than `max_length` are dropped rather than cut: cutting the end would
train on answers without their ranking.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from datasets import Dataset

from starrec.llm.base import Message
from starrec.progress import progress
from starrec.trajectories.format import REFLECTION, part_content, tool_response_spans
from starrec.trajectories.serialize import SerializedRun

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


@dataclass
class ExportStats:
    examples: int = 0
    dropped_too_long: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    max_trained_tokens: int = 0  # of one sequence: what a student's token budget must allow
    max_reflection_tokens: int = 0  # of one <reflection>: past it a student's is cut


def _pieces(tokenizer, messages: list[Message], completion: str) -> list[tuple[str, bool]]:
    """(text, trained) pieces whose concatenation is the full chat text."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": completion}], tokenize=False)
    if not full.startswith(prompt + completion):
        raise ValueError("the chat template does not render the assistant answer verbatim after "
                         "the generation prompt; a loss mask cannot be placed on it")
    suffix = full[len(prompt) + len(completion):]
    pieces = [(prompt, False)]
    position = 0
    for start, end in tool_response_spans(completion):
        pieces += [(completion[position:start], True), (completion[start:end], False)]
        position = end
    pieces.append((completion[position:] + suffix, True))
    return [(text, trained) for text, trained in pieces if text]


def encode_example(tokenizer, messages: list[Message], completion: str) -> Encoded:
    """Token ids of prompt + completion and labels (-100 where nothing is learned)."""
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in _pieces(tokenizer, messages, completion):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    return Encoded(input_ids, labels)


def build_sft_dataset(runs: list[SerializedRun], tokenizer, max_length: int,
                      show_progress: bool = True) -> tuple[Dataset, ExportStats]:
    """Rows: task_id, sample, messages, completion, input_ids, labels. (Not to be taken
    for `starrec.data.schema.build_dataset`, which builds the interaction data.)"""
    rows: dict[str, list] = {k: [] for k in ("task_id", "sample", "messages", "completion",
                                             "input_ids", "labels")}
    stats = ExportStats()
    for run in progress(runs, "tokenize", unit="run", enabled=show_progress):
        encoded = encode_example(tokenizer, run.messages, run.completion)
        if len(encoded.input_ids) > max_length:
            stats.dropped_too_long += 1
            continue
        rows["task_id"].append(run.task_id)
        rows["sample"].append(run.sample)
        rows["messages"].append([*run.messages, {"role": "assistant", "content": run.completion}])
        rows["completion"].append(run.completion)
        rows["input_ids"].append(encoded.input_ids)
        rows["labels"].append(encoded.labels)
        stats.examples += 1
        stats.tokens += len(encoded.input_ids)
        trained = sum(label != IGNORE_INDEX for label in encoded.labels)
        stats.trained_tokens += trained
        stats.max_trained_tokens = max(stats.max_trained_tokens, trained)
        reflection = part_content(run.completion, REFLECTION)
        if reflection is not None:
            stats.max_reflection_tokens = max(stats.max_reflection_tokens, len(
                tokenizer(reflection, add_special_tokens=False)["input_ids"]))
    if stats.dropped_too_long:
        log.warning("dropped %d of %d sequences longer than %d tokens", stats.dropped_too_long,
                    len(runs), max_length)
    return Dataset.from_dict(rows), stats
