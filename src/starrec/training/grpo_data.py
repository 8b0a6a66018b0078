"""The prompts GRPO trains on: train tasks only, drawn by difficulty, and their store.

**Train tasks only.** A prompt is a task of the `train` split (DESIGN.md 3.2: training
never uses a valid or test target), checked here (`check_train_tasks`) and again by the
rollout, which answers no other task. The evidence store the rollouts' tool calls read is
built from exactly what the train tasks may see (`split_store`: each user's rows before
the train target, leak-checked before anything is built), so no valid or test
interaction of anyone is in it.

**Difficulty.** A task's difficulty is the rank of its target under the `cst` ranker
(the evidence-only ranker, `starrec.cst.ranker`), among its 20 candidates: easy for rank
1 to `difficulty_bounds[0]` (3), medium up to `difficulty_bounds[1]` (10), hard beyond
(11 to 20). Prompts are drawn per difficulty in `difficulty_ratio` (3 : 4 : 3 by default)
with a seeded generator: a group of passes on a task the evidence already solves teaches
little (every pass earns the same), and one where it is hopeless teaches little more.
When a difficulty has too few tasks for the ratio at the size asked for, the size shrinks
to the largest the ratio allows (the report says so); the ratio is never bent.

**Presentation.** Prompts show the candidates as `grpo.candidate_order` says (DESIGN.md
3.7): the task file's shuffled order by default, the cst ranker's as an option.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from starrec.config import CSTConfig
from starrec.core import Task
from starrec.cst.ranker import present
from starrec.cst.store import EvidenceStore, ensure_store
from starrec.data.schema import Dataset
from starrec.data.splits import check_no_leak, task_interactions

log = logging.getLogger(__name__)

DIFFICULTIES = ("easy", "medium", "hard")
PROMPTS_FILE = "prompts.json"  # the drawn prompts, in the output folder: a resume reuses them


def check_train_tasks(tasks: Sequence[Task]) -> None:
    """ValueError unless every task is a train task (GRPO never sees a valid or test
    target)."""
    if not tasks:
        raise ValueError("no training tasks")
    others = sorted({t.split for t in tasks} - {"train"})
    if others:
        bad = next(t for t in tasks if t.split != "train")
        raise ValueError(f"GRPO trains on train tasks only; got {others} tasks "
                         f"(e.g. {bad.task_id})")


def split_store(dataset: Dataset, tasks: Sequence[Task], config: CSTConfig, *, name: str,
                path: Path | None = None, progress: bool = True) -> EvidenceStore:
    """The evidence store serving `tasks` (one split), built from what they may see:
    each task user's rows before its target, the other users' rows before their target of
    the split; checked to hold no task's target nor anything after it before it is built
    (LeakError)."""
    splits = sorted({t.split for t in tasks})
    if len(splits) != 1:
        raise ValueError(f"tasks mix splits {splits}; a store serves one split")
    allowed = task_interactions(dataset, tasks, splits[0])
    check_no_leak(tasks, allowed, where=f"evidence store of the {splits[0]} tasks")
    return EvidenceStore(ensure_store(allowed, dataset.items, config, dataset=name,
                                      split=splits[0], path=path, progress=progress))


def cst_rank(task: Task, store: EvidenceStore) -> int:
    """The 1-based rank of the task's target under the cst ranker."""
    return present(task, store, "cst").candidates.index(task.target) + 1


def difficulty(rank: int, bounds: Sequence[int]) -> str:
    """easy, medium or hard for a target's cst rank (module docstring)."""
    if rank <= bounds[0]:
        return "easy"
    return "medium" if rank <= bounds[1] else "hard"


def quotas(n: int, ratio: Sequence[int]) -> list[int]:
    """`n` split in `ratio` by largest remainders (ties to the earlier stratum)."""
    total = sum(ratio)
    exact = [n * r / total for r in ratio]
    counts = [int(x) for x in exact]
    order = sorted(range(len(ratio)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    return counts


def largest_size(available: Sequence[int], ratio: Sequence[int]) -> int:
    """The largest n whose `quotas(n, ratio)` every stratum can fill."""
    n = sum(available)
    while n > 0 and any(q > a for q, a in zip(quotas(n, ratio), available)):
        n -= 1
    return n


@dataclass
class PromptSet:
    """The drawn prompts, each with its cst rank and difficulty, and how they were drawn."""

    tasks: list[Task]
    ranks: dict[str, int]
    difficulty: dict[str, str]
    report: dict[str, Any] = field(default_factory=dict)


def draw_prompts(tasks: Sequence[Task], store: EvidenceStore, size: int | None,
                 ratio: Sequence[int], bounds: Sequence[int], seed: int = 0) -> PromptSet:
    """Train tasks drawn by difficulty (module docstring), in task-id order."""
    check_train_tasks(tasks)
    ranks = {t.task_id: cst_rank(t, store) for t in tasks}
    level = {t.task_id: difficulty(ranks[t.task_id], bounds) for t in tasks}
    strata = [[t for t in tasks if level[t.task_id] == d] for d in DIFFICULTIES]
    available = [len(s) for s in strata]
    fits = largest_size(available, ratio)
    n = fits if size is None else min(size, fits)
    if size is not None and n < size:
        log.warning("grpo: %d prompts asked for, the difficulty ratio %s allows %d "
                    "(available easy/medium/hard: %s)", size, list(ratio), n, available)
    rng = np.random.default_rng(seed)
    chosen: list[Task] = []
    for stratum, quota in zip(strata, quotas(n, ratio)):
        picks = rng.permutation(len(stratum))[:quota]
        chosen += [stratum[int(i)] for i in sorted(picks)]
    chosen.sort(key=lambda t: t.task_id)
    if not chosen:
        raise ValueError(f"no training prompt can be drawn at the ratio {list(ratio)} "
                         f"(available easy/medium/hard: {available})")
    counts = {d: sum(level[t.task_id] == d for t in chosen) for d in DIFFICULTIES}
    report = {"rule": f"target's cst rank: easy <= {bounds[0]} < medium <= {bounds[1]} < hard",
              "ratio": list(ratio), "asked": size, "drawn": len(chosen), "counts": counts,
              "available": dict(zip(DIFFICULTIES, available)), "seed": seed}
    return PromptSet(chosen, {t.task_id: ranks[t.task_id] for t in chosen},
                     {t.task_id: level[t.task_id] for t in chosen}, report)


def prompt_dataset(prompts: PromptSet):
    """TRL's training dataset: `prompt` is the task id (the rollout renders the student's
    prompt itself, through the model's chat template); `difficulty` and `cst_rank` reach
    the reward functions beside it."""
    from datasets import Dataset as HFDataset

    ids = [t.task_id for t in prompts.tasks]
    return HFDataset.from_dict({"prompt": ids,
                                "difficulty": [prompts.difficulty[i] for i in ids],
                                "cst_rank": [prompts.ranks[i] for i in ids]})


def write_prompts(prompts: PromptSet, path: Path) -> None:
    """The drawn prompts (task id, cst rank, difficulty) and how they were drawn."""
    rows = [{"task_id": t.task_id, "cst_rank": prompts.ranks[t.task_id],
             "difficulty": prompts.difficulty[t.task_id]} for t in prompts.tasks]
    path.write_text(json.dumps({"report": prompts.report, "prompts": rows}, indent=1) + "\n",
                    encoding="utf-8")


def read_prompts(path: Path, tasks: Sequence[Task]) -> PromptSet:
    """The prompts of `path` (`write_prompts`) among `tasks`, so a resumed run trains on the
    prompts it started with; ValueError when one is no longer among them."""
    record = json.loads(path.read_text(encoding="utf-8"))
    by_id = {t.task_id: t for t in tasks}
    missing = [r["task_id"] for r in record["prompts"] if r["task_id"] not in by_id]
    if missing:
        raise ValueError(f"{path}: {len(missing)} prompts are not among the training tasks "
                         f"(e.g. {missing[0]}); the task file changed since the run began")
    chosen = [by_id[r["task_id"]] for r in record["prompts"]]
    check_train_tasks(chosen)
    return PromptSet(chosen, {r["task_id"]: r["cst_rank"] for r in record["prompts"]},
                     {r["task_id"]: r["difficulty"] for r in record["prompts"]}, record["report"])
