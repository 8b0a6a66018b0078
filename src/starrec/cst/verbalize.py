"""CF signals as short sentences with their numbers, from templates in a file."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache
from typing import Literal

import yaml

from starrec.core.resources import resource_text
from starrec.cst.evidence import CandidateEvidence
from starrec.cst.store import EvidenceStore, Neighbour

TokenCounter = Callable[[str], int]


@lru_cache(maxsize=1)
def templates() -> dict[str, str]:
    text = resource_text("cst/templates.yaml")
    return {key: " ".join(value.split()) for key, value in yaml.safe_load(text).items()}


def render(key: str, **fields: object) -> str:
    return templates()[key].format(**fields)


def approx_tokens(text: str) -> int:
    """About 4 characters a token for English with numbers (no tokenizer needed)."""
    return max(1, (len(text) + 3) // 4)


def fit_budget(lines: list[str], budget: int, count: TokenCounter = approx_tokens) -> list[str]:
    """Keep lines in order while they fit; say how many were dropped."""
    kept: list[str] = []
    used = 0
    for i, line in enumerate(lines):
        cost = count(line)
        if used + cost > budget:
            kept.append(render("truncated", n=len(lines) - i))
            break
        kept.append(line)
        used += cost
    return kept


def percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, ..., 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def latent_lines(kind: str, n: int, ranked: list[tuple[int, str, float, float]]) -> list[str]:
    """A latent model's ranking of a task's candidates: `n` candidates it scored, of
    which `ranked` holds the first ones shown as (rank, candidate as the prompt names
    it, score, share) in rank order; `kind` is sequence or factors."""
    if not ranked:
        return [render("latent_none")]
    header = render(f"latent_{kind}_header", n=n)
    return [header, *(render(f"latent_{kind}_item", rank=rank, candidate=candidate,
                             score=f"{score:.2f}", share=percent(share))
                      for rank, candidate, score, share in ranked)]


def neighbour_lines(store: EvidenceStore, kind: str, item: str, rows: list[Neighbour]) -> list[str]:
    base = store.title(item)
    if kind == "cooccurrence":
        base_pop = int(store.items.at[item, "pop"]) if item in store.items.index else 0
        return [render("item_neighbour", base=base, base_pop=base_pop, count=int(n.count),
                       title=n.title, share=percent(n.count / max(base_pop, 1)),
                       strength=f"{n.strength:.2f}", rank=n.rank)
                for n in rows]
    if kind == "transition":
        total = store.next_step_total(item)
        return [render("next_item", base=base, count=int(n.count), total=total, title=n.title,
                       share=percent(n.strength), rank=n.rank) for n in rows]
    return [render("content_neighbour", title=n.title, base=base,
                   similarity=f"{n.strength:.2f}", rank=n.rank) for n in rows]


def popularity_line(store: EvidenceStore, item: str, cutoff_time: float | None = None) -> str:
    """Overall and recent popularity; recent = just before `cutoff_time`, the task's
    target time, so the line never reports what became popular after it."""
    row = store.items.loc[item]
    recent_pct = store.recent_percentile(item, cutoff_time)
    return render("popularity", title=store.title(item), pop=int(row["pop"]),
                  pop_pct=f"{row['pop_pct']:.0f}", recent_pct=f"{recent_pct:.0f}")


# The kinds of clause a candidate's evidence line is made of, in the line's order.
CLAUSE_KINDS = ("links", "transition", "similar_users", "sequence", "factors", "popularity",
                "content")


def candidate_clauses(evidence: CandidateEvidence, n_history: int,
                      titles: Callable[[str], str],
                      style: Literal["sentences", "compact"] = "sentences"
                      ) -> list[tuple[str, str]]:
    """A candidate's evidence as (kind, clause) pairs, kinds from `CLAUSE_KINDS` in that
    order; `links` is its co-consumption with the history (or that it has none, or that
    it is a cold item). `compact` renders the `compact_*` templates: counts as n/N, ranks
    as plain numbers, no titles."""
    if style not in ("sentences", "compact"):
        raise ValueError(f"unknown evidence style {style!r}; expected sentences or compact")
    prefix = "candidate_" if style == "sentences" else "compact_"

    def say(kind: str, **fields: object) -> str:
        return render(prefix + kind, **fields)

    def nth(n: int) -> str:
        return ordinal(n) if style == "sentences" else str(n)

    e = evidence
    parts: list[tuple[str, str]] = []
    if not e.known:
        parts.append(("links", say("cold")))
    elif e.cooc_best_item is not None:
        parts.append(("links", say("cooccurrence", linked=e.cooc_linked, n_history=n_history,
                                   base=titles(e.cooc_best_item), count=e.cooc_best_count,
                                   base_pop=e.cooc_best_base,
                                   share=percent(e.cooc_best_count / max(e.cooc_best_base, 1)))))
    else:
        parts.append(("links", say("no_link")))
    if e.transition_best_item is not None:
        parts.append(("transition", say("transition", base=titles(e.transition_best_item),
                                        count=e.transition_best_count,
                                        total=e.transition_best_total)))
    if e.similar_users:
        parts.append(("similar_users", say("similar_users", votes=e.user_votes, n=e.similar_users)))
    if e.sequence_rank is not None:
        parts.append(("sequence", say("sequence", rank=nth(e.sequence_rank), n=e.sequence_of,
                                      share=percent(e.sequence_share or 0.0))))
    if e.factor_rank is not None:
        parts.append(("factors", say("factors", rank=nth(e.factor_rank), n=e.factor_of)))
    if e.known:
        parts.append(("popularity", say("popularity", pop_pct=f"{e.pop_pct:.0f}")))
    if e.content_best_item is not None and (not e.known or e.cooc_best_item is None):
        parts.append(("content", say("content", base=titles(e.content_best_item),
                                     similarity=f"{e.content_similarity:.2f}")))
    return parts


def candidate_line(label: str, evidence: CandidateEvidence, n_history: int,
                   titles: Callable[[str], str]) -> str:
    """One candidate's links to the history in one sentence, opened by its label."""
    clauses = [text for _, text in candidate_clauses(evidence, n_history, titles)]
    return (f"{render('candidate', label=label, title=evidence.title, item=evidence.item)}: "
            + "; ".join(clauses) + ".")
