"""Candidate labels: how a prompt names the candidates and a ranking refers to them.

DESIGN.md 3.5: labels are ones a small model does not miscount (1-based numbers or
letters, never 0-based indices) and, for the default letters, each is a single token of
the student's tokenizer, so that a ranking can also be read from the label logits at one
position. Code keeps 0-based indices internally; only text shows labels.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Literal

LabelStyle = Literal["letters", "numbers"]
LABEL_STYLES: tuple[str, ...] = ("letters", "numbers")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# characters a label list is written with, besides the labels' own
LIST_PUNCTUATION = frozenset(", []")


def candidate_labels(n: int, style: LabelStyle = "letters") -> tuple[str, ...]:
    """The labels of `n` candidates in presented order: A, B, ... or 1, 2, ..."""
    if n < 1:
        raise ValueError(f"need at least one candidate, got {n}")
    if style == "letters":
        if n > len(LETTERS):
            raise ValueError(f"letters label at most {len(LETTERS)} candidates, got {n}; "
                             "use labels: numbers")
        return tuple(LETTERS[:n])
    if style == "numbers":
        return tuple(str(i) for i in range(1, n + 1))
    raise ValueError(f"unknown label style {style!r}; expected one of {LABEL_STYLES}")


def label_list(indices: Iterable[int], labels: Sequence[str]) -> str:
    """`[C, A, B]`: the ranking (0-based indices) as the model writes it."""
    return "[" + ", ".join(labels[int(i)] for i in indices) + "]"


def example_list(labels: Sequence[str], k: int = 3) -> str:
    """A short example of a list in these labels, for prompts and error messages."""
    return "[" + ", ".join(labels[: min(k, len(labels))]) + (", ...]" if len(labels) > k else "]")


_ITEM = re.compile(r"[^,\[\]\s]+")


def read_labels(body: str, labels: Sequence[str]) -> tuple[list[int], list[str]]:
    """Indices of the labels written in `body` (the text inside a list's brackets, or a
    bare comma list), in order, duplicates kept; a token that is no label becomes -1.
    Also returns what keeps them from being a permutation of every label."""
    position = {label: i for i, label in enumerate(labels)}
    tokens = _ITEM.findall(body)
    indices = [position.get(token, -1) for token in tokens]
    errors: list[str] = []
    unknown = [t for t, i in zip(tokens, indices) if i < 0]
    if unknown:
        errors.append(f"not candidate labels: {unknown[:5]}")
    duplicates = sorted({labels[i] for i, c in Counter(indices).items() if c > 1 and i >= 0},
                        key=position.get)
    if duplicates:
        errors.append(f"duplicate labels {duplicates}")
    missing = [label for label in labels if position[label] not in set(indices)]
    if missing:
        errors.append(f"missing labels {missing}")
    return indices, errors
