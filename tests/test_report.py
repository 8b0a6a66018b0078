"""Report tables: quality for every system, cost and speed-up for the LLM systems."""

from __future__ import annotations

from starrec.evaluation.report import efficiency_table, full_report, markdown_table


def result(system: str, median_s: float, llm_calls: float) -> dict:
    metrics = {k: 50.0 for k in ("HR@1", "HR@3", "HR@5", "AvgHR", "NDCG@10", "MRR", "valid_rate")}
    return {"system": system, "split": "test", "n_tasks": 200, "config": {"users": "eval-200"},
            "metrics": metrics, "ci95": {"AvgHR": [40.0, 60.0]},
            "efficiency": {"median_s": median_s, "p95_s": 2 * median_s,
                           "llm_calls_per_task": llm_calls, "prompt_tokens_per_task": 25000.0,
                           "completion_tokens_per_task": 600.0}}


def test_cost_table_lists_llm_systems_with_speedup_over_the_first():
    rows = [result("cst", 0.007, 0), result("mars", 48.0, 11), result("star", 12.0, 1)]
    table = efficiency_table(rows).splitlines()
    assert "speed-up vs mars" in table[0] and len(table) == 4  # header, rule, two systems
    assert table[2].startswith("| mars | test eval-200 | 200 | 48.0 | 96.0 | 11.0 | 25,000 | 600 | 1.0x |")
    assert table[3].endswith("| 4.0x |") and "| 1.0 |" in table[3]
    assert efficiency_table(rows[:1]) == ""
    # the teacher is the reference wherever it is listed
    assert efficiency_table([rows[2], rows[1]]).splitlines()[2].endswith("| 4.0x |")
    assert "speed-up vs star" in efficiency_table([rows[2]])
    assert full_report(rows[:1]) == markdown_table(rows[:1])
    assert full_report(rows).startswith(markdown_table(rows)) and "speed-up" in full_report(rows)
