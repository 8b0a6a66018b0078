"""Any evaluated system, bound to a task set's data and evidence store, answering ad-hoc
requests: the library under `star serve` (HTTP) and `star recommend` (terminal).

A request becomes a `Task` like the ones the evaluation answers, so a served answer is
the evaluated system's answer, by the same code:

- the serving data is the test split's fit data (`fit_interactions(dataset, "test")`):
  every interaction before each user's leave-one-out test target, so a test target is
  never served as history nor counted as evidence (DESIGN.md 3.3). Baselines are fitted
  on it (`fit_recommender`) and the evidence store is the one `star eval` builds for the
  test task set, after the same leak check;
- a known user without an explicit history is answered from that user's sequence in the
  serving data; an explicit history (oldest first) overrides it;
- without candidates, a ranker proposes them: its top N over the catalogue minus the
  history (the system itself when it is a ranker, else `cst` over the same store), and
  the answer says which.

LLM systems (the `mars` teacher, a `star` student) hold in-process engines that are not
thread-safe: `RecommendService.concurrent` is False for them and the HTTP layer runs their
requests one at a time; rankers answer concurrently.

Micro-batching (`RecommendService.answer_many`): a system that gains from answering
several requests in one call says so in `batch_modes`: the student's ranking head in its
fast mode scores several prompts in one forward pass, and a ranker whose recommender has
`score_many` (SASRec) scores several users at once. A batch is answered as one call where it
can be; if that call fails, each of its requests is answered alone, so a bad request
fails only itself. Generation (the student's reason and generate modes, the teacher)
stays one request at a time.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np
from pydantic import BaseModel, Field

from starrec.api.runners import ApiError
from starrec.api.schemas import (
    Limits,
    RankedItem,
    Readiness,
    Reasoning,
    RecommendRequest,
    RecommendResponse,
    Timings,
    ToolCallRecord,
    Usage,
)
from starrec.config import StarConfig
from starrec.core import Task, ranked, score_order
from starrec.data.splits import fit_interactions
from starrec.data.tasks import MIN_CANDIDATES
from starrec.experiment import BASELINE_SYSTEMS, CST_SYSTEMS, LLM_SYSTEMS, RANKER_SYSTEMS, SYSTEMS
from starrec.llm.base import ServerUnavailable

if TYPE_CHECKING:
    from starrec.agents.mars import MarsTeacher
    from starrec.core import Recommender
    from starrec.cst.store import EvidenceStore
    from starrec.data.schema import Dataset
    from starrec.experiment import TaskSet
    from starrec.inference.rank_head import HeadAnswer, RankHeadSystem
    from starrec.inference.student import Student
    from starrec.llm.base import ChatModel

log = logging.getLogger(__name__)

SERVING_SPLIT = "test"
# how many unknown ids an error names; the count says how many there were
NAMED_IDS = 20


class ServiceError(ValueError):
    """A request the service cannot answer as asked: the client's to fix (HTTP 422).

    `code` is the machine-readable kind; unknown ids are named so that a client can tell
    a typo from a user or item the serving data does not hold."""

    def __init__(self, message: str, code: str = "invalid_request", *,
                 unknown_users: Sequence[str] = (), unknown_items: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.unknown_users = list(unknown_users)
        self.unknown_items = list(unknown_items)


class LLMUnavailable(ApiError):
    """No LLM server answered a request (`ServerUnavailable`): the service is up, the
    model server behind it is not. A 503 with `Retry-After`, so that a client retries,
    as it does when the queue is full, rather than reporting a fault of the service."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(503, "llm_unavailable", f"no LLM server answered this request; retry "
                         f"after {retry_after} s", {"Retry-After": str(retry_after)})


def _named(ids: Sequence[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:NAMED_IDS])
    more = f" and {len(ids) - NAMED_IDS} more" if len(ids) > NAMED_IDS else ""
    return f"{shown}{more}"


class ServiceLimits(BaseModel):
    """What one request may ask for. History and candidate counts bound the work of one
    request (an LLM prompt grows with both); the HTTP layer adds body size, queue and
    timeout (`starrec.api.app.ServerSettings`). A stored history is not bounded: it is
    the serving data's, not the client's."""

    max_history: int = Field(1000, ge=0)
    max_candidates: int = Field(100, ge=MIN_CANDIDATES)
    min_candidates: int = Field(MIN_CANDIDATES, ge=1)


# ---------------------------------------------------------------------------------------
# the data a service answers from


@dataclass
class ServingData:
    """A dataset cut for serving: the task set whose data and store the systems are
    bound to, every user's sequence in the split's fit data, and the catalogue."""

    dataset: Dataset
    tasks: list[Task]
    split: str = SERVING_SPLIT
    histories: dict[str, list[str]] = field(default_factory=dict)
    catalogue: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.histories:
            fit = fit_interactions(self.dataset, self.split)  # type: ignore[arg-type]
            self.histories = {str(u): list(items) for u, items in
                              fit.groupby("user", sort=False)["item"].agg(list).items()}
        if not self.catalogue:
            self.catalogue = [str(i) for i in self.dataset.items.index]
        # a dict, not a table look-up per ranked item: every response names its items
        self._titles = {item: self.dataset.title(item) for item in self.catalogue}

    def knows_item(self, item: str) -> bool:
        return item in self._titles

    def title(self, item: str) -> str:
        title = self._titles.get(item)
        return title if title is not None else f"item {item}"


def serving_data(dataset: str | Dataset, config: StarConfig | None = None,
                 tasks: list[Task] | None = None) -> ServingData:
    """The serving data of a dataset spec (loaded, its test task set prepared if needed,
    as `star eval` does: `starrec.experiment.load_task_set`) or of a loaded dataset (its
    test tasks built in memory unless given)."""
    from starrec.data.tasks import build_split_tasks

    config = config or StarConfig()
    if isinstance(dataset, str):
        from starrec.experiment import load_task_set, open_dataset

        spec = dataset
        dataset, _ = open_dataset(spec, config)
        if tasks is None:
            tasks = load_task_set(dataset, config, split=SERVING_SPLIT, spec=spec).tasks
    elif tasks is None:
        tasks = build_split_tasks(dataset, SERVING_SPLIT, seed=config.data.seed)
    splits = {t.split for t in tasks}
    if splits and splits != {SERVING_SPLIT}:
        raise ValueError(f"serving binds to the {SERVING_SPLIT} task set; these tasks are of "
                         f"{sorted(splits)}")
    return ServingData(dataset, tasks)


def serving_task_set(data: ServingData, dataset: str | None = None) -> TaskSet:
    """The serving data's task set, named by the dataset spec it was loaded from (which
    names the store's folder)."""
    from starrec.experiment import TaskSet

    return TaskSet(data.dataset, data.tasks, dataset or data.dataset.name)


def serving_store(data: ServingData, config: StarConfig, dataset: str | None = None,
                  path: Path | None = None, progress: bool = True) -> Path:
    """The evidence store of the serving task set, as `star eval --system cst` builds it
    (the same file is reused, `starrec.experiment.evidence_store_path`): each task user's
    interactions before the task's cutoff, checked to hold no target nor anything after
    it before it is built."""
    from starrec.experiment import evidence_store_path

    return evidence_store_path(serving_task_set(data, dataset), config, out=path,
                               progress=progress)


# ---------------------------------------------------------------------------------------
# systems, as a service sees them


@dataclass
class SystemAnswer:
    """One system's answer to one task: the full ranking (completed as the evaluation
    completes it, DESIGN.md 3.4), scores where the system has them, and what it read and
    wrote on the way (filled when asked to explain)."""

    ranking: list[str]
    scores: dict[str, float] | None = None
    valid: bool = True
    fallback: str | None = None
    evidence: list[str] | None = None
    reasoning: Reasoning | None = None
    tool_calls: list[ToolCallRecord] | None = None
    usage: Usage = field(default_factory=Usage)


class ServedSystem(Protocol):
    name: str
    kind: Literal["ranker", "llm"]
    modes: tuple[str, ...]
    batch_modes: tuple[str, ...]  # modes answered faster together (`answer_many`)
    max_candidates: int | None  # what its prompt can label; None: no bound of its own

    def answer(self, task: Task, mode: str, explain: bool) -> SystemAnswer: ...

    def answer_many(self, tasks: Sequence[Task], mode: str,
                    explain: Sequence[bool]) -> list[SystemAnswer]:
        """Answers of several tasks in one of `batch_modes`, in one call."""
        ...

    def warm_up(self) -> None: ...


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _evidence_lines(store: EvidenceStore, task: Task, labels: Sequence[str]) -> list[str]:
    """Each candidate's CST evidence sentence, opened by its label (as a prompt shows it)."""
    from starrec.cst.evidence import candidate_evidence
    from starrec.cst.verbalize import candidate_line

    return [candidate_line(label, e, len(task.history), store.title)
            for label, e in zip(labels, candidate_evidence(store, task))]


def _warm_store(store: EvidenceStore) -> None:
    """Build the store's lazy tables now (graph, item-user matrix, timeline, recent
    popularity, embeddings), not inside the first requests, and before concurrent
    requests could build them twice."""
    _ = store.graph, store.item_users, store.embeddings
    store.recent_percentiles(None)


BatchScorer = Callable[[Sequence[Task]], list[np.ndarray]]


def batch_scorer(recommender: Recommender) -> BatchScorer | None:
    """How `recommender` scores several tasks in one call where it gains from that (its
    `score_many`, same values as `score` on each), else None."""
    score_many = getattr(recommender, "score_many", None)
    return score_many if callable(score_many) else None


class RankerSystem:
    """A fitted score-based recommender (a baseline, or cst over its store). One that
    scores several users at once (`batch_scorer`) answers batches in one call."""

    kind: Literal["ranker", "llm"] = "ranker"
    modes = ("score",)
    max_candidates = None

    def __init__(self, recommender: Recommender, store: EvidenceStore | None = None) -> None:
        self.recommender = recommender
        self.name = recommender.name
        self.store = store  # cst's: its evidence is what it scores
        self._batch: BatchScorer | None = batch_scorer(recommender)
        self.batch_modes: tuple[str, ...] = self.modes if self._batch is not None else ()

    def _checked(self, task: Task, scores: np.ndarray) -> np.ndarray:
        scores = np.asarray(scores, dtype=float)
        if scores.shape != (len(task.candidates),):
            raise RuntimeError(f"{self.name}: {scores.shape} scores for "
                               f"{len(task.candidates)} candidates")
        return scores

    def scores(self, task: Task) -> np.ndarray:
        return self._checked(task, self.recommender.score(task))

    def scores_many(self, tasks: Sequence[Task]) -> list[np.ndarray]:
        if self._batch is None:
            return [self.scores(task) for task in tasks]
        scored = list(self._batch(list(tasks)))
        if len(scored) != len(tasks):
            raise RuntimeError(f"{self.name}: {len(scored)} score lists for {len(tasks)} tasks")
        return [self._checked(task, s) for task, s in zip(tasks, scored)]

    def _answer(self, task: Task, scores: np.ndarray, explain: bool) -> SystemAnswer:
        order = score_order(scores)  # ties keep the request's order
        evidence = None
        if explain and self.store is not None:
            from starrec.labels import candidate_labels

            evidence = _evidence_lines(self.store, task, candidate_labels(len(task.candidates),
                                                                         "numbers"))
        return SystemAnswer(
            ranking=[task.candidates[i] for i in order],
            scores={c: s for c, s in zip(task.candidates, (_finite(v) for v in scores))
                    if s is not None},
            evidence=evidence)

    def answer(self, task: Task, mode: str, explain: bool) -> SystemAnswer:
        return self._answer(task, self.scores(task), explain)

    def answer_many(self, tasks: Sequence[Task], mode: str,
                    explain: Sequence[bool]) -> list[SystemAnswer]:
        return [self._answer(task, scores, e)
                for task, scores, e in zip(tasks, self.scores_many(tasks), explain)]

    def top(self, task: Task, n: int) -> list[str]:
        """The `n` best of the task's candidates (the catalogue minus the history, when
        proposing), best first."""
        return self.top_many([task], [n])[0]

    def top_many(self, tasks: Sequence[Task], ns: Sequence[int]) -> list[list[str]]:
        return [ranked(task.candidates, scores)[:n]
                for task, n, scores in zip(tasks, ns, self.scores_many(tasks))]

    def warm_up(self) -> None:
        if self.store is not None:
            _warm_store(self.store)


def _label_capacity(style: str) -> int | None:
    from starrec.labels import LETTERS

    return len(LETTERS) if style == "letters" else None


class StudentSystem:
    """A distilled student: one pass per request (plan, tool calls answered from the
    store mid-generation, reflection, ranking)."""

    kind: Literal["ranker", "llm"] = "llm"
    modes = ("single_pass",)
    batch_modes: tuple[str, ...] = ()  # generation: one request at a time

    def __init__(self, student: Student, name: str = "star") -> None:
        self.student = student
        self.name = name
        self.max_candidates = _label_capacity(student.fmt.labels)

    def answer(self, task: Task, mode: str, explain: bool) -> SystemAnswer:
        answer = self.student.answer(task)
        parsed = answer.parsed
        calls = None
        if explain:
            executed = answer.tool_calls
            calls = [ToolCallRecord(
                name=c.name, arguments=c.arguments, response=c.response,
                ok=executed[i].ok if i < len(executed) else True,
                seconds=round(executed[i].seconds, 6) if i < len(executed) else None)
                for i, c in enumerate(parsed.tool_calls)]
        return SystemAnswer(
            ranking=answer.completed.ranking,
            valid=answer.completed.valid,
            fallback=(f"the pass ended in an error: {answer.error}" if answer.stop == "error"
                      else None),
            evidence=([line for c in parsed.tool_calls for line in (c.response or "").splitlines()
                       if line.strip()] if explain else None),
            reasoning=(Reasoning(plan=parsed.plan, reflection=parsed.reflection, text=answer.text)
                       if explain else None),
            tool_calls=calls,
            usage=Usage(llm_calls=answer.segments, prompt_tokens=answer.prompt_tokens,
                        completion_tokens=answer.completion_tokens))

    def warm_up(self) -> None:
        _warm_store(self.student.store)


class HeadSystem:
    """A student with a ranking head (`starrec.inference.rank_head`): `fast` reads the
    ranking from the label logits of one forward pass over a compact prompt, and scores
    several requests' prompts in one batched pass; `reason` (when the student was loaded
    in that mode) generates the reasoning first, one request at a time."""

    kind: Literal["ranker", "llm"] = "llm"
    batch_modes: tuple[str, ...] = ("fast",)

    def __init__(self, system: RankHeadSystem, name: str = "star") -> None:
        self.system = system
        self.name = name
        # the mode it was loaded in first (the default); fast needs only the head
        self.modes = tuple(dict.fromkeys((system.mode, "fast")))
        self.max_candidates = len(system.head.labels)

    def _answer(self, task: Task, answer: HeadAnswer, explain: bool) -> SystemAnswer:
        evidence = reasoning = None
        if explain:
            shown = replace(task, candidates=list(answer.shown))
            evidence = _evidence_lines(self.system.store, shown,
                                       self.system.head.labels[: len(shown.candidates)])
            text = answer.reasoning.get("text")
            reasoning = Reasoning(text=text) if text else None
        return SystemAnswer(
            ranking=answer.ranking,
            scores={c: s for c, s in zip(task.candidates, (_finite(v) for v in answer.scores))
                    if s is not None},
            evidence=evidence, reasoning=reasoning,
            usage=Usage(llm_calls=answer.segments + answer.passes,
                        prompt_tokens=answer.prompt_tokens,
                        completion_tokens=answer.completion_tokens))

    def answer(self, task: Task, mode: str, explain: bool) -> SystemAnswer:
        return self._answer(task, self.system.answer(task, mode), explain)

    def answer_many(self, tasks: Sequence[Task], mode: str,
                    explain: Sequence[bool]) -> list[SystemAnswer]:
        if mode != "fast":
            raise ValueError(f"{self.name} answers {mode!r} requests one at a time")
        return [self._answer(task, answer, e)
                for task, answer, e in zip(tasks, self.system.answer_many(tasks), explain)]

    def warm_up(self) -> None:
        _warm_store(self.system.store)


class TeacherSystem:
    """The MARS teacher: planner, analysts with tools, reflector, ranker per request."""

    kind: Literal["ranker", "llm"] = "llm"
    modes = ("multi_agent",)
    batch_modes: tuple[str, ...] = ()  # generation: one request at a time
    name = "mars"

    def __init__(self, teacher: MarsTeacher) -> None:
        self.teacher = teacher
        self.max_candidates = _label_capacity(teacher.config.labels)

    def answer(self, task: Task, mode: str, explain: bool) -> SystemAnswer:
        from starrec.agents.system import recommendation
        from starrec.core import complete_ranking

        run = self.teacher.run(task)
        answer = recommendation(run)
        completed = complete_ranking(answer.ranking, task.candidates)
        evidence = calls = reasoning = None
        if explain:
            from starrec.labels import candidate_labels

            shown_candidates = run.task.get("candidates") or task.candidates
            shown = Task(**{**run.task, "candidates": list(shown_candidates)})
            evidence = _evidence_lines(self.teacher.store, shown, candidate_labels(
                len(shown.candidates), self.teacher.config.labels))
            calls = [ToolCallRecord(name=s.tool or "", arguments=s.arguments or {},
                                    response=s.response, ok=s.ok, agent=s.agent,
                                    seconds=round(s.seconds, 6))
                     for s in run.steps if s.kind == "tool"]
            reasoning = Reasoning(plan=run.plan or None, findings=dict(run.findings),
                                  reflection=run.reflection or None)
        return SystemAnswer(
            ranking=completed.ranking,
            valid=completed.valid and not answer.fallback,
            fallback=run.fallback,
            evidence=evidence, reasoning=reasoning, tool_calls=calls,
            usage=Usage(llm_calls=run.llm_calls, prompt_tokens=run.prompt_tokens,
                        completion_tokens=run.completion_tokens))

    def warm_up(self) -> None:
        _warm_store(self.teacher.store)


# ---------------------------------------------------------------------------------------
# the service


@dataclass
class PreparedRequest:
    """A request checked against the limits and the serving data, ready to answer."""

    user_id: str | None
    history: list[str]
    history_source: Literal["request", "stored"]
    candidates: list[str] | None
    mode: str
    explain: bool
    n_candidates: int

    def task(self, candidates: list[str]) -> Task:
        """The request as a task. Its target is unknown (empty): nothing that answers a
        task reads it. No cutoff time: recent popularity counts up to the end of the
        serving data, the latest it holds."""
        return Task(task_id=f"serve-{self.user_id or 'anonymous'}", user_id=self.user_id or "",
                    scenario="classic", history=list(self.history), candidates=list(candidates),
                    target="", split=SERVING_SPLIT)


class RecommendService:
    """One system bound to its serving data, answering `RecommendRequest`s.

    `prepare` checks a request (cheap, no system call; raises `ServiceError`), `answer`
    runs the system; `recommend` does both. Thread-safety is the caller's: call `answer`
    from one thread at a time unless `concurrent`."""

    def __init__(self, system: ServedSystem, data: ServingData,
                 limits: ServiceLimits | None = None, proposer: RankerSystem | None = None,
                 retry_after_s: int = 10) -> None:
        self.system = system
        self.data = data
        self.limits = limits or ServiceLimits()
        self.proposer = proposer
        self.retry_after_s = retry_after_s  # told to clients when no LLM server answers
        cap = system.max_candidates
        self.max_candidates = min(self.limits.max_candidates, cap or self.limits.max_candidates)

    @property
    def name(self) -> str:
        return self.system.name

    @property
    def concurrent(self) -> bool:
        """Whether requests may run in parallel threads (rankers); an LLM system's
        in-process engine is not thread-safe."""
        return self.system.kind == "ranker"

    def prepare(self, request: RecommendRequest) -> PreparedRequest:
        """The request checked against the limits and the serving data, before any
        system work, so that a bad request costs no queue slot: ServiceError naming the
        mode, limit or ids at fault."""
        limits = self.limits
        options = request.options
        modes = self.system.modes
        mode = options.mode or modes[0]
        if mode not in modes:
            raise ServiceError(f"{self.name} has no mode {mode!r}; its modes: {', '.join(modes)}",
                               "invalid_mode")
        if request.history is not None:
            if len(request.history) > limits.max_history:
                raise ServiceError(f"history has {len(request.history)} items; at most "
                                   f"{limits.max_history} are accepted", "too_many_history_items")
            history, source = list(request.history), "request"
        else:
            stored = self.data.histories.get(request.user_id or "")
            if stored is None:
                raise ServiceError(f"unknown user id {request.user_id!r} (not in the serving "
                                   "data); send a history to answer a new user", "unknown_ids",
                                   unknown_users=[request.user_id or ""])
            history, source = stored, "stored"
        candidates = request.candidates
        if candidates is not None:
            if not (limits.min_candidates <= len(candidates) <= self.max_candidates):
                raise ServiceError(
                    f"{len(candidates)} candidates; {self.name} ranks "
                    f"{limits.min_candidates} to {self.max_candidates}", "candidate_count")
            repeated = sorted(c for c, n in Counter(candidates).items() if n > 1)
            if repeated:
                raise ServiceError(f"candidates repeat {_named(repeated)}", "duplicate_candidates")
        elif not (limits.min_candidates <= options.n_candidates <= self.max_candidates):
            raise ServiceError(f"n_candidates {options.n_candidates}; {self.name} ranks "
                               f"{limits.min_candidates} to {self.max_candidates}", "candidate_count")
        unknown = list(dict.fromkeys(
            i for i in [*(history if source == "request" else ()), *(candidates or ())]
            if not self.data.knows_item(i)))
        if unknown:
            raise ServiceError(f"unknown item ids: {_named(unknown)} (not in the catalogue)",
                               "unknown_ids", unknown_items=unknown)
        return PreparedRequest(request.user_id, history, source,
                               list(candidates) if candidates is not None else None,
                               mode, options.explain, options.n_candidates)

    def _pool(self, request: PreparedRequest) -> list[str]:
        """What a proposer picks from: the catalogue minus the history."""
        if self.proposer is None:
            raise ServiceError(f"{self.name} has no proposer: send candidates", "no_proposer")
        seen = set(request.history)
        pool = [i for i in self.data.catalogue if i not in seen]
        if len(pool) < self.limits.min_candidates:
            raise ServiceError(f"the catalogue holds {len(pool)} items outside the history; "
                               f"nothing to rank", "candidate_count")
        return pool

    def propose(self, request: PreparedRequest) -> list[str]:
        """The proposer's top `n_candidates` of the catalogue minus the history."""
        pool = self._pool(request)
        assert self.proposer is not None
        return self.proposer.top(request.task(pool), request.n_candidates)

    def answer(self, request: PreparedRequest) -> RecommendResponse:
        start = time.perf_counter()
        candidates = request.candidates
        source: Literal["request", "proposed"] = "request"
        if candidates is None:
            candidates, source = self.propose(request), "proposed"
        proposed = time.perf_counter()
        try:
            result = self.system.answer(request.task(candidates), request.mode, request.explain)
        except ServerUnavailable as error:
            raise self._unavailable(error) from None
        done = time.perf_counter()
        return self._response(request, source, result, Timings(
            total_ms=_ms(done - start), propose_ms=_ms(proposed - start),
            rank_ms=_ms(done - proposed)))

    def _response(self, request: PreparedRequest, source: Literal["request", "proposed"],
                  result: SystemAnswer, timings: Timings) -> RecommendResponse:
        scores = result.scores or {}
        return RecommendResponse(
            system=self.name, mode=request.mode, user_id=request.user_id,
            history_length=len(request.history), history_source=request.history_source,
            candidates_source=source,
            proposer=self.proposer.name if source == "proposed" and self.proposer else None,
            ranking=[RankedItem(rank=r, item_id=i, title=self.data.title(i), score=scores.get(i))
                     for r, i in enumerate(result.ranking, 1)],
            valid=result.valid, fallback=result.fallback,
            evidence=result.evidence, reasoning=result.reasoning, tool_calls=result.tool_calls,
            usage=result.usage, timings=timings)

    @property
    def batchable(self) -> bool:
        """Whether the system answers some of its modes faster in batches."""
        return bool(self.system.batch_modes)

    def answer_many(self, requests: Sequence[PreparedRequest]
                    ) -> list[RecommendResponse | Exception]:
        """Answers of several requests, each its response or its own error, in order.

        Requests in a mode of the system's `batch_modes` are answered in one call, the
        candidates of those without proposed in one call of the proposer where it scores
        batches; the rest one by one. When a batched call fails, each of its requests is
        answered alone, so that only a request that fails alone gets an error. Timings
        are the batch's: every request of it waited for all of it."""
        start = time.perf_counter()
        n = len(requests)
        out: list[RecommendResponse | Exception | None] = [None] * n
        candidates: list[list[str] | None] = [r.candidates for r in requests]
        to_propose = [i for i, r in enumerate(requests) if r.candidates is None]
        for i, proposal in zip(to_propose, self._propose_many([requests[i] for i in to_propose])):
            if isinstance(proposal, Exception):
                out[i] = proposal
            else:
                candidates[i] = proposal
        proposed = time.perf_counter()

        results: list[SystemAnswer | Exception | None] = [None] * n
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            if out[i] is None:
                key = request.mode if request.mode in self.system.batch_modes else f"#{i}"
                groups.setdefault(key, []).append(i)
        for key, members in groups.items():
            tasks = [requests[i].task(candidates[i] or []) for i in members]
            answers = (self._batched(tasks, key, [requests[i].explain for i in members])
                       if not key.startswith("#") else None)
            if answers is None:  # alone: not batchable, or the batch failed
                answers = [self._alone(task, requests[i]) for task, i in zip(tasks, members)]
            for i, answer in zip(members, answers):
                results[i] = answer
        done = time.perf_counter()

        timings = dict(total_ms=_ms(done - start), propose_ms=_ms(proposed - start),
                       rank_ms=_ms(done - proposed), batch_size=n)
        for i, request in enumerate(requests):
            result = results[i]
            if out[i] is not None:
                continue
            if isinstance(result, Exception) or result is None:
                out[i] = result or RuntimeError("no answer")
                continue
            try:
                out[i] = self._response(request, "proposed" if request.candidates is None
                                        else "request", result, Timings(**timings))
            except Exception as error:  # noqa: BLE001 - this request's own error
                out[i] = error
        return out  # type: ignore[return-value]

    def _propose_many(self, requests: Sequence[PreparedRequest]) -> list[list[str] | Exception]:
        if not requests:
            return []
        if self.proposer is not None and self.proposer.batch_modes and len(requests) > 1:
            try:
                pools = [self._pool(r) for r in requests]
                return list(self.proposer.top_many([r.task(p) for r, p in zip(requests, pools)],
                                                   [r.n_candidates for r in requests]))
            except Exception:  # noqa: BLE001 - answered one by one below, each its own error
                log.warning("a batch of %d proposals failed; proposing one by one", len(requests),
                            exc_info=True)
        out: list[list[str] | Exception] = []
        for request in requests:
            try:
                out.append(self.propose(request))
            except Exception as error:  # noqa: BLE001 - this request's own error
                out.append(error)
        return out

    def _batched(self, tasks: list[Task], mode: str,
                 explain: list[bool]) -> list[SystemAnswer | Exception] | None:
        try:
            answers = self.system.answer_many(tasks, mode, explain)
        except ServerUnavailable as error:  # alone, each would wait for the same dead server
            return [self._unavailable(error) for _ in tasks]
        except Exception:  # noqa: BLE001 - the caller answers them one by one
            log.warning("a batch of %d %s requests failed; answering them one by one",
                        len(tasks), mode, exc_info=True)
            return None
        if len(answers) != len(tasks):
            log.warning("a batch of %d requests got %d answers; answering them one by one",
                        len(tasks), len(answers))
            return None
        return answers

    def _alone(self, task: Task, request: PreparedRequest) -> SystemAnswer | Exception:
        try:
            return self.system.answer(task, request.mode, request.explain)
        except ServerUnavailable as error:
            return self._unavailable(error)
        except Exception as error:  # noqa: BLE001 - this request's own error
            return error

    def _unavailable(self, error: ServerUnavailable) -> LLMUnavailable:
        """The client's 503; what failed (servers, attempts) goes to the log only."""
        log.warning("%s: no LLM server answered: %s", self.name, error,
                     extra={"event": "llm_unavailable", "system": self.name})
        return LLMUnavailable(self.retry_after_s)

    def recommend(self, request: RecommendRequest) -> RecommendResponse:
        """Check and answer one request in this thread (`star recommend`, tests)."""
        return self.answer(self.prepare(request))

    def warm_up(self) -> None:
        """Fill lazy caches before the first request: the stores' tables, and one small
        answer of each ranker."""
        self.system.warm_up()
        user, history = next(iter(self.data.histories.items()), ("", []))
        seen = set(history)
        pool = [i for i in self.data.catalogue if i not in seen][:2]
        rankers = [r for r in (self.system, self.proposer) if isinstance(r, RankerSystem)]
        for ranker in {id(r): r for r in rankers}.values():
            ranker.warm_up()
            if len(pool) == 2:
                ranker.answer(Task("warm-up", user, "classic", history, pool, ""), "score", False)

    def readiness(self, status: Literal["starting", "ready", "failed"] = "ready",
                  limits: Limits | None = None, message: str | None = None) -> Readiness:
        return Readiness(
            ready=status == "ready", status=status, system=self.name, kind=self.system.kind,
            modes=list(self.system.modes), proposer=self.proposer.name if self.proposer else None,
            catalogue_items=len(self.data.catalogue), known_users=len(self.data.histories),
            limits=limits or self.own_limits(), message=message)

    def own_limits(self) -> Limits:
        return Limits(max_history=self.limits.max_history, max_candidates=self.max_candidates,
                      min_candidates=self.limits.min_candidates)


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


# ---------------------------------------------------------------------------------------
# building a service by name


def make_ranker(name: str, data: ServingData, config: StarConfig,
                store: EvidenceStore | None = None, dataset: str | None = None) -> RankerSystem:
    """A baseline fitted on the serving split's fit data (leak-checked against its task
    set), or cst over `store`: the system `starrec.experiment.make_system` makes, seen
    by the service."""
    if name not in RANKER_SYSTEMS:
        raise ValueError(f"unknown ranker {name!r}; expected one of {', '.join(RANKER_SYSTEMS)}")
    if name in CST_SYSTEMS and store is None:
        raise ValueError("cst ranks from an evidence store; none given")
    from starrec.experiment import make_system

    start = time.perf_counter()
    system = make_system(name, serving_task_set(data, dataset), config, store=store)
    if name not in CST_SYSTEMS:
        log.info("%s fitted on the %s split's fit data in %.1f s", name, data.split,
                 time.perf_counter() - start)
    return RankerSystem(system.recommender, store if name in CST_SYSTEMS else None)  # type: ignore[attr-defined]


def make_llm_system(name: str, data: ServingData, store: EvidenceStore, config: StarConfig, *,
                    model: str | None = None, chat_model: ChatModel | None = None,
                    dataset: str | None = None) -> ServedSystem:
    """The teacher or a student bound to `store` (`starrec.experiment.make_system`), seen
    by the service. `model` is a model spec (a student folder for `star`, whose card
    gives the format it was trained on); `chat_model`, when given, is used instead of
    loading one (a server client, or a scripted model)."""
    if name not in LLM_SYSTEMS:
        raise ValueError(f"unknown LLM system {name!r}; expected one of {', '.join(LLM_SYSTEMS)}")
    from starrec.experiment import make_system

    system = make_system(name, serving_task_set(data, dataset), config, model, store=store,
                         chat_model=chat_model)
    if name == "star":
        from starrec.inference.rank_head import RankHeadSystem

        if isinstance(system, RankHeadSystem):
            return HeadSystem(system)
        return StudentSystem(system.student)  # type: ignore[attr-defined]
    return TeacherSystem(system.teacher)  # type: ignore[attr-defined]


def load_service(system: str, dataset: str | Dataset = "ml-100k", *,
                 config: StarConfig | None = None, model: str | None = None,
                 proposer: str | None = None, limits: ServiceLimits | None = None,
                 tasks: list[Task] | None = None, chat_model: ChatModel | None = None,
                 store_path: Path | None = None, progress: bool = True) -> RecommendService:
    """A service of `system` (a baseline, cst, mars or star) on `dataset` (a spec such
    as ml-100k, or a loaded dataset). `proposer` names the ranker that proposes
    candidates when a request has none (default: the system itself if it is a ranker,
    else cst). `store_path` places the evidence store (default: where `star eval` puts
    it). ValueError (DataError, LeakError) for bad input, LLMError for a model that
    cannot answer."""
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}; expected one of {', '.join(SYSTEMS)}")
    if proposer is not None and proposer not in RANKER_SYSTEMS:
        raise ValueError(f"unknown proposer {proposer!r}; expected one of "
                         f"{', '.join(RANKER_SYSTEMS)}")
    config = config or StarConfig()
    spec = dataset if isinstance(dataset, str) else None
    data = serving_data(dataset, config, tasks)
    proposer = proposer or (system if system in RANKER_SYSTEMS else "cst")
    store = None
    if {system, proposer} & set(CST_SYSTEMS) or system in LLM_SYSTEMS:
        from starrec.cst.store import EvidenceStore

        store = EvidenceStore(serving_store(data, config, spec, store_path, progress))
    rankers: dict[str, RankerSystem] = {}
    for name in dict.fromkeys(n for n in (system, proposer) if n in RANKER_SYSTEMS):
        rankers[name] = make_ranker(name, data, config, store, spec)
    served: ServedSystem
    if system in LLM_SYSTEMS:
        assert store is not None
        served = make_llm_system(system, data, store, config, model=model, chat_model=chat_model,
                                 dataset=spec)
    else:
        served = rankers[system]
    return RecommendService(served, data, limits, rankers[proposer],
                            retry_after_s=_retry_after(system, config))


def _retry_after(system: str, config: StarConfig) -> int:
    """Seconds a client waits when no LLM server answered: an endpoint taken out after
    failures is tried again after its cooldown (`starrec.llm.endpoints`)."""
    llm = config.mars.llm if system == "mars" else config.student.llm
    return max(1, math.ceil(llm.endpoint_cooldown_s))
