"""CF signals as short sentences with their numbers, from templates in a file."""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

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


def candidate_line(label: str, evidence: CandidateEvidence, n_history: int,
                   titles: Callable[[str], str]) -> str:
    """One candidate's links to the history in one sentence, opened by its label."""
    parts = []
    if not evidence.known:
        parts.append(render("candidate_cold"))
    elif evidence.cooc_best_item is not None:
        parts.append(render("candidate_cooccurrence", linked=evidence.cooc_linked,
                            n_history=n_history, base=titles(evidence.cooc_best_item),
                            count=evidence.cooc_best_count, base_pop=evidence.cooc_best_base,
                            share=percent(evidence.cooc_best_count / max(evidence.cooc_best_base, 1))))
    else:
        parts.append(render("candidate_no_link"))
    if evidence.transition_best_item is not None:
        parts.append(render("candidate_transition", base=titles(evidence.transition_best_item),
                            count=evidence.transition_best_count,
                            total=evidence.transition_best_total))
    if evidence.similar_users:
        parts.append(render("candidate_similar_users", votes=evidence.user_votes,
                            n=evidence.similar_users))
    if evidence.sequence_rank is not None:
        parts.append(render("candidate_sequence", rank=ordinal(evidence.sequence_rank),
                            n=evidence.sequence_of, share=percent(evidence.sequence_share or 0.0)))
    if evidence.factor_rank is not None:
        parts.append(render("candidate_factors", rank=ordinal(evidence.factor_rank),
                            n=evidence.factor_of))
    if evidence.known:
        parts.append(render("candidate_popularity", pop_pct=f"{evidence.pop_pct:.0f}"))
    if evidence.content_best_item is not None and (not evidence.known or evidence.cooc_best_item is None):
        parts.append(render("candidate_content", base=titles(evidence.content_best_item),
                            similarity=f"{evidence.content_similarity:.2f}"))
    return f"{render('candidate', label=label, title=evidence.title, item=evidence.item)}: " + "; ".join(parts) + "."
