"""Constrained decoding by token masking, shared by the in-process backends.

A constraint becomes a small state machine over generated token ids (`ConstraintState`):
it says which token ids may come next and advances on the one that was picked. The
backends only translate it into their hook (a transformers `LogitsProcessor`, a
llama-cpp-python `logits_processor`), so both enforce exactly the same language.

Cost per step is independent of the vocabulary size: a choice is a trie over the options'
token ids; a permutation only ever considers the few vocabulary tokens made of digits,
spaces, commas and brackets (found once per tokenizer), and the mask is one vector op.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from starrec.labels import LETTERS, LIST_PUNCTUATION
from starrec.llm.base import ChoiceConstraint, Constraint, PermutationConstraint

# every character a label list can be written with (starrec.labels: digits or capitals)
LIST_CHARS = frozenset("0123456789" + LETTERS) | LIST_PUNCTUATION
# Raw vocabulary pieces can only spell LIST_CHARS if they use these characters: the
# byte-level BPE space "Ġ" and the sentencepiece space "▁" stand for " ".
_RAW_LIST_CHARS = LIST_CHARS | {"Ġ", "▁"}


@dataclass(frozen=True)
class TokenVocab:
    """What a constraint needs to know about a tokenizer."""

    size: int  # width of the logits vector (may exceed the tokenizer's length)
    eos_ids: tuple[int, ...]
    list_tokens: dict[int, str]  # token id -> exact text, for tokens spelling only LIST_CHARS
    encode: Callable[[str], list[int]]  # text -> token ids, no special tokens added


def find_list_tokens(pieces: Sequence[str], decode: Callable[[list[int]], str],
                     anchor: list[int]) -> dict[int, str]:
    """Exact text of every token that spells only digits, spaces, commas and brackets.

    `pieces` are the raw vocabulary strings (cheap pre-filter); the text is then read by
    decoding after an anchor token, because many decoders drop a leading space on the
    first token of a sequence.
    """
    prefix = decode(anchor)
    out: dict[int, str] = {}
    for token_id, piece in enumerate(pieces):
        if not piece or not set(piece) <= _RAW_LIST_CHARS:
            continue
        full = decode(anchor + [token_id])
        text = full[len(prefix):] if full.startswith(prefix) else ""
        if text and set(text) <= LIST_CHARS:
            out[token_id] = text
    return out


class ConstraintState(Protocol):
    def allowed(self) -> np.ndarray:
        """Token ids that may come next (never empty)."""

    def advance(self, token_id: int) -> None:
        """Consume the token that was generated."""


class ChoiceState:
    """Exactly one of the options, spelled with the tokenizer's own tokenization of it,
    then end of sequence."""

    def __init__(self, options: Sequence[str], vocab: TokenVocab) -> None:
        if not options:
            raise ValueError("ChoiceConstraint needs at least one option")
        # A trie node is a dict token id -> child; key None marks "an option ends here".
        self.root: dict = {}
        for option in options:
            ids = vocab.encode(option)
            if not ids:
                raise ValueError(f"option {option!r} encodes to no tokens")
            node = self.root
            for token_id in ids:
                node = node.setdefault(token_id, {})
            node[None] = True
        self.eos = np.asarray(vocab.eos_ids, dtype=np.int64)
        self.node: dict | None = self.root

    def allowed(self) -> np.ndarray:
        if self.node is None:  # left the trie (only possible if the hook was bypassed)
            return self.eos
        ids = np.fromiter((k for k in self.node if k is not None), dtype=np.int64)
        return np.concatenate([ids, self.eos]) if None in self.node else ids

    def advance(self, token_id: int) -> None:
        self.node = None if self.node is None else self.node.get(token_id)


# Permutation grammar, one character at a time:
#   "[" LABEL ("," " "? LABEL)* "]"  with every label exactly once.
_OPEN, _LABEL_START, _IN_LABEL, _AFTER_COMMA, _CLOSED = range(5)


@dataclass(frozen=True)
class _PermState:
    phase: int = _OPEN
    partial: str = ""  # the label being written
    used: frozenset[str] = frozenset()


class PermutationState:
    """`[l1, l2, ..., ln]`, every label of the constraint exactly once, then end of
    sequence."""

    def __init__(self, constraint: PermutationConstraint, vocab: TokenVocab) -> None:
        if constraint.n < 1:
            raise ValueError(f"PermutationConstraint needs n >= 1, got {constraint.n}")
        if not vocab.list_tokens:
            raise ValueError("the tokenizer has no tokens for labels/brackets/commas")
        self.labels = frozenset(constraint.labels)
        self.n = constraint.n
        # the prefix is written in its own tokenization, one forced token at a time
        self.forced = list(vocab.encode(constraint.prefix)) if constraint.prefix else []
        self.texts = _usable_tokens(vocab.list_tokens, constraint.labels)
        self.eos = np.asarray(vocab.eos_ids, dtype=np.int64)
        self.state: _PermState | None = _PermState()

    def _open_prefix(self, partial: str, used: frozenset[str]) -> bool:
        """Some unused label starts with `partial`."""
        return any(label.startswith(partial) for label in self.labels - used)

    def _step(self, s: _PermState, ch: str) -> _PermState | None:
        if s.phase == _OPEN:
            return _PermState(_LABEL_START, "", s.used) if ch == "[" else None
        if s.phase in (_LABEL_START, _AFTER_COMMA):
            if ch == " " and s.phase == _AFTER_COMMA:
                return _PermState(_LABEL_START, "", s.used)
            if ch not in LIST_PUNCTUATION and self._open_prefix(ch, s.used):
                return _PermState(_IN_LABEL, ch, s.used)
            return None
        if s.phase == _IN_LABEL:
            if ch not in LIST_PUNCTUATION:
                partial = s.partial + ch
                return _PermState(_IN_LABEL, partial, s.used) if self._open_prefix(partial, s.used) else None
            if s.partial not in self.labels or s.partial in s.used:
                return None
            used = s.used | {s.partial}
            if ch == "," and len(used) < self.n:
                return _PermState(_AFTER_COMMA, "", used)
            if ch == "]" and len(used) == self.n:
                return _PermState(_CLOSED, "", used)
            return None
        return None  # nothing may follow "]"

    def _feed(self, s: _PermState | None, text: str) -> _PermState | None:
        for ch in text:
            if s is None:
                return None
            s = self._step(s, ch)
        return s

    def allowed(self) -> np.ndarray:
        if self.forced:
            return np.asarray(self.forced[:1], dtype=np.int64)
        if self.state is None or self.state.phase == _CLOSED:
            return self.eos
        ids = [tid for tid, text in self.texts.items() if self._feed(self.state, text) is not None]
        # A tokenizer lacking some single character could strand the list; ending lets
        # the caller's validation and repair take over instead of looping.
        return np.asarray(ids, dtype=np.int64) if ids else self.eos

    def advance(self, token_id: int) -> None:
        if self.forced:
            self.forced.pop(0)  # `allowed` offered only this token
            return
        if self.state is not None and self.state.phase != _CLOSED:
            text = self.texts.get(token_id)
            self.state = None if text is None else self._feed(self.state, text)


def _usable_tokens(list_tokens: dict[int, str], labels: Sequence[str]) -> dict[int, str]:
    """The list tokens that could appear in some list of these labels: between separators
    only whole labels, at the edges a label's end or start. Checked once per constraint,
    so each step only looks at these few."""
    label_set = set(labels)
    out: dict[int, str] = {}
    for token_id, text in list_tokens.items():
        chunks = re.split(r"[, \[\]]", text)
        if len(chunks) == 1:
            ok = any(chunks[0] in label for label in labels)
        else:
            first, *middle, last = chunks
            ok = (all(not c or c in label_set for c in middle)
                  and (not first or any(label.endswith(first) for label in labels))
                  and (not last or any(label.startswith(last) for label in labels)))
        if ok:
            out[token_id] = text
    return out


def make_state(constraint: Constraint, vocab: TokenVocab) -> ConstraintState:
    if isinstance(constraint, ChoiceConstraint):
        return ChoiceState(constraint.options, vocab)
    if isinstance(constraint, PermutationConstraint):
        return PermutationState(constraint, vocab)
    raise TypeError(f"{type(constraint).__name__} cannot be enforced by token masking")


def maskable(constraint: Constraint) -> bool:
    """Whether `make_state` handles this constraint."""
    return isinstance(constraint, ChoiceConstraint | PermutationConstraint)


class SequenceMasker:
    """One state per sequence of a batch, fed with whatever was generated since the last
    call: the hooks see the whole token sequence (prompt included) at every step."""

    def __init__(self, make: Callable[[], ConstraintState], prompt_len: int) -> None:
        self.make = make
        self.prompt_len = prompt_len
        self.states: dict[int, tuple[ConstraintState, int]] = {}

    def allowed(self, row: int, ids: Sequence[int]) -> np.ndarray:
        state, seen = self.states.get(row) or (self.make(), 0)
        generated = ids[self.prompt_len:]
        for token_id in generated[seen:]:
            state.advance(int(token_id))
        self.states[row] = (state, len(generated))
        return state.allowed()


def hf_logits_processor(constraint: Constraint, vocab: TokenVocab, prompt_len: int):
    """A transformers `LogitsProcessor` enforcing `constraint` after `prompt_len` tokens."""
    import torch
    from transformers import LogitsProcessor

    class _Processor(LogitsProcessor):
        def __init__(self) -> None:
            self.masker = SequenceMasker(lambda: make_state(constraint, vocab), prompt_len)

        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
            mask = torch.full_like(scores, float("-inf"))
            for row in range(input_ids.shape[0]):
                allowed = self.masker.allowed(row, input_ids[row].tolist())
                mask[row, torch.from_numpy(allowed).to(scores.device)] = 0.0
            return scores + mask

    return _Processor()


def llamacpp_logits_processor(constraint: Constraint, vocab: TokenVocab, prompt_len: int):
    """A llama-cpp-python logits processor (`fn(input_ids, scores) -> scores`)."""
    masker = SequenceMasker(lambda: make_state(constraint, vocab), prompt_len)

    def process(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        masked = np.full_like(scores, -np.inf)
        allowed = masker.allowed(0, input_ids.tolist())
        masked[allowed] = scores[allowed]
        return masked

    return process


def permutation_regex(constraint: PermutationConstraint) -> str:
    """The shape of a permutation's text for servers that take a regex. It pins the
    count and the labels, not their distinctness: callers still validate."""
    n, prefix = constraint.n, constraint.prefix
    label = "(" + "|".join(re.escape(x) for x in constraint.labels) + ")"
    return re.escape(prefix) + r"\[" + label + ("(, " + label + "){" + str(n - 1) + "}" if n > 1 else "") + r"\]"


def _gbnf_literal(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def gbnf_grammar(constraint: ChoiceConstraint | PermutationConstraint) -> str:
    """A llama.cpp GBNF grammar for a choice (exact) or a permutation (shape only)."""
    if isinstance(constraint, ChoiceConstraint):
        return "root ::= " + " | ".join(_gbnf_literal(o) for o in constraint.options)
    n = constraint.n
    number = " | ".join(_gbnf_literal(label) for label in constraint.labels)
    repeat = f' ("," " " num){{{n - 1}}}' if n > 1 else ""
    opening = f"{_gbnf_literal(constraint.prefix)} " if constraint.prefix else ""
    return f'root ::= {opening}"[" num{repeat} "]"\nnum ::= {number}'
