"""A ranking head: the student's ranking read from its label logits at one position.

The prompt (recent history titles, candidates with single-token labels, a budgeted line
of CST evidence per candidate) is read once; at the answer position (after
`<recommend>[`) the logit of each candidate's label token is its score, and the ranking
sorts the scores, ties in the order shown. So a ranking costs one forward pass, no
decoding, is a permutation by construction (nothing to repair), and comes with scores
that NDCG and the service can use. Training (`starrec.training.rank`) pushes the
target's label up through the same `RankHead.label_logits`, so what is trained is
exactly what is read (LlamaRec's verbalizer). With the `line` readout (`HeadSpec.readout`)
each candidate's score is instead the logit of one score token at the last token of its
own line, in the same forward pass: a pointwise judgement of the line just read, trained
listwise.

Modes (`student.mode`):
- `fast`: the compact prompt of the card's `HeadSpec`, one forward pass;
- `reason`: the student's own generation (`Student`: plan, tool calls, reflection) runs
  as in `generate`, then the ranking is read from the head at the `<recommend>[`
  position of that text instead of the list it wrote.

Position debiasing (`student.debias_shuffles` = k > 1, fast mode): the label
log-probabilities are averaged over k seeded shuffles of the candidates (the first is
the shown order), as LLMRank's bootstrapping, in one batched forward pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from string import Template
from typing import Any

import numpy as np

from starrec.config import StudentConfig, StudentFormatConfig
from starrec.core import Recommendation, Task, ranked, score_order
from starrec.core.resources import prompt_text, scenarios
from starrec.cst.evidence import CandidateEvidence, candidate_evidence
from starrec.cst.ranker import CSTRanker
from starrec.cst.store import EvidenceStore
from starrec.cst.verbalize import candidate_clauses
from starrec.labels import candidate_labels
from starrec.llm.base import Message
from starrec.llm.card import HeadSpec

TokenCounter = Callable[[str], int]

def head_templates() -> tuple[str, Template]:
    """The fast mode's system message and user-message template (resources/prompts)."""
    return (prompt_text("head_system.md").strip(),
            Template(prompt_text("head_task.md").rstrip("\n")))


class LabelTokenError(ValueError):
    """A candidate label is not one token of the tokenizer where the head reads it: its
    logit would not be the label's score."""


def label_token_ids(tokenizer: Any, labels: Sequence[str], answer_prefix: str) -> list[int]:
    """The token id of each label as it follows `answer_prefix`; `LabelTokenError` where a
    label is several tokens, or merges with the prefix's end (then the text the head scores
    would not be the prompt followed by that token)."""
    head = tokenizer.encode(answer_prefix, add_special_tokens=False)
    ids: list[int] = []
    for label in labels:
        own = tokenizer.encode(label, add_special_tokens=False)
        if len(own) != 1:
            pieces = tokenizer.convert_ids_to_tokens(own)
            raise LabelTokenError(
                f"candidate label {label!r} is {len(own)} tokens of this tokenizer {pieces}; the "
                "ranking head reads one token per label: choose a label style whose labels are "
                "single tokens (letters for SmolLM2)")
        after = tokenizer.encode(answer_prefix + label, add_special_tokens=False)
        if after != head + own:
            raise LabelTokenError(
                f"candidate label {label!r} does not stay its own token after {answer_prefix!r} "
                f"({tokenizer.convert_ids_to_tokens(after)}); change the head's answer_prefix")
        ids.append(own[0])
    if len(set(ids)) != len(ids):
        raise LabelTokenError(f"two candidate labels share a token: {list(labels)}")
    return ids


def evidence_text(evidence: CandidateEvidence, n_history: int, titles: Callable[[str], str],
                  budget: int, count: TokenCounter, style: str = "sentences",
                  kinds: Sequence[str] = ()) -> str:
    """The candidate's CST evidence (`verbalize.candidate_clauses` in `style`; the clauses
    of `kinds` in that order, or all in the verbalizer's order) within `budget` tokens:
    whole clauses while they fit, the first one cut to the budget when none fits. The
    budget is per candidate because on a CPU the prompt's prefill is the head's whole
    cost."""
    if budget <= 0:
        return ""
    found = dict(candidate_clauses(evidence, n_history, titles, style))
    clauses = [found[k] for k in kinds if k in found] if kinds else list(found.values())
    if not clauses:
        return ""
    kept: list[str] = []
    for clause in clauses:
        if count("; ".join([*kept, clause])) > budget:
            break
        kept.append(clause)
    if not kept:
        words = clauses[0].split()
        while words and count(" ".join(words)) > budget:
            words.pop()
        kept = [" ".join(words)] if words else []
    return "; ".join(kept)


def head_messages(task: Task, store: EvidenceStore, spec: HeadSpec, labels: Sequence[str],
                  count: TokenCounter) -> list[Message]:
    """The compact prompt of the fast mode, in the candidates' order in `task`."""
    shown = task.history[-spec.history_items:] if spec.history_items > 0 else []
    evidence = candidate_evidence(store, task) if spec.evidence_tokens > 0 else []
    cst_rank: dict[int, int] = {}
    if spec.cst_rank:
        # the hand-set weights: a store's learned ranker exists only where one was fitted
        # into it (the eval stores, not the training folds), so it would change the
        # feature's meaning between training and inference
        order = score_order(CSTRanker.on_store(store, learned=False).score(task))
        cst_rank = {index: rank + 1 for rank, index in enumerate(order)}
    lines = []
    for j, (label, item) in enumerate(zip(labels, task.candidates)):
        parts = [store.title(item)]
        if evidence:
            text = evidence_text(evidence[j], len(task.history), store.title,
                                 spec.evidence_tokens, count, spec.evidence_style,
                                 spec.evidence_clauses)
            if text:
                parts.append(text)
        if cst_rank:
            parts.append(f"cst rank {cst_rank[j]}")
        lines.append(f"{label}: " + " | ".join(parts))
    scenario = scenarios().get(task.scenario, "")
    system, template = head_templates()
    user = template.substitute(
        scenario=f"{scenario}\n" if scenario else "", shown=len(shown), total=len(task.history),
        history="; ".join(store.title(item) for item in shown) or "(none)",
        candidates="\n".join(lines))
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def render_prompt(tokenizer: Any, messages: list[Message], answer_prefix: str) -> str:
    """The chat template over `messages` with the answer opened by `answer_prefix`; a
    plain text join for a tokenizer without a template (a base model)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = "\n\n".join(m["content"] for m in messages) + "\n\n"
    return text + answer_prefix


def shuffle_orders(n: int, k: int, seed: int, key: str) -> list[list[int]]:
    """k orders of n candidates: the identity, then k - 1 permutations seeded by `seed`
    and `key` (the task id), so a rerun shows the same shuffles."""
    import zlib

    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    orders = [list(range(n))]
    orders += [rng.permutation(n).tolist() for _ in range(max(k, 1) - 1)]
    return orders


class RankHead:
    """A causal LM (transformers, optionally PEFT-wrapped) and its tokenizer, read as a
    ranker. The same object scores at inference and computes the training loss."""

    def __init__(self, model: Any, tokenizer: Any, spec: HeadSpec | None = None,
                 n_candidates: int = 20) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.spec = spec or HeadSpec()
        self.labels = tuple(self.spec.labels) or candidate_labels(n_candidates, self.spec.label_style)
        if len(self.labels) < n_candidates:
            raise ValueError(f"the head has {len(self.labels)} labels for {n_candidates} candidates")
        self.label_ids = label_token_ids(tokenizer, self.labels, self.spec.answer_prefix)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.score_id: int | None = None
        if self.spec.readout == "line":
            token = self.spec.score_token
            ids = ([tokenizer.eos_token_id] if token is None
                   else tokenizer.encode(token, add_special_tokens=False))
            if len(ids) != 1 or ids[0] is None:
                raise LabelTokenError(f"score token {token!r} is not one token of this tokenizer")
            self.score_id = ids[0]

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def prompt(self, task: Task, store: EvidenceStore) -> str:
        """The fast mode's full text, ending at the answer position."""
        labels = self.labels[: len(task.candidates)]
        return render_prompt(self.tokenizer, head_messages(task, store, self.spec, labels, self.count),
                             self.spec.answer_prefix)

    def encode(self, texts: Sequence[str], offsets: bool = False) -> dict[str, Any]:
        """Left-padded ids with positions counted from each text's first real token, so a
        text scores the same alone and in a batch; with `offsets`, also each token's
        character span (`offset_mapping`, (0, 0) for padding), which is not a model input."""
        import torch

        side = self.tokenizer.padding_side
        self.tokenizer.padding_side = "left"
        try:
            enc = self.tokenizer(list(texts), add_special_tokens=False, padding=True,
                                 return_tensors="pt", return_offsets_mapping=offsets)
        finally:
            self.tokenizer.padding_side = side
        mask = enc["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        device = next(self.model.parameters()).device
        out = {"input_ids": enc["input_ids"].to(device), "attention_mask": mask.to(device),
               "position_ids": positions.to(device, dtype=torch.long)}
        if offsets:
            out["offset_mapping"] = enc["offset_mapping"].tolist()
        return out

    def line_ends(self, text: str, n: int,
                  offsets: Sequence[Sequence[int]] | None = None) -> list[int]:
        """The token index of the last token of each of the first n candidate lines, in
        `offsets` (the text's token spans, e.g. a left-padded row of `encode`) or in the
        text tokenized alone: the line of label L starts after a newline with `L: ` and
        ends before the next newline (titles and evidence hold no newline)."""
        if offsets is None:
            offsets = self.tokenizer(text, add_special_tokens=False,
                                     return_offsets_mapping=True)["offset_mapping"]
        ends, cursor = [], 0
        for label in self.labels[:n]:
            start = text.find(f"\n{label}: ", cursor)
            if start < 0:
                raise ValueError(f"no candidate line {label!r} in the prompt")
            end = text.find("\n", start + 1)
            last_char = (len(text) if end < 0 else end) - 1
            ends.append(next(i for i, (a, b) in enumerate(offsets) if a <= last_char < b))
            cursor = start + 1
        return ends

    def label_logits(self, texts: Sequence[str], n: int | None = None) -> Any:
        """(len(texts), n) candidate scores with gradients when enabled (training): the
        `label` readout's logits of the first n labels at each text's last position (only
        that position's logits are computed, `logits_to_keep=1`), or the `line` readout's
        score-token logit at each candidate line's last token (from the final hidden
        states, so no vocabulary-wide logits are formed there either)."""
        import torch

        n = n or len(self.labels)
        if self.score_id is None:
            out = self.model(**self.encode(texts), logits_to_keep=1)
            return out.logits[:, -1, self.label_ids[:n]].float()
        enc = self.encode(texts, offsets=True)
        spans = enc.pop("offset_mapping")
        out = self.model(**enc, logits_to_keep=1, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        rows = [self.line_ends(text, n, row) for text, row in zip(texts, spans)]
        index = torch.tensor(rows, device=hidden.device)
        picked = hidden[torch.arange(len(texts), device=hidden.device).unsqueeze(1), index]
        weight = self.model.get_output_embeddings().weight[self.score_id]
        return (picked @ weight).float()

    def scores(self, texts: Sequence[str], n: int) -> np.ndarray:
        """Label logits without gradients, as float64 numpy."""
        import torch

        with torch.inference_mode():
            return self.label_logits(texts, n).double().cpu().numpy()


def log_softmax(values: np.ndarray) -> np.ndarray:
    shifted = values - values.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


@dataclass
class HeadAnswer:
    """One task's head ranking. `scores` are per candidate in the task file's order: the
    label logit (one pass) or the mean label log-probability over the shuffles."""

    ranking: list[str]
    scores: list[float]
    shown: list[str]
    passes: int
    prompt_tokens: int
    completion_tokens: int = 0
    segments: int = 0
    seconds: float = 0.0
    reasoning: dict[str, Any] = field(default_factory=dict)


class RankHeadSystem:
    """`star eval --system star` for a model with a ranking head (`student.mode` fast or
    reason). Valid by construction: `well_formed`, never repaired."""

    def __init__(self, head: RankHead, store: EvidenceStore, mode: str = "fast",
                 shuffles: int = 1, seed: int = 0, student: Any | None = None,
                 name: str = "star") -> None:
        if mode not in ("fast", "reason"):
            raise ValueError(f"unknown head mode {mode!r}; expected fast or reason")
        if mode == "reason" and student is None:
            raise ValueError("the reason mode needs the student that generates the reasoning")
        if mode == "reason" and head.score_id is not None:
            raise ValueError("a line-readout head scores the lines of its own compact prompt; "
                             "the reason mode reads label logits after the student's text")
        if mode == "reason" and shuffles > 1:
            raise ValueError("position debiasing applies to the fast mode: the reasoning of the "
                             "reason mode names candidates by their labels in one order")
        self.head = head
        self.store = store
        self.mode = mode
        self.shuffles = max(1, shuffles)
        self.seed = seed
        self.student = student
        self.name = name

    def answer(self, task: Task, mode: str | None = None) -> HeadAnswer:
        """One task's answer in `mode` (default: the system's; the fast mode needs only
        the head, so a reason-mode system answers in both)."""
        mode = mode or self.mode
        if mode not in ("fast", "reason") or (mode == "reason" and self.student is None):
            raise ValueError(f"this head system answers in {self.mode!r} mode"
                             + (" and 'fast'" if self.mode == "reason" else "")
                             + f", not {mode!r}")
        started = time.perf_counter()
        answer = self._reason(task) if mode == "reason" else self._fast([task])[0]
        answer.seconds = time.perf_counter() - started
        return answer

    def answer_many(self, tasks: Sequence[Task]) -> list[HeadAnswer]:
        """Fast-mode answers of several tasks from one batched forward pass over all
        their prompts (each task's scores as alone, up to float rounding: its prompt is
        left-padded with positions from its own first token)."""
        started = time.perf_counter()
        answers = self._fast(tasks)
        seconds = time.perf_counter() - started
        for answer in answers:
            answer.seconds = seconds
        return answers

    def _fast(self, tasks: Sequence[Task]) -> list[HeadAnswer]:
        plans = []
        for task in tasks:
            n = len(task.candidates)
            orders = shuffle_orders(n, self.shuffles, self.seed, task.task_id)
            texts = [self.head.prompt(replace(task, candidates=[task.candidates[i] for i in order]),
                                      self.store) for order in orders]
            plans.append((task, orders, texts))
        if not plans:
            return []
        n_most = max(len(task.candidates) for task in tasks)
        logits = self.head.scores([text for _, _, texts in plans for text in texts], n_most)
        answers, row = [], 0
        for task, orders, texts in plans:
            n = len(task.candidates)
            own = logits[row: row + len(orders), :n]
            row += len(orders)
            if len(orders) == 1:
                scores = own[0]
            else:
                per_candidate = np.zeros((len(orders), n))
                for k, order in enumerate(orders):
                    per_candidate[k, order] = log_softmax(own[k])
                scores = per_candidate.mean(axis=0)
            ranking = ranked(task.candidates, scores)
            answers.append(HeadAnswer(ranking=ranking, scores=scores.tolist(),
                                      shown=list(task.candidates), passes=len(orders),
                                      prompt_tokens=sum(map(self.head.count, texts))))
        return answers

    def _reason(self, task: Task) -> HeadAnswer:
        from starrec.trajectories.format import RECOMMEND, closed, open_tag, pending_tag

        student = self.student
        generated = student.answer(task)
        shown = student.shown(task)
        text = generated.text
        cut = text.rfind(open_tag(RECOMMEND))
        body = (text[:cut] if cut >= 0 else text).rstrip()
        unclosed = pending_tag(body)
        if unclosed and unclosed != RECOMMEND:
            body = closed(body, unclosed)
        prefix = student.prompt(task) + body + "\n" + self.head.spec.answer_prefix
        n = len(shown.candidates)
        scores_shown = self.head.scores([prefix], n)[0]
        by_item = dict(zip(shown.candidates, scores_shown.tolist()))
        scores = [by_item[item] for item in task.candidates]
        ranking = ranked(shown.candidates, scores_shown)
        return HeadAnswer(
            ranking=ranking, scores=scores, shown=list(shown.candidates), passes=1,
            prompt_tokens=generated.prompt_tokens + self.head.count(prefix),
            completion_tokens=generated.completion_tokens, segments=generated.segments,
            # what the student generated up to the list (the list it wrote is not used)
            reasoning={"text": body, "stop": generated.stop,
                       "tool_calls": len(generated.tool_calls), "written": generated.ranking})

    def recommend(self, task: Task) -> Recommendation:
        answer = self.answer(task)
        return Recommendation(
            ranking=answer.ranking,
            llm_calls=answer.segments + answer.passes,
            prompt_tokens=answer.prompt_tokens,
            completion_tokens=answer.completion_tokens,
            details={"mode": self.mode, "scores": dict(zip(task.candidates, answer.scores)),
                     "labels": list(self.head.labels[: len(answer.shown)]),
                     "shuffles": self.shuffles, "passes": answer.passes, **answer.reasoning},
            shown=answer.shown,
            well_formed=True,
            generation_requests=answer.segments,
        )


def load_head(path: str, spec: HeadSpec | None = None, threads: int | None = None,
              n_candidates: int = 20) -> tuple[RankHead, Any]:
    """(head, chat model) of a model folder or spec (`smollm2`, a hub id, a .gguf), loaded
    once with transformers: the chat model (`HFChatModel`) shares the head's weights, for
    the reason mode's generation."""
    from starrec.llm.hf_backend import HFChatModel
    from starrec.llm.models import resolve_model_folder

    chat = HFChatModel.load(resolve_model_folder(path), threads=threads, name=path)
    return RankHead(chat.model, chat.tokenizer, spec, n_candidates), chat


def head_system(path: str, store: EvidenceStore, spec: HeadSpec | None, mode: str,
                config: StudentConfig, fmt: StudentFormatConfig | None = None,
                threads: int | None = None, plan_choices: Sequence[str] = (),
                reflection_cap: int | None = None) -> RankHeadSystem:
    """The head system of a model folder in `mode`; the reason mode's student is built on
    the same weights, in the card's student format."""
    from starrec.inference.student import Student

    head, chat = load_head(path, spec, threads)
    student = (Student(chat, store, fmt or StudentFormatConfig(), config,
                       plan_choices=plan_choices, reflection_cap=reflection_cap)
               if mode == "reason" else None)
    if student is not None:
        from starrec.trajectories.serialize import format_labels

        written = format_labels(student.fmt, len(head.labels))
        if written != tuple(head.labels):
            raise ValueError(f"the head reads the labels {list(head.labels)[:3]}... but the "
                             f"student's format writes {list(written)[:3]}...: the reason "
                             "mode needs one label style for both")
    return RankHeadSystem(head, store, mode=mode, shuffles=config.debias_shuffles,
                          seed=config.seed or 0, student=student)
