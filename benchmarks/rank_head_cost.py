"""Cost per request of the ranking head in fast mode against prompt length (issue 15).

The head's cost is one prefill (no decoding), so its distance to the physical limit is
the gap between its time per request and a bare forward pass of the same model over the
same prompt. This script builds fast-mode prompts of growing length on real valid tasks
(the evidence budget per candidate and the history shown are what change the length)
and, per task, times the whole request (`RankHeadSystem.answer`: evidence lookup, prompt,
tokenizing, the pass, the readout) and a bare forward pass over that request's own
tokens, each the best of `--repeats`; a row is the mean over the tasks. Prints a table
and writes benchmarks/results/rank_head_cost.json.

    python benchmarks/rank_head_cost.py --model runs/rank-full   # a trained head's prompt
    python benchmarks/rank_head_cost.py --tasks 5 --budgets 0 8 24 48   # SmolLM2, default spec

A head folder's card gives the prompt it was trained on (evidence style, clauses,
readout); only the evidence budget and the history shown vary. The cost of a forward pass
depends on the token count, not on the weights.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def measure(model: str, dataset: str, n_tasks: int, budgets: list[int],
            history: list[int] | None, repeats: int, threads: int | None,
            store_path: str | None = None) -> tuple[dict, list[dict]]:
    """(the head's prompt spec, one row per (history items, evidence budget): mean prompt
    tokens, mean head seconds per request, and mean seconds of a bare forward pass over
    each request's own prompt, with their tokens/s). `history` None: the card's."""
    import torch

    from starrec.config import CSTConfig
    from starrec.cst.store import EvidenceStore, ensure_store
    from starrec.data.prepared import load_task_set, prepared_tasks
    from starrec.data.registry import load_dataset
    from starrec.data.splits import task_interactions
    from starrec.inference.rank_head import RankHead, RankHeadSystem, load_head
    from starrec.llm.card import HeadSpec, read_model_card

    loaded = load_dataset(dataset)
    tasks = load_task_set(prepared_tasks(dataset, dataset=loaded) / "valid-200.jsonl", loaded)
    tasks = tasks[:n_tasks]
    if store_path is None:
        allowed = task_interactions(loaded, load_task_set(
            prepared_tasks(dataset, dataset=loaded) / "valid-200.jsonl"), "valid")
        store_path = str(ensure_store(allowed, loaded.items, CSTConfig(), dataset=dataset,
                                      split="valid"))
    store = EvidenceStore(store_path)
    base, _ = load_head(model, threads=threads)
    card = read_model_card(model) if Path(model).is_dir() else None
    trained = card.head if card is not None and card.head is not None else HeadSpec()
    rows = []
    for items in history or [trained.history_items]:
        for budget in budgets:
            head = RankHead(base.model, base.tokenizer,
                            trained.model_copy(update={"evidence_tokens": budget,
                                                       "history_items": items}))
            system = RankHeadSystem(head, store, mode="fast")
            texts = [head.prompt(task, store) for task in tasks]
            tokens = sum(map(head.count, texts)) / len(texts)
            head.scores(texts[:1], 20)  # warm-up
            answer = forward = 0.0
            for task, text in zip(tasks, texts):
                answer += best_of(repeats, lambda t=task: system.answer(t))
                ids = head.encode([text])
                with torch.inference_mode():
                    forward += best_of(repeats, lambda i=ids: head.model(**i, logits_to_keep=1))
            answer, forward = answer / len(tasks), forward / len(tasks)
            rows.append({"history_items": items, "evidence_tokens": budget,
                         "prompt_tokens": round(tokens, 1), "head_s": round(answer, 4),
                         "prefill_s": round(forward, 4),
                         "head_tokens_per_s": round(tokens / answer, 1),
                         "prefill_tokens_per_s": round(tokens / forward, 1)})
            print(f"history {items:3d}  evidence {budget:3d}  tokens {tokens:7.1f}  "
                  f"head {answer:7.3f} s  forward {forward:7.3f} s  "
                  f"({answer / forward:.2f}x)", flush=True)
    return trained.model_dump(exclude={"labels", "evidence_tokens", "history_items"}), rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--dataset", default="ml-100k")
    parser.add_argument("--store", default=None, help="an evidence store (default: valid's)")
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--budgets", type=int, nargs="+", default=[0, 16, 32, 48, 64])
    parser.add_argument("--history", type=int, nargs="+", default=None,
                        help="history titles shown (default: the head card's)")
    parser.add_argument("--repeats", type=int, default=2, help="best of N, per request")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "rank_head_cost.json")
    args = parser.parse_args(argv)
    from starrec.evaluation.identity import model_hash
    from starrec.evaluation.provenance import code_version, machine

    spec, rows = measure(args.model, args.dataset, args.tasks, args.budgets, args.history,
                         args.repeats, args.threads, args.store)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"model": args.model, "model_hash": model_hash(args.model),
               "dataset": args.dataset, "tasks": args.tasks, "repeats": args.repeats,
               "threads": args.threads, "head": spec,
               "code_version": code_version(), "machine": machine(),
               "load_average": os.getloadavg(), "rows": rows}
    args.out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
