"""Candidate labels (DESIGN.md 3.5): letters or 1-based numbers in prompts, rankings and
the permutation mask; 0-based indices only inside the code."""

from __future__ import annotations

import re

import numpy as np
import pytest

from starrec.labels import candidate_labels, example_list, label_list, read_labels
from starrec.llm.base import ChoiceConstraint, PermutationConstraint
from starrec.llm.constraints import (
    PermutationState,
    TokenVocab,
    gbnf_grammar,
    llamacpp_logits_processor,
    permutation_regex,
)


def test_labels_are_letters_or_numbers_from_one():
    assert candidate_labels(3) == ("A", "B", "C") and candidate_labels(20)[-1] == "T"
    assert candidate_labels(12, "numbers") == tuple(str(i) for i in range(1, 13))
    with pytest.raises(ValueError, match="at most 26"):
        candidate_labels(27)
    with pytest.raises(ValueError, match="unknown label style"):
        candidate_labels(3, "roman")  # type: ignore[arg-type]
    assert label_list([2, 0, 1], candidate_labels(3)) == "[C, A, B]"
    assert example_list(candidate_labels(20)) == "[A, B, C, ...]"


def test_read_labels_names_every_problem():
    labels = candidate_labels(4)
    assert read_labels("C, A, B, D", labels) == ([2, 0, 1, 3], [])
    indices, errors = read_labels("C, C, Z, 0", labels)
    assert indices == [2, 2, -1, -1]
    assert errors == ["not candidate labels: ['Z', '0']", "duplicate labels ['C']",
                      "missing labels ['A', 'B', 'D']"]


def _vocab(texts: list[str]) -> TokenVocab:
    return TokenVocab(size=200, eos_ids=(199,), list_tokens=dict(enumerate(texts)),
                      encode=lambda s: [ord(c) for c in s])


def _texts(state, vocab: TokenVocab) -> set[str]:
    return {vocab.list_tokens.get(int(i), "<eos>") for i in state.allowed()}


def _feed(state, vocab: TokenVocab, *texts: str) -> None:
    ids = {t: i for i, t in vocab.list_tokens.items()}
    for text in texts:
        state.advance(ids[text])


LETTER_TOKENS = ["[", "]", ",", " ", ", ", "],", *"ABCDEZ", " A", " B", "[A", "AB", "THE", "0"]


def test_letter_permutation_allows_only_unused_labels_then_closes():
    vocab = _vocab(LETTER_TOKENS)
    state = PermutationState(PermutationConstraint(3), vocab)
    assert _texts(state, vocab) == {"[", "[A"}
    _feed(state, vocab, "[", "B")
    assert _texts(state, vocab) == {",", ", "}  # a letter label is complete at once
    _feed(state, vocab, ", ")
    assert _texts(state, vocab) == {"A", "C"}  # B is used; D, E and Z are no labels
    _feed(state, vocab, "C", ",", " A")
    assert _texts(state, vocab) == {"]"}
    _feed(state, vocab, "]")
    assert _texts(state, vocab) == {"<eos>"}


def test_tokens_that_no_list_can_hold_are_left_out_once():
    vocab = _vocab(LETTER_TOKENS)
    state = PermutationState(PermutationConstraint(3), vocab)
    assert not {"AB", "THE", "0", "D", "Z"} & set(state.texts.values())


def test_number_permutation_counts_from_one():
    vocab = _vocab(["[", "]", ",", " ", ", ", *"0123456789", "12", " 1"])
    state = PermutationState(PermutationConstraint(12, style="numbers"), vocab)
    _feed(state, vocab, "[")
    assert "0" not in _texts(state, vocab)  # no label starts with 0
    _feed(state, vocab, "1")
    assert _texts(state, vocab) == {",", ", ", "0", "1", "2"}  # 1, or 10, 11, 12
    _feed(state, vocab, "2", ", ")
    for label in [*map(str, range(1, 10)), "10"]:
        _feed(state, vocab, label[0]) if len(label) == 1 else _feed(state, vocab, "1", "0")
        _feed(state, vocab, ",")
    _feed(state, vocab, " 1")
    assert _texts(state, vocab) == {"1"}  # only 11 is left; 1 and 12 are used
    _feed(state, vocab, "1")
    assert _texts(state, vocab) == {"]"}


def test_prefix_is_forced_token_by_token():
    vocab = _vocab(LETTER_TOKENS)
    state = PermutationState(PermutationConstraint(2, prefix="<r>"), vocab)
    for char in "<r>":
        assert state.allowed().tolist() == [ord(char)]
        state.advance(ord(char))
    _feed(state, vocab, "[", "B", ", ", "A", "]")
    assert _texts(state, vocab) == {"<eos>"}


def test_llamacpp_hook_writes_a_permutation_of_letters():
    vocab = _vocab(LETTER_TOKENS)
    hook = llamacpp_logits_processor(PermutationConstraint(4), vocab, prompt_len=3)
    ids, rng = [150, 151, 152], np.random.default_rng(0)
    while len(ids) < 40:
        token = int(np.argmax(hook(np.asarray(ids, dtype=np.intc), rng.normal(size=200).astype(np.float32))))
        if token == 199:
            break
        ids.append(token)
    text = "".join(vocab.list_tokens[i] for i in ids[3:])
    assert sorted(read_labels(text.strip("[]"), candidate_labels(4))[0]) == [0, 1, 2, 3], text


def test_server_side_grammars_have_the_right_shape():
    rx = re.compile(permutation_regex(PermutationConstraint(3)))
    assert rx.fullmatch("[C, A, B]") and not rx.fullmatch("[C, A]") and not rx.fullmatch("[D, A, B]")
    assert not rx.fullmatch("[2, 0, 1]")
    numbers = re.compile(permutation_regex(PermutationConstraint(3, style="numbers")))
    assert numbers.fullmatch("[3, 1, 2]") and not numbers.fullmatch("[2, 0, 1]")
    assert gbnf_grammar(ChoiceConstraint(('say "hi"', "b"))) == 'root ::= "say \\"hi\\"" | "b"'
    grammar = gbnf_grammar(PermutationConstraint(3))
    assert '("," " " num){2}' in grammar and 'num ::= "A" | "B" | "C"' in grammar
    tagged = re.compile(permutation_regex(PermutationConstraint(2, prefix="<recommend>")))
    assert tagged.fullmatch("<recommend>[B, A]") and not tagged.fullmatch("[B, A]")
    assert gbnf_grammar(PermutationConstraint(2, "<recommend>")).startswith('root ::= "<recommend>" "["')
