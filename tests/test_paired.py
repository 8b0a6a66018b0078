"""Per-task files and paired comparison of two results on their shared tasks."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from starrec.cli.main import app
from starrec.data.tasks import build_split_tasks
from starrec.evaluation import task_file as task_file_module
from starrec.evaluation.paired import (
    compare_rows,
    first_place_moves,
    paired_comparison,
    paired_markdown,
    read_task_rows,
)
from starrec.evaluation.runner import Recommendation, results_json, run_tasks, write_results
from starrec.evaluation.task_file import (
    candidates_sha256,
    expand_rankings,
    labels_ranking,
    ranking_labels,
    task_file_path,
)

runner = CliRunner()


def row(task_id: str, rank: int, target: str = "t", candidates: tuple = ("t", "x", "y")) -> dict:
    return {"task_id": task_id, "target": target, "rank": rank,
            "candidates_sha256": candidates_sha256(candidates)}


def test_paired_difference_interval_and_win_tie_loss():
    a = [row("1", 1), row("2", 1), row("3", 4), row("4", 2), row("5", 9)]
    b = [row("1", 1), row("2", 3), row("3", 1), row("4", 6), row("6", 1)]
    comparison = compare_rows(a, b, "a", "b", n_resamples=200)
    assert comparison.n_shared == 4 and comparison.only_a == 1 and comparison.only_b == 1
    hr1 = comparison.metric("HR@1")
    # per task (a - b): 0, +1, -1, 0
    assert (hr1.wins, hr1.ties, hr1.losses) == (1, 2, 1)
    assert hr1.a == pytest.approx(50.0) and hr1.b == pytest.approx(50.0)
    assert hr1.difference == pytest.approx(0.0)
    avg = comparison.metric("AvgHR")
    # AvgHR per task: a = 1, 1, 1/3, 2/3; b = 1, 2/3, 1, 0
    assert avg.difference == pytest.approx(100 * (0 + 1 / 3 - 2 / 3 + 2 / 3) / 4, abs=0.01)
    assert (avg.wins, avg.ties, avg.losses) == (2, 1, 1)
    assert avg.ci95[0] <= avg.difference <= avg.ci95[1]
    assert -100 <= avg.ci95[0] and avg.ci95[1] <= 100
    table = paired_markdown(comparison)
    assert "4 shared tasks" in table and "| AvgHR |" in table and "| 2 / 1 / 1 |" in table


def test_identical_systems_differ_by_zero_with_a_zero_interval():
    rows = [row(str(i), 1 + i % 5) for i in range(30)]
    comparison = compare_rows(rows, rows)
    for metric in comparison.metrics:
        assert metric.difference == 0 and metric.ci95 == (0.0, 0.0) and metric.ties == 30


def test_a_task_id_naming_another_task_is_refused():
    with pytest.raises(ValueError, match="different tasks"):
        compare_rows([row("1", 1)], [row("1", 1, target="x")])
    with pytest.raises(ValueError, match="different tasks"):
        compare_rows([row("1", 1)], [row("1", 1, candidates=("t", "x", "z"))])
    with pytest.raises(ValueError, match="share no task"):
        compare_rows([row("1", 1)], [row("2", 1)])


class Fixed:
    def __init__(self, name: str, first: int):
        self.name, self.first = name, first

    def recommend(self, task):
        order = [task.candidates[self.first]] + [c for i, c in enumerate(task.candidates) if i != self.first]
        return Recommendation(order)


def write(system, tasks, path):
    records = run_tasks(system, tasks, progress=False)
    result = results_json(system.name, "tiny", "test", records, {}, n_resamples=20)
    return write_results(result, records, path), records


def test_per_task_file_beside_results_and_paired_report(tiny, tmp_path, monkeypatch):
    tasks = build_split_tasks(tiny, "test")[:8]
    targets = [t.target_index for t in tasks]
    rows_path, records = write(Fixed("zero", 0), tasks, tmp_path / "zero.json")
    assert rows_path == task_file_path(tmp_path / "zero.json") == tmp_path / "zero.tasks.jsonl"
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()]
    assert [r["task_id"] for r in rows] == [t.task_id for t in tasks]
    assert {"task_id", "target", "rank", "ranking", "valid", "well_formed", "seconds"} <= set(rows[0])
    assert [r["rank"] for r in rows] == [r.rank for r in records]
    write(Fixed("one", 1), tasks, tmp_path / "one.json")

    comparison = paired_comparison(tmp_path / "zero.json", tmp_path / "one.json")
    hr1 = comparison.metric("HR@1")
    assert hr1.wins == sum(i == 0 for i in targets) and hr1.losses == sum(i == 1 for i in targets)

    result = runner.invoke(app, ["report", "--paired", str(tmp_path / "zero.json"),
                                 str(tmp_path / "one.json")])
    assert result.exit_code == 0, result.output
    assert "zero (zero.json)" in result.output and "| HR@1 |" in result.output

    # a large run writes its per-task file compact (a header, then one array a row, the
    # ranking as letters); it reads back as the same rows and compares the same, and the
    # tasks give its rankings back as item ids
    plain = read_task_rows(tmp_path / "one.json")
    monkeypatch.setattr(task_file_module, "COMPACT_OVER", len(tasks) - 1)
    compact_path, _ = write(Fixed("one", 1), tasks, tmp_path / "one.json")
    assert compact_path == tmp_path / "one.tasks.jsonl"
    lines = compact_path.read_text().splitlines()
    assert json.loads(lines[0])["columns"][3] == "ranking" and len(lines) == len(tasks) + 1
    assert all(isinstance(json.loads(line), list) for line in lines[1:])
    assert len(compact_path.read_bytes()) < len(json.dumps(plain)) / 2
    compact = read_task_rows(tmp_path / "one.json")
    assert all("ranking" not in r and len(r["ranking_labels"]) == len(tasks[0].candidates)
               for r in compact)

    def timeless(rows):  # a second run takes other seconds
        return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]

    assert timeless(expand_rankings(compact, tasks)) == [
        {**r, "ranking_labels": c["ranking_labels"]} for r, c in zip(timeless(plain), compact)]
    assert paired_comparison(tmp_path / "zero.json", tmp_path / "one.json").metric("HR@1").wins == hr1.wins
    with pytest.raises(ValueError, match="other candidates"):
        expand_rankings(compact, [replace(t, candidates=t.candidates[:-1] + ["new"]) for t in tasks])
    with pytest.raises(ValueError, match="not among the tasks"):
        expand_rankings(compact, tasks[1:])
    with pytest.raises(ValueError, match="expand_rankings"):
        first_place_moves(compact, plain, plain)
    monkeypatch.setattr(task_file_module, "COMPACT_OVER", len(tasks))
    write(Fixed("one", 1), tasks, tmp_path / "one.json")
    assert timeless(read_task_rows(tmp_path / "one.json")) == timeless(plain)
    (tmp_path / "one.tasks.jsonl").unlink()
    with pytest.raises(ValueError, match="no per-task file beside it"):
        read_task_rows(tmp_path / "one.json")

    # results of another task file: same ids, other candidates
    other = [replace(t, candidates=list(reversed(t.candidates))[:-1] + ["new"])
             if t.target != t.candidates[0] else t for t in tasks]
    write(Fixed("other", 0), other, tmp_path / "other.json")
    result = runner.invoke(app, ["report", "--paired", str(tmp_path / "zero.json"),
                                 str(tmp_path / "other.json")])
    assert result.exit_code == 2 and "error:" in result.output and "Traceback" not in result.output


def test_report_on_bad_input_is_one_line_and_exit_2(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    other = tmp_path / "other.json"
    other.write_text('{"files": {}}')
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    for args in (["report", str(tmp_path / "missing.json")], ["report", str(empty)],
                 ["report", str(other)], ["report", str(broken)],
                 ["report", "--paired", str(empty)],
                 ["report", "--paired", str(empty), str(other)]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit)


def test_paired_needs_per_task_rows(tiny, tmp_path):
    tasks = build_split_tasks(tiny, "test")[:3]
    records = run_tasks(Fixed("zero", 0), tasks, progress=False)
    (tmp_path / "r.json").write_text(json.dumps(results_json("zero", "tiny", "test", records, {},
                                                             n_resamples=10)))
    with pytest.raises(ValueError, match="no per-task file"):
        paired_comparison(tmp_path / "r.json", tmp_path / "r.json")


def test_first_place_moves_counts_positions_ranker_ranks_and_targets():
    from starrec.evaluation.paired import first_place_moves

    shown = [{"task_id": "t1", "ranking": ["a", "b", "c", "d"]},
             {"task_id": "t2", "ranking": ["e", "f", "g", "h"]},
             {"task_id": "t3", "ranking": ["i", "j", "k", "l"]}]
    ranker = [{"task_id": "t1", "ranking": ["c", "a", "b", "d"]},
              {"task_id": "t2", "ranking": ["e", "g", "h", "f"]},
              {"task_id": "t3", "ranking": ["l", "k", "j", "i"]}]
    rows = [{"task_id": "t1", "target": "b", "ranking": ["b", "a", "c", "d"]},  # 2nd shown
            {"task_id": "t2", "target": "e", "ranking": ["e", "f", "g", "h"]},  # kept
            {"task_id": "t3", "target": "l", "ranking": ["l", "i", "j", "k"]}]  # 4th shown
    moves = first_place_moves(rows, shown, ranker)
    assert (moves.n_tasks, moves.moved, moves.targets) == (3, 2, 2)
    assert moves.shown_positions == {2: 1, 4: 1}
    assert moves.mean_ranker_rank == 2.0 and moves.chance_rank == 2.5  # ranks 3 and 1
    with pytest.raises(ValueError, match="missing"):
        first_place_moves(rows, shown[:2], ranker)


def test_compact_ranking_letters_round_trip_and_refuse_what_is_not_a_permutation():
    candidates = ["9", "10", "100", "2"]  # ids sort as strings: "10" < "100" < "2" < "9"
    assert ranking_labels(["9", "10", "100", "2"]) == "DABC"
    assert labels_ranking("DABC", reversed(candidates)) == candidates
    many = [f"i{n:02d}" for n in range(62)]  # the most letters there are, in sorted order
    assert labels_ranking(ranking_labels(many[::-1]), many) == many[::-1]
    for bad in (many + ["i99"], ["a", "a"]):
        with pytest.raises(ValueError, match="distinct items"):
            ranking_labels(bad)
    for bad in ("DAB", "DABB", "DABZ"):
        with pytest.raises(ValueError, match="candidates"):
            labels_ranking(bad, candidates)


def test_a_large_run_whose_rankings_outnumber_the_letters_is_written_plain(tmp_path, monkeypatch):
    monkeypatch.setattr(task_file_module, "COMPACT_OVER", 1)
    items = [f"i{n:02d}" for n in range(63)]
    rows = [{"task_id": f"t{n}", "target": items[n], "rank": n + 1, "ranking": items,
             "valid": True, "well_formed": True, "seconds": 0.1,
             "candidates_sha256": candidates_sha256(items)} for n in range(2)]
    task_file_module.write_task_rows(rows, tmp_path / "wide.tasks.jsonl")
    assert task_file_module.read_task_file(tmp_path / "wide.tasks.jsonl") == rows
    task_file_module.write_task_rows([{**r, "ranking": items[:62]} for r in rows],
                                     tmp_path / "narrow.tasks.jsonl")
    assert "columns" in (tmp_path / "narrow.tasks.jsonl").read_text().splitlines()[0]
