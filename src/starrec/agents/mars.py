"""MARS, the multi-agent teacher: plan, analyse with CST tools, reflect, rank.

One run per task: the Planner assigns analysts; each analyst works in a bounded tool
loop; the Reflector checks the findings against the evidence and may send analysts back
(`mars.reflection_rounds` times at most); the Ranker orders the candidates, decoded
under `PermutationConstraint` where the backend supports it (plans, verdicts and tool
calls under `ChoiceConstraint` with `mars.constrain`, see `starrec.agents.choices`).
The model sees the candidates in `mars.candidate_order` (by default the task file's
shuffled order, DESIGN.md 3.7), labelled in that order with `mars.labels`. The run is
recorded in full as a `TeacherRun`. Model misbehaviour never raises: unparsable answers
are repaired; a ranking that stays broken keeps what could be read of it, and what is
missing (everything, when the backend failed) follows in the task file's presented
order, a recorded fallback (DESIGN.md 3.4: never another ranker's order).
"""

from __future__ import annotations

import json
import logging
import time

from starrec.agents.answers import Verdict, parse_findings, parse_plan, parse_verdict
from starrec.agents.choices import plan_options, verdict_options
from starrec.agents.core import Agent, AgentSpec, BackendFailure, record_message
from starrec.agents.prompts import role_message, role_tool_specs, roles, snippet, team_prompt
from starrec.config import MarsConfig
from starrec.core import Task
from starrec.cst.ranker import present
from starrec.cst.store import EvidenceStore
from starrec.cst.tools import ToolExecutor, task_tool_calls
from starrec.labels import candidate_labels
from starrec.llm.base import ChatModel, ChoiceConstraint, PermutationConstraint, ServerUnavailable
from starrec.llm.structured import parse_ranking, ranking_prefix
from starrec.trajectories.schema import TeacherRun

log = logging.getLogger(__name__)

NO_FINDINGS = "(no findings)"
RANKING_OPENING = "<recommend>"  # the Ranker's answer starts as its prompt's example does


class MarsTeacher:
    def __init__(self, model: ChatModel, store: EvidenceStore, config: MarsConfig | None = None) -> None:
        self.model = model
        self.store = store
        self.config = config or MarsConfig()

    def run(self, task: Task, sample: int = 0, seed: int | None = None) -> TeacherRun:
        """One task, start to end, recorded in full. Never raises on what the model or
        its backend does (a bug in this code is recorded as status "error" as well), save
        `ServerUnavailable`: with no server answering, there is no run to record."""
        started = time.perf_counter()
        seed = self.config.seed + sample if seed is None else seed
        record = TeacherRun(
            task_id=task.task_id, task=json.loads(task.to_json()), model=self.model.name,
            # the teacher's settings as runs have always recorded them: its LLM's engine and
            # server are not the run's (the model's name is `model`)
            config={"mars": self.config.model_dump(exclude={"llm"}),
                    "cst_version": self.store.meta.get("version")},
            sample=sample, seed=seed)
        presented = list(task.candidates)
        shown = task
        try:
            # the record keeps the task as the model saw it: indices in the trajectory
            # number the candidates in that order (mars.candidate_order)
            shown = present(task, self.store, self.config.candidate_order)
            record.task = json.loads(shown.to_json())
            _Run(self, shown, record, presented).execute()
        except BackendFailure as error:
            self._fail(shown, presented, record, str(error))  # "backend error: ..."
        except ServerUnavailable:
            raise  # no server answers: the next task would fail alike, so the batch stops
        except Exception as error:  # one task's bug must not end a batch of hundreds
            log.exception("teacher run %s failed", record.key)
            self._fail(shown, presented, record, f"{type(error).__name__}: {error}")
        record.seconds = time.perf_counter() - started
        return record

    def _fail(self, shown: Task, presented: list[str], record: TeacherRun, reason: str) -> None:
        record.status, record.error = "error", reason
        if not record.ranking:
            set_fallback(shown, presented, record, [], reason, round=record.reflection_rounds)


def set_fallback(shown: Task, presented: list[str], record: TeacherRun, kept: list[int],
                 reason: str, round: int) -> None:
    """Record a ranking the model did not write in full: the candidates it did rank
    (`kept`, indices into `shown`), then the rest in the task file's `presented` order."""
    ranked = [shown.candidates[i] for i in kept]
    ranked += [item for item in presented if item not in set(ranked)]
    position = {item: i for i, item in enumerate(shown.candidates)}
    record.ranking = ranked
    record.ranking_indices = [position[item] for item in ranked]
    source = (f"the {len(kept)} candidates it ranked, then the rest in presented order"
              if kept else "presented order")
    record.fallback = f"{reason}; ranked by {source}"
    record_message(record, "ranker", round, "", parsed=record.ranking_indices,
                   error=record.fallback)


class _Run:
    """The state of one teacher run: the task's prompt blocks, the findings so far."""

    def __init__(self, teacher: MarsTeacher, task: Task, record: TeacherRun,
                 presented: list[str]) -> None:
        self.teacher = teacher
        self.config = teacher.config
        self.task = task  # as shown to the model
        self.presented = presented  # the task file's order, for a fallback
        self.record = record
        self.labels = candidate_labels(len(task.candidates), self.config.labels)
        store = teacher.store
        self.tools = ToolExecutor(store, task, budget=self.config.evidence_budget,
                                  label_style=self.config.labels)
        self.system = team_prompt(task, store, self.config.history_items,
                                  self.config.candidate_order, self.labels)

    def agent(self, role: str, tools: bool = False) -> Agent:
        c = self.config
        tokens = c.max_tokens.analyst if tools else getattr(c.max_tokens, role)
        spec = AgentSpec(role, tokens, max_turns=c.max_turns if tools else 1,
                         max_tool_calls=c.max_tool_calls if tools else 0, max_repairs=c.max_repairs)
        choices: list[str] = []
        if tools and c.constrain:  # the role's calls on what the prompt shows, as it writes them
            calls = task_tool_calls(role_tool_specs(role), self.task, self.teacher.store,
                                    c.history_items)
            choices = [call.render() for call in calls]
        return Agent(spec, self.teacher.model, self.record, self.system,
                     self.tools if tools else None,
                     c.temperature, self.record.seed, tool_choices=choices)

    def choice(self, options: tuple[str, ...]) -> ChoiceConstraint | None:
        return ChoiceConstraint(options) if self.config.constrain else None

    def execute(self) -> None:
        assigned = self.plan()
        for analyst, instruction in assigned.items():
            self.analyse(analyst, instruction, round=0)
        for round in range(1, self.config.reflection_rounds + 1):
            verdict = self.reflect(round)
            if verdict.accept:
                break
            for analyst, fix in verdict.revise.items():
                self.analyse(analyst, assigned.get(analyst, ""), round, fix=fix)
            self.record.reflection_rounds = round
        self.rank()

    def plan(self) -> dict[str, str]:
        analysts = self.config.analysts
        user = role_message(
            "planner", analysts="\n".join(f"- {a}: {roles()[a].description}" for a in analysts))
        result = self.agent("planner").run(user, lambda text: parse_plan(text, analysts),
                                           constraint=self.choice(plan_options(analysts)))
        self.record.plan = result.text
        error = None
        assigned = result.value
        if assigned is None:  # the plan used is every analyst on its own focus; say so
            assigned = {a: roles()[a].description for a in analysts}
            self.record.plan = plan_options(analysts)[0]
            error = f"{result.error}; every analyst assigned"
        record_message(self.record, "planner", 0, result.text, parsed=assigned, error=error)
        return assigned

    def analyse(self, analyst: str, instruction: str, round: int, fix: str | None = None) -> None:
        feedback = ""
        if fix is not None:
            previous = self.record.findings.get(analyst) or NO_FINDINGS
            feedback = "\n" + snippet("revise", fix=fix or "(no reason given)", previous=previous)
        user = role_message(
            analyst, instruction=instruction or "(none)", feedback=feedback)
        result = self.agent(analyst, tools=True).run(user, parse_findings, round=round)
        findings = result.value or ""
        self.record.findings[analyst] = findings
        record_message(self.record, analyst, round, findings,
                       parsed={"forced": result.forced}, error=result.error)

    def findings_block(self) -> str:
        return "\n".join(f"{name}: {' '.join((text or NO_FINDINGS).split())}"
                         for name, text in self.record.findings.items()) or NO_FINDINGS

    def reflect(self, round: int) -> Verdict:
        analysts = self.config.analysts
        user = role_message("reflector", findings=self.findings_block())
        result = self.agent("reflector").run(
            user, lambda text: parse_verdict(text, analysts), round=round,
            constraint=self.choice(verdict_options(list(self.record.findings))))
        self.record.reflection = result.text
        verdict = result.value
        error = None
        if verdict is None:
            verdict, error = Verdict(True), f"{result.error}; taken as ACCEPT"
            self.record.reflection = "ACCEPT"
        record_message(self.record, "reflector", round, result.text, parsed=verdict.as_dict(),
                       error=error)
        return verdict

    def rank(self) -> None:
        n = len(self.task.candidates)
        round = self.record.reflection_rounds
        labels = self.labels
        user = role_message("ranker", findings=self.findings_block(), n=n, first=labels[0],
                            last=labels[-1])
        constraint = PermutationConstraint(n, prefix=RANKING_OPENING, style=self.config.labels)
        result = self.agent("ranker").run(user, lambda text: parse_ranking(text, labels),
                                          round=round, constraint=constraint)
        if result.value is None:
            set_fallback(self.task, self.presented, self.record,
                         ranking_prefix(result.text, labels),
                         f"ranking unusable ({result.error})", round)
            return
        self.record.ranking_indices = result.value
        self.record.ranking = [self.task.candidates[i] for i in result.value]
        record_message(self.record, "ranker", round, result.text, parsed=result.value)
