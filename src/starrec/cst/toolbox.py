"""The CST tools, one object each: its name (which names its schema and description in
`resources/cst/tools.yaml`, what the LLM reads), how it runs on a bound task and store,
and the calls it offers on a task for constrained decoding.

A tool's `run` gets the `ToolExecutor` that called it (the store, the task, how the
prompt labels candidates) and returns evidence lines; a call the model got wrong raises
`ToolError`, whose message goes back to the model. `offers` lists the calls worth
offering on what a prompt shows (the recent history items, the candidates, the user),
with default arguments left out, as the teacher's prompts show its tools.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar

import yaml

from starrec.core import Task
from starrec.core.resources import resource_text
from starrec.cst.evidence import candidate_evidence, similar_users
from starrec.cst.latent import FACTORS, SEQUENCE, latent_scores
from starrec.cst.store import EvidenceStore
from starrec.cst.verbalize import (
    candidate_line,
    latent_lines,
    neighbour_lines,
    popularity_line,
    render,
)
from starrec.labels import candidate_labels

if TYPE_CHECKING:
    from starrec.cst.tools import ToolExecutor

Call = dict[str, Any]


class ToolError(Exception):
    """A call the model got wrong; its message goes back to the model."""


@lru_cache(maxsize=1)
def described() -> dict[str, dict[str, Any]]:
    """Each tool's name, description and argument schema from the resources, by name, in
    the file's order."""
    return {spec["name"]: spec for spec in yaml.safe_load(resource_text("cst/tools.yaml"))}


class Tool:
    """One CST tool. Subclasses set `name` and implement `run` and `offers`; the
    description and the argument schema are the resource entry of that name."""

    name: ClassVar[str]

    @property
    def spec(self) -> dict[str, Any]:
        """The tool in OpenAI function-calling format."""
        return {"type": "function", "function": described()[self.name]}

    @property
    def description(self) -> str:
        return " ".join(described()[self.name]["description"].split())

    @property
    def parameters(self) -> dict[str, Any]:
        """The JSON schema of its arguments."""
        return described()[self.name]["parameters"]

    def run(self, ctx: ToolExecutor, **arguments: Any) -> list[str]:
        raise NotImplementedError

    def offers(self, task: Task, store: EvidenceStore, shown: Sequence[str]) -> list[Call]:
        """The distinct argument sets worth offering on a prompt of `task` that shows the
        history items `shown`; none where the call could only return an error."""
        raise NotImplementedError


class _NeighbourTool(Tool):
    """A precomputed neighbour list of one item (co-consumption, next step, content)."""

    kind: ClassVar[str]
    empty: ClassVar[str] = ""

    def run(self, ctx: ToolExecutor, item_id: str, k: int) -> list[str]:
        rows = ctx.store.neighbours(self.kind, ctx.item(item_id), k)
        lines = neighbour_lines(ctx.store, self.kind, item_id, rows)
        return lines or [self.empty.format(title=ctx.store.title(item_id))]

    def offers(self, task: Task, store: EvidenceStore, shown: Sequence[str]) -> list[Call]:
        return [{"item_id": i} for i in reversed(shown)]


class ItemNeighbours(_NeighbourTool):
    name = "item_neighbours"
    kind = "cooccurrence"
    empty = "No user consumed {title} together with another item."


class NextItems(_NeighbourTool):
    name = "next_items"
    kind = "transition"
    empty = "No recorded next step after {title}."


class ContentNeighbours(_NeighbourTool):
    name = "content_neighbours"
    kind = "content"

    def run(self, ctx: ToolExecutor, item_id: str, k: int) -> list[str]:
        rows = ctx.store.neighbours(self.kind, ctx.item(item_id), k)
        if not rows and ctx.store.embeddings is None:
            raise ToolError("this store was built without content signals")
        return neighbour_lines(ctx.store, self.kind, item_id, rows)

    def offers(self, task: Task, store: EvidenceStore, shown: Sequence[str]) -> list[Call]:
        if store.embeddings is None:
            return []
        return [{"item_id": i} for i in [*reversed(shown), *task.candidates]]


class Popularity(Tool):
    name = "popularity"

    def run(self, ctx: ToolExecutor, item_ids: list[str]) -> list[str]:
        cutoff_time = ctx.task.cutoff_time if ctx.task is not None else None
        return [popularity_line(ctx.store, ctx.item(i), cutoff_time) for i in item_ids]

    def offers(self, task: Task, store: EvidenceStore, shown: Sequence[str]) -> list[Call]:
        calls: list[Call] = [{"item_ids": list(task.candidates)}]
        return calls + [{"item_ids": list(shown)}] if shown else calls


class SimilarUsers(Tool):
    name = "similar_users"

    def run(self, ctx: ToolExecutor, user_id: str, k: int,
            candidates_only: bool) -> list[str]:
        store, task = ctx.store, ctx.task
        if task is not None and user_id == task.user_id:
            history = task.history
        elif store.knows_user(user_id):
            history = store.user_history(user_id)
        else:
            raise ToolError(f"unknown user id {user_id!r}")
        rows, overlaps = similar_users(store, history, user_id, k)
        if len(rows) == 0:
            return [render("similar_users_none")]
        graph = store.graph
        lines = [render("similar_users_header", n=len(rows), min_overlap=int(overlaps.min()),
                        max_overlap=int(overlaps.max()))]
        counts = graph.matrix[rows].sum(axis=0).A1
        seen = set(history)
        if candidates_only and task is not None:
            pool = [c for c in task.candidates if c not in seen]
        else:
            top = counts.argsort()[::-1][:50]
            pool = [graph.items[i] for i in top if graph.items[i] not in seen][:10]
        columns = graph.items.get_indexer(pool)
        ranked = sorted(((int(counts[c]), item) for item, c in zip(pool, columns)
                         if c >= 0 and counts[c] > 0), key=lambda pair: -pair[0])
        return lines + [render("similar_users_item", votes=v, title=store.title(i))
                        for v, i in ranked]

    def offers(self, task: Task, store: EvidenceStore, shown: Sequence[str]) -> list[Call]:
        return [{"user_id": task.user_id}]


class _TaskTool(Tool):
    """A tool bound to the task: it takes no id, so one call is worth offering."""

    def offers(self, task: Task, store: EvidenceStore, shown: Sequence[str]) -> list[Call]:
        return [{}]


class SequenceCandidates(_TaskTool):
    name = "sequence_candidates"

    def run(self, ctx: ToolExecutor, recent: int) -> list[str]:
        task, store = ctx.require_task(self.name), ctx.store
        recent_items = [i for i in reversed(task.history) if i in store.items.index][:recent]
        graph = store.graph
        candidates = [c for c in task.candidates if c in store.items.index]
        columns = graph.items.get_indexer(candidates)
        lines = []
        for base in recent_items:
            row = graph.transitions[graph.item_column(base)]
            total = row.sum()
            counts = row[:, columns].toarray().ravel()
            for count, item in sorted(zip(counts, candidates), key=lambda pair: -pair[0]):
                if count > 0:
                    lines.append(render("sequence_item", title=store.title(item),
                                        base=store.title(base), count=int(count),
                                        share=f"{100 * count / max(total, 1):.0f}%"))
        return lines or ["No candidate was consumed right after the recent history items."]


class _LatentTool(_TaskTool):
    """A latent model of the store ranks the task's candidates."""

    model: ClassVar[str]  # the latent model kind it reads (starrec.cst.latent)
    verbal: ClassVar[str]  # its kind in the templates

    def run(self, ctx: ToolExecutor, k: int) -> list[str]:
        task = ctx.require_task(self.name)
        model = ctx.store.latent_models.get(self.model)
        if model is None:
            raise ToolError("this store was built without latent models")
        scores = latent_scores(model, task)
        labels = candidate_labels(len(task.candidates), ctx.label_style)
        order = sorted((rank, j) for j, rank in enumerate(scores.ranks.tolist()) if rank > 0)
        ranked = [(rank, render("candidate", label=labels[j],
                                title=ctx.store.title(task.candidates[j]),
                                item=task.candidates[j]),
                   float(scores.scores[j]), float(scores.shares[j])) for rank, j in order[:k]]
        return latent_lines(self.verbal, scores.n_scored, ranked)

    def offers(self, task: Task, store: EvidenceStore, shown: Sequence[str]) -> list[Call]:
        return [{}] if self.model in store.latent_states else []


class SequenceModel(_LatentTool):
    name = "sequence_model"
    model = SEQUENCE
    verbal = "sequence"


class FactorModel(_LatentTool):
    name = "factor_model"
    model = FACTORS
    verbal = "factors"


class CandidateEvidence(_TaskTool):
    name = "candidate_evidence"

    def run(self, ctx: ToolExecutor, item_ids: list[str] | None = None) -> list[str]:
        task = ctx.require_task(self.name)
        wanted = set(item_ids) if item_ids else None
        if wanted is not None:
            unknown = wanted - set(task.candidates)
            if unknown:
                raise ToolError(f"not candidates of this task: {sorted(unknown)}")
        labels = candidate_labels(len(task.candidates), ctx.label_style)
        return [
            candidate_line(label, evidence, len(task.history), ctx.store.title)
            for label, evidence in zip(labels, candidate_evidence(ctx.store, task))
            if wanted is None or evidence.item in wanted
        ]


TOOLS: dict[str, Tool] = {tool.name: tool for tool in (
    ItemNeighbours(), NextItems(), ContentNeighbours(), Popularity(), SimilarUsers(),
    SequenceCandidates(), SequenceModel(), FactorModel(), CandidateEvidence())}
