"""Teacher runs and evaluation passes as a person reads them, and the counts about them.

Two files hold what an LLM system did on each task: a teacher's trajectories
(`star teach`, one `TeacherRun` a line) and an evaluation's records (`star eval
--records`, one `TaskRecord` a line after an identity line; a student's records keep its
pass text and tool calls in `details`). Both are read here into one shape, `RunView`, so
that the viewer (`starrec.api.viewer`, `star view`) lists and shows them alike, and so
that the counts the README states about runs (how many kept the shown order exactly,
how many were well formed, how many fell back) are computed by `summarize_runs`, not
counted by hand. This module needs no web stack: `star view FILE --summary` works
without the serve extra.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from starrec.agents.system import recommendation
from starrec.core.systems import complete_ranking
from starrec.evaluation.runner import IDENTITY_KEY, TaskRecord, read_records_file
from starrec.labels import LETTERS, candidate_labels
from starrec.trajectories.format import parse_student_output
from starrec.trajectories.recorder import read_runs
from starrec.trajectories.schema import Step, TeacherRun

Source = Literal["teacher", "records"]
OUTCOMES = ("hit@1", "hit@3", "hit@5", "miss")
# a candidate line of the teacher's shared system prompt: `[A] Title (id 123): ...`
# (starrec/resources/cst/templates.yaml, `candidate`)
_CANDIDATE_LINE = re.compile(r"^\[(?P<label>[^\]\s]+)\] (?P<title>.*) \(id (?P<item>[^)]*)\):",
                             re.MULTILINE)


def outcome_of(rank: int) -> str:
    """The tightest hit@k (k in 1, 3, 5) the target's rank makes, else "miss": the
    viewer's outcome filter, one value per run so that the filter partitions them."""
    for k in (1, 3, 5):
        if rank <= k:
            return f"hit@{k}"
    return "miss"


@dataclass
class ViewStep(Step):
    """A part of a student's pass as the viewer shows it, beside the teacher's `Step`s
    (whose fields it shares): `kind` is "plan", "tool", "reflection" or "recommend",
    read from the pass's text, and only a tool call has `seconds`."""

    kind: str  # type: ignore[assignment]
    agent: str = "student"
    seconds: float | None = None  # type: ignore[assignment]


@dataclass
class RankedItem:
    """A line of the final ranking: what the model saw (label, title) and whether it is
    the held-out target."""

    rank: int
    item_id: str
    label: str | None
    title: str | None
    target: bool
    score: float | None = None


@dataclass
class RunView:
    """One teacher run or one evaluated pass, as the viewer shows it. `key` identifies
    it among the runs loaded together (URL-safe); `kept_shown_order` is None where the
    shown order is not known (records written before it was kept)."""

    key: str
    source: Source
    system: str
    task_id: str
    sample: int
    target: str
    rank: int
    outcome: str
    well_formed: bool
    repaired: bool
    fallback: bool
    fallback_reason: str | None
    kept_shown_order: bool | None
    tool_calls: int
    llm_calls: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    status: str
    error: str | None
    user_id: str | None
    scenario: str | None
    history: list[str]
    shown: list[str]
    ranking: list[RankedItem]
    steps: list[Step] = field(default_factory=list)  # a teacher's as recorded, or ViewSteps
    plan: str | None = None
    findings: dict[str, str] = field(default_factory=dict)
    reflection: str | None = None
    text: str | None = None  # a student's pass as generated, tool responses included
    parse_errors: list[str] = field(default_factory=list)
    model: str | None = None

    def row(self) -> dict[str, Any]:
        """The run's line in a listing (no steps, no ranking)."""
        keep = ("key", "source", "system", "task_id", "sample", "target", "rank", "outcome",
                "well_formed", "repaired", "fallback", "kept_shown_order", "tool_calls",
                "llm_calls", "prompt_tokens", "completion_tokens", "seconds", "status")
        return {name: getattr(self, name) for name in keep}

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        for step in record["steps"]:
            del step["parsed"]  # a message's structured form: its `output` is what is shown
        return record


@dataclass
class RunsSummary:
    """The counts stated about a set of runs. Each is a number of runs (not a rate), so a
    sentence in the README can quote it as "n of N"."""

    runs: int
    systems: dict[str, int]
    kept_shown_order: int
    shown_order_unknown: int
    well_formed: int
    repaired: int
    fell_back: int
    errors: int
    hits: dict[str, int]  # hit@1, hit@3, hit@5 (cumulative, as the metric)
    tool_calls: int
    llm_calls: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# reading


def file_kind(path: Path) -> Source:
    """Whether `path` holds teacher trajectories or evaluation records, from its first
    line that is a JSON object: the two files are told apart by content, so `star view`
    needs no flag saying which one it was given."""
    with Path(path).open(encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                break
            if isinstance(value, dict):
                if IDENTITY_KEY in value or ("rank" in value and "target" in value):
                    return "records"
                if "steps" in value and "task" in value:
                    return "teacher"
            break
    raise ValueError(f"{path}: neither a teacher trajectories file (star teach) nor an "
                     "evaluation records file (star eval --records)")


def load_runs(paths: Sequence[Path | str]) -> list[RunView]:
    """Every run of every file, in file order; keys are unique across the files (a
    second file of the same system gets its keys suffixed)."""
    views: list[RunView] = []
    for path in map(Path, paths):
        views += read_run_views(path)
    seen: Counter[str] = Counter()
    for view in views:
        seen[view.key] += 1
        if seen[view.key] > 1:
            view.key = f"{view.key}~{seen[view.key]}"
    return views


def read_run_views(path: Path | str) -> list[RunView]:
    """The runs of one trajectories or records file."""
    path = Path(path)
    if file_kind(path) == "teacher":
        return [teacher_view(run) for run in read_runs(path)]
    records = read_records_file(path)
    system = records.identities[0].system if records.identities else path.stem
    return [record_view(record, system) for record in records.records.values()]


def _key(*parts: object) -> str:
    """A URL path segment: characters other than letters, digits and `._-` become `_`."""
    return "~".join(re.sub(r"[^A-Za-z0-9._-]", "_", str(p)) for p in parts)


def _titles(run: TeacherRun) -> dict[str, str]:
    """Candidate titles as the teacher's system prompt showed them, by item id."""
    shown = set(run.task.get("candidates") or ())
    for step in run.steps:
        for message in step.messages or ():
            if message.get("role") == "system" and message.get("content"):
                return {m["item"]: m["title"] for m in _CANDIDATE_LINE.finditer(message["content"])
                        if m["item"] in shown}
    return {}


def _labels(n: int, style: str = "letters") -> list[str]:
    if n == 0:
        return []
    if style == "letters" and n > len(LETTERS):
        style = "numbers"
    return list(candidate_labels(n, style))  # type: ignore[arg-type]


def _ranked(ranking: Sequence[str], shown: Sequence[str], target: str, labels: Sequence[str],
            titles: Mapping[str, str], scores: Mapping[str, float] | None = None
            ) -> list[RankedItem]:
    label = dict(zip(shown, labels))
    return [RankedItem(rank, item, label.get(item), titles.get(item), item == target,
                       (scores or {}).get(item))
            for rank, item in enumerate(ranking, start=1)]


def teacher_view(run: TeacherRun) -> RunView:
    """A teacher run: well formed, repaired and fallback as the evaluation counts them
    (`starrec.agents.system.recommendation`), so the viewer's counts are the results'."""
    answer = recommendation(run)
    shown = list(run.task.get("candidates") or ())
    target = str(run.task.get("target", ""))
    completed = complete_ranking(run.ranking or None, shown).ranking
    rank = completed.index(target) + 1 if target in completed else len(completed) + 1
    style = ((run.config or {}).get("mars") or {}).get("labels", "letters")
    return RunView(
        key=_key(run.task_id, run.sample), source="teacher", system="mars", model=run.model,
        task_id=run.task_id, sample=run.sample, target=target, rank=rank,
        outcome=outcome_of(rank), well_formed=bool(answer.well_formed),
        repaired=answer.repaired, fallback=answer.fallback, fallback_reason=run.fallback,
        kept_shown_order=bool(shown) and list(run.ranking) == shown,
        tool_calls=run.tool_calls, llm_calls=run.llm_calls, prompt_tokens=run.prompt_tokens,
        completion_tokens=run.completion_tokens, seconds=run.seconds, status=run.status,
        error=run.error, user_id=run.task.get("user_id"), scenario=run.task.get("scenario"),
        history=list(run.task.get("history") or ()), shown=shown,
        ranking=_ranked(completed, shown, target, _labels(len(shown), style), _titles(run)),
        steps=list(run.steps), plan=run.plan or None, findings=dict(run.findings),
        reflection=run.reflection or None)


def _student_steps(details: Mapping[str, Any], labels: Sequence[str]
                   ) -> tuple[list[Step], list[str]]:
    """A student's pass as its parts, in the grammar's order, with each tool call's
    response from the text and its timing from `details["tool_calls"]`; plus the parse
    errors (why it is not well formed)."""
    text = details.get("text")
    if not isinstance(text, str):
        return [], []
    parsed = parse_student_output(text, labels or 1)
    executed = [c for c in details.get("tool_calls") or () if isinstance(c, dict)]
    steps: list[Step] = []
    if parsed.plan is not None:
        steps.append(ViewStep("plan", output=parsed.plan))
    for n, call in enumerate(parsed.tool_calls):
        done = executed[n] if n < len(executed) else {}
        steps.append(ViewStep("tool", tool=call.name or done.get("name"),
                              arguments=call.arguments or done.get("arguments"),
                              response=call.response, ok=bool(done.get("ok", True)),
                              seconds=done.get("seconds")))
    if parsed.reflection is not None:
        steps.append(ViewStep("reflection", output=parsed.reflection))
    recommend = re.search(r"<recommend>(.*?)(?:</recommend>|$)", text, re.DOTALL)
    if recommend is not None:
        steps.append(ViewStep("recommend", output=recommend.group(1)))
    return steps, parsed.errors


def record_view(record: TaskRecord, system: str) -> RunView:
    """An evaluated pass. A student's record shows its pass read from `details["text"]`;
    a teacher's or a ranker's shows the counts only (a teacher's steps are in its
    trajectories file)."""
    details = record.details or {}
    shown = list(record.shown) if record.shown is not None else []
    tool_calls = details.get("tool_calls")
    n_tools = len(tool_calls) if isinstance(tool_calls, list) else int(tool_calls or 0)
    labels = _labels(len(shown) or len(record.ranking))
    steps, errors = _student_steps(details, labels)
    errors = errors or [str(e) for e in details.get("errors") or ()]
    scores = details.get("scores") if isinstance(details.get("scores"), dict) else None
    reason = details.get("fallback") if isinstance(details.get("fallback"), str) else None
    return RunView(
        key=_key(system, record.task_id), source="records", system=system,
        task_id=record.task_id, sample=0, target=record.target, rank=record.rank,
        outcome=outcome_of(record.rank), well_formed=record.well_formed_or_valid,
        repaired=record.repaired, fallback=record.fallback,
        fallback_reason=reason or ("fallback" if record.fallback else None),
        kept_shown_order=None if record.shown is None else list(record.ranking) == shown,
        tool_calls=n_tools, llm_calls=record.llm_calls, prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens, seconds=record.seconds,
        status=str(details.get("status") or ("error" if details.get("error") else "ok")),
        error=details.get("error") if isinstance(details.get("error"), str) else None,
        user_id=None, scenario=None, history=[], shown=shown,
        ranking=_ranked(record.ranking, shown or record.ranking, record.target, labels, {},
                        scores),
        steps=steps, text=details.get("text") if isinstance(details.get("text"), str) else None,
        parse_errors=errors)


# ---------------------------------------------------------------------------------------
# filtering and counting


@dataclass(frozen=True)
class RunFilter:
    """The viewer's filters; None (or "") matches every run."""

    system: str | None = None
    task_id: str | None = None
    outcome: str | None = None
    well_formed: bool | None = None

    def matches(self, view: RunView) -> bool:
        return ((not self.system or view.system == self.system)
                and (not self.task_id or view.task_id == self.task_id)
                and (not self.outcome or view.outcome == self.outcome)
                and (self.well_formed is None or view.well_formed == self.well_formed))


def filter_runs(views: Iterable[RunView], run_filter: RunFilter) -> list[RunView]:
    """The runs the filter keeps, in their order."""
    return [view for view in views if run_filter.matches(view)]


def summarize_runs(views: Sequence[RunView]) -> RunsSummary:
    """The counts over `views`. Hits are cumulative (a hit@1 is also a hit@3), as the
    metric; the outcome filter's values are not."""
    return RunsSummary(
        runs=len(views),
        systems=dict(Counter(view.system for view in views)),
        kept_shown_order=sum(view.kept_shown_order is True for view in views),
        shown_order_unknown=sum(view.kept_shown_order is None for view in views),
        well_formed=sum(view.well_formed for view in views),
        repaired=sum(view.repaired for view in views),
        fell_back=sum(view.fallback for view in views),
        errors=sum(view.status == "error" for view in views),
        hits={f"hit@{k}": sum(view.rank <= k for view in views) for k in (1, 3, 5)},
        tool_calls=sum(view.tool_calls for view in views),
        llm_calls=sum(view.llm_calls for view in views),
        prompt_tokens=sum(view.prompt_tokens for view in views),
        completion_tokens=sum(view.completion_tokens for view in views),
        seconds=round(sum(view.seconds for view in views), 3),
    )


def render_summary(summary: RunsSummary) -> str:
    """The summary as the lines `star view --summary` prints: each count as "n of N"."""
    n = summary.runs

    def of(count: int) -> str:
        share = f" ({100 * count / n:.1f}%)" if n else ""
        return f"{count} of {n}{share}"

    systems = ", ".join(f"{name} {count}" for name, count in summary.systems.items()) or "none"
    lines = [
        f"runs: {n} ({systems})",
        f"kept the shown order exactly: {of(summary.kept_shown_order)}"
        + (f"; unknown for {summary.shown_order_unknown}" if summary.shown_order_unknown else ""),
        f"well formed: {of(summary.well_formed)}",
        f"repaired: {of(summary.repaired)}",
        f"fell back: {of(summary.fell_back)}",
        f"errors: {of(summary.errors)}",
        "hits: " + ", ".join(f"{k} {of(v)}" for k, v in summary.hits.items()),
        f"tool calls: {summary.tool_calls}; LLM calls: {summary.llm_calls}; tokens: "
        f"{summary.prompt_tokens} prompt + {summary.completion_tokens} completion; "
        f"{summary.seconds:.1f} s",
    ]
    return "\n".join(lines)
