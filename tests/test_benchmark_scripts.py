"""The benchmark scripts whose outputs the README cites, run end to end on tiny data: a
script that breaks is found here, not in the middle of an hour-long run."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import yaml

from starrec.cst.features import FEATURES, GROUPS
from tests.conftest import write_dataset_folder

ROOT = Path(__file__).resolve().parents[1]
FAST = ["baselines.sasrec.epochs=2", "baselines.als.iterations=2", "cst.latent_sasrec.epochs=1",
        "cst.latent_als.iterations=2", "eval.bootstrap_resamples=20", "cst.content=false"]


def script(name: str):
    """benchmarks/<name>.py as a module of its own name, importable again in the fresh
    processes some scripts start (spawn passes sys.path on)."""
    folder = str(ROOT / "benchmarks")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module(name)


@pytest.fixture
def shop(tmp_path, monkeypatch):
    monkeypatch.setenv("STAR_HOME", str(tmp_path / "home"))
    folder = tmp_path / "shop"
    write_dataset_folder(folder, n_users=40, n_items=50, per_user=10)
    return folder


def overrides(values: list[str]) -> list[str]:
    return [part for value in values for part in ("--set", value)]


def test_baseline_table_writes_every_system_and_pairs_it_to_sasrec(shop, tmp_path, capsys):
    bench = script("baseline_table")
    out = tmp_path / "results"
    argv = ["--dataset", str(shop), "--out-dir", str(out), *overrides(FAST)]
    assert bench.main(argv) == 0
    names = [name for name, *_ in bench.SYSTEMS]
    for name in names:
        for users in ("all", "eval-200"):
            result = json.loads((out / f"shop-{name}-test-{users}.json").read_text())
            assert result["n_tasks"] == 40 and result["config"]["users"] == users
            assert (out / f"shop-{name}-test-{users}.tasks.jsonl").exists()
    # the variant without latent signals ran with them off, on its own store
    without = json.loads((out / "shop-cst-nolatent-test-eval-200.json").read_text())["config"]
    with_latent = json.loads((out / "shop-cst-test-eval-200.json").read_text())["config"]
    assert without["params"]["latent"] is False and with_latent["params"]["latent"] is True
    assert without["cst_store"] != with_latent["cst_store"]
    table = (out / "shop-table.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ") and "test eval-200" in line]
    assert len(lines) == len(names)
    assert "(the reference)" in next(line for line in lines if line.startswith("| sasrec |"))
    others = [line for line in lines if not line.startswith("| sasrec |")]
    assert all(" / " in line.split("|")[9] for line in others)  # W / T / L to sasrec
    # a rerun evaluates nothing again
    capsys.readouterr()
    assert bench.main(argv) == 0
    assert capsys.readouterr().out.count(": kept ") == len(names)
    # one fit serves both rows: on a set of 40 users, eval-200 is every one of them
    for name in names:
        both = [json.loads((out / f"shop-{name}-test-{users}.json").read_text())["metrics"]
                for users in ("all", "eval-200")]
        assert both[0] == both[1]


def test_cst_ablation_drops_each_signal_group_on_valid(shop, tmp_path):
    bench = script("cst_ablation")
    out = tmp_path / "ablation.json"
    assert bench.main(["--dataset", str(shop), "--out", str(out), *overrides(FAST)]) == 0
    result = json.loads(out.read_text())
    assert result["fit_split"] == "train" and result["scored_split"] == "valid"
    variants = result["variants"]
    assert [v["dropped"] for v in variants] == [None, *GROUPS]
    for variant in variants[1:]:
        assert variant["features_dropped"] == sum(f.group == variant["dropped"] for f in FEATURES)
        wins, ties, losses = variant["wins_ties_losses"]
        assert wins + ties + losses == result["scored_tasks"] == 40
        low, high = variant["paired_ci95"]
        assert low <= variant["paired_AvgHR_vs_all"] <= high
    assert all(0 <= v["AvgHR"] <= 100 for v in variants)


def test_target_ranks_keep_the_presented_order_on_ties():
    import numpy as np

    bench = script("cst_ablation")
    scores = np.array([1.0, 3.0, 3.0, 0.0, 0.0, 0.0])
    labels = np.array([0, 0, 1, 1, 0, 0])
    assert bench.target_ranks(scores, labels, np.array([3, 3])) == [2, 1]


def test_tune_baselines_writes_the_chosen_settings(shop, tmp_path):
    bench = script("tune_baselines")
    out = tmp_path / "tuned"
    bench.main(["--dataset", str(shop), "--grid", "smoke", "--out-dir", str(out),
                "--sasrec-epochs", "2", "--sasrec-hidden", "8",
                *overrides(["eval.bootstrap_resamples=20"])])
    result = json.loads((out / "tuned_baselines.json").read_text())
    chosen = yaml.safe_load((out / "baselines-tuned-shop.yaml").read_text())["baselines"]
    assert result["split"] == "valid" and result["n_tasks"] == 40
    for name in ("itemknn", "als", "sasrec"):
        scores = result["scores"][name]
        best = max(scores, key=lambda r: r["AvgHR"])
        assert {k: chosen[name][k] for k in best["params"]} == best["params"]
    # --sasrec-epochs replaces the grid's epoch counts (the smoke grid's are 1 and 2)
    assert {r["params"]["epochs"] for r in result["scores"]["sasrec"]} == {2}
    # --sasrec-hidden replaces the grid's sizes (the smoke grid's is 16)
    assert {r["params"]["hidden"] for r in result["scores"]["sasrec"]} == {8}
    assert chosen["sasrec"]["hidden"] == 8


def test_load_api_smoke_run_against_real_servers(shop, tmp_path):
    """The load benchmark end to end at a smoke size: a real `star serve` process per case,
    the aiohttp generator, the prefill limit of a tiny student, and the report."""
    bench = script("load_api")
    out = tmp_path / "load.json"
    assert bench.main(["--smoke", "--systems", "pop,cst,star", "--student", "tiny",
                       "--student-modes", "fast,generate", "--dataset", str(shop),
                       "--out", str(out), *overrides(FAST), "--set", "student.max_new_tokens=8"]) == 0
    report = json.loads(out.read_text())
    cases = {(level["system"], level["mode"], level["batching"]) for level in report["levels"]}
    # cst and the student's fast mode are measured with and without micro-batching, pop
    # and the generating mode without
    assert cases == {("pop", None, False), ("cst", None, True), ("cst", None, False),
                     ("star", "fast", True), ("star", "fast", False),
                     ("star", "generate", False)}
    for level in report["levels"]:
        assert level["statuses"].get("200", 0) > 0 and level["errors"] == 0
        assert level["p50_ms"] <= level["p95_ms"] <= level["p99_ms"]
    prefill = report["prefill"]
    assert prefill["prompt_tokens_mean"] > 0 and prefill["limit_rps"] > 0
    assert report["targets"]["errors_other_than_503"]["met"] is True


def test_cst_build_benchmark_on_a_real_dataset_folder(shop, tmp_path):
    bench = script("cst_build")
    out = tmp_path / "build.json"
    bench.main(["--dataset", str(shop), "--no-synthetic", "--engine", "memory", "--out", str(out),
                "--set", "cst.latent_sasrec.epochs=1", "--set", "cst.content=false"])
    (case,) = json.loads(out.read_text())["cases"]
    assert case["engine"] == "memory" and case["rows"] > 0
    assert case["overrides"] == ["cst.latent_sasrec.epochs=1", "cst.content=false"]
    # wall time and peak memory of each stage, the latent models among them
    assert set(case["stages_s"]) == set(case["stages_peak_rss_mb"])
    assert any("latent" in stage for stage in case["stages_s"])
    # the build resets the high-water mark per stage: the case's peak still covers them all
    assert case["peak_rss_mb"] >= round(max(case["stages_peak_rss_mb"].values()))


def test_cst_build_peak_counts_the_stage_peaks(monkeypatch):
    bench = script("cst_build")
    monkeypatch.setattr(bench, "rss_mb", lambda: 500.0)
    assert bench.peak_mb({"graph": 300.0, "content embeddings": 1867.4}) == 1867
    assert bench.peak_mb({"graph": 300.0}) == 500 and bench.peak_mb(None) == 500


def test_cst_build_benchmark_on_a_synthetic_log_and_over_a_memory_cap(tmp_path):
    """Both engines build the same synthetic store; a case whose process passes the
    resident-memory cap is stopped and recorded as over it, and the run goes on."""
    bench = script("cst_build")
    out = tmp_path / "build.json"
    small = ["--rows", "20000", "--users", "500", "--items", "300", "--no-dataset",
             "--duckdb-memory-limit", "500MB", "--out", str(out)]
    bench.main([*small, "--engine", "memory", "duckdb"])
    memory, duckdb = json.loads(out.read_text())["cases"]
    assert (memory["engine"], duckdb["engine"]) == ("memory", "duckdb")
    assert memory["rows"] == duckdb["rows"] > 0 and memory["store_mb"] == duckdb["store_mb"]
    bench.main([*small, "--engine", "memory", "--rss-cap-mb", "30"])
    (over,) = json.loads(out.read_text())["cases"]
    assert over["engine"] == "memory" and "passed 30 MiB" in over["failed"]


def test_sasrec_epochs_curve_on_valid(shop, tmp_path):
    bench = script("sasrec_epochs")
    out = tmp_path / "curve.json"
    assert bench.main(["--dataset", str(shop), "--epochs", "3", "--every", "2", "--out", str(out),
                       "--set", "baselines.sasrec.negatives=8"]) == 0
    result = json.loads(out.read_text())
    assert [p["epoch"] for p in result["curve"]] == [2, 3]  # every 2nd, and the last
    assert result["params"]["negatives"] == 8 and result["n_valid_tasks"] == 40
    assert result["best"] in result["curve"]


def test_quick_pipeline_sums_the_stages_and_judges_the_target():
    bench = script("quick_pipeline")
    stages = {"tasks": {"stage": "tasks", "seconds": 2.04, "status": "ran"},
              "sft": {"stage": "sft", "seconds": 600.0, "status": "ran"}}
    record = bench.summary(150.0, stages, "abc", {"cores": 2})
    assert record["stages_s"] == {"tasks": 2.0, "sft": 600.0}
    assert record["pipeline_s"] == 602.0 and record["met"] is True
    slow = {**stages, "teacher": {"stage": "teacher", "seconds": 1000.0, "status": "ran"}}
    assert bench.summary(150.0, slow, "abc", {"cores": 2})["met"] is False
    table = bench.table(record)
    assert "| sft | 600 |" in table and "602" in table and "| setup" in table


def test_hf_prefix_reuse_runs_both_settings_on_every_task(shop, tmp_path, tiny_lm_dir, capsys):
    bench = script("hf_prefix_reuse")
    out = tmp_path / "reuse.json"
    argv = ["--model", str(tiny_lm_dir), "--dataset", str(shop), "--tasks", "2", "--threads", "1",
            "--out", str(out), *overrides([*FAST, "student.max_new_tokens=12"])]
    assert bench.main(argv) == 0
    record = json.loads(out.read_text())
    rows = record["passes"]
    assert [(r["task_id"], r["reuse"]) for r in rows][:2] == [(rows[0]["task_id"], False),
                                                              (rows[0]["task_id"], True)]
    assert {r["reuse"] for r in rows[2:]} == {True, False} and rows[2]["reuse"] is True
    for row in rows:
        assert row["prompt_tokens_computed"] <= row["prompt_tokens"]
        if not row["reuse"]:
            assert row["prompt_tokens_computed"] == row["prompt_tokens"]
    assert set(record["summary"]) == {"no_reuse", "reuse", "speedup_median"}
    assert "paired speed-up" in capsys.readouterr().out


def test_rank_head_eval_pairs_the_head_to_cst_and_sasrec_in_one_run(shop, tmp_path, tiny_lm_dir,
                                                                     capsys):
    bench = script("rank_head_eval")
    out = tmp_path / "results"
    argv = ["--dataset", str(shop), "--head", str(tiny_lm_dir), "--debias", "2", "--out-dir",
            str(out), "--records-dir", str(tmp_path / "records"), "--set",
            "student.llm.threads=1", *overrides(FAST)]
    assert bench.main(argv) == 0
    names = ["cst", "cst-nolatent", "cst-manual", "sasrec", "head-fast", "head-fast-debias2"]
    # the debiased row (K passes a task) runs on eval-200 only unless asked
    assert not (out / "shop-head-fast-debias2-test-all.json").exists()
    for name in names:
        for users in ("all", "eval-200") if name != "head-fast-debias2" else ("eval-200",):
            result = json.loads((out / f"shop-{name}-test-{users}.json").read_text())
            assert result["n_tasks"] == 40 and result["config"]["users"] == users
            assert (out / f"shop-{name}-test-{users}.tasks.jsonl").exists()
    nolatent = json.loads((out / "shop-cst-nolatent-test-all.json").read_text())
    assert nolatent["config"]["params"]["latent"] is False
    assert json.loads((out / "shop-cst-test-all.json").read_text())["config"]["params"]["latent"]
    fast = json.loads((out / "shop-head-fast-test-all.json").read_text())
    debiased = json.loads((out / "shop-head-fast-debias2-test-eval-200.json").read_text())
    assert fast["config"]["params"]["mode"] == "fast"
    assert debiased["config"]["params"]["debias_shuffles"] == 2
    table = (out / "shop-rank-head-table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "test all" in line]
    assert len(rows) == len(names) - 1
    assert sum("test eval-200" in line for line in table.splitlines()) == len(names)
    cst_row = next(line for line in rows if line.startswith("| cst (learned on valid, latent"))
    head_row = next(line for line in rows if line.startswith("| ranking head, fast |"))
    assert cst_row.split("|")[7].strip() == "(the reference)"
    assert " / " in head_row.split("|")[7] and " / " in head_row.split("|")[8]
    manual_row = next(line for line in rows if line.startswith("| cst-manual"))
    assert manual_row.split("|")[9].strip() == "(the reference)"
    assert " / " in head_row.split("|")[9] and " / " in head_row.split("|")[10]
    nolatent_row = next(line for line in rows if "no latent signals) |" in line)
    assert nolatent_row.split("|")[10].strip() == "(the reference)"
    # the LLM rows resume from their records and the rankers' files are kept
    capsys.readouterr()
    assert bench.main(argv) == 0
    assert capsys.readouterr().out.count(": kept ") == len(names)


def test_rank_head_curve_pairs_each_valid_point_with_the_references(shop, tmp_path):
    bench = script("rank_head_curve")
    head = tmp_path / "head"
    head.mkdir()
    n = 12
    curve = {"train": [{"step": 1, "loss": 2.9}],
             "eval": [{"step": 0, "AvgHR": 10.0, "HR@1": 0.0, "n_tasks": n, "ranks": [20] * n},
                      {"step": 5, "AvgHR": 100.0, "HR@1": 100.0, "n_tasks": n, "ranks": [1] * n}]}
    (head / "loss.json").write_text(json.dumps(curve))
    out = tmp_path / "results"
    assert bench.main(["--head", str(head), "--dataset", str(shop), "--out-dir", str(out),
                       *overrides(FAST)]) == 0
    summary = json.loads((out / "shop-rank-head-valid-curve.json").read_text())
    assert summary["n_tasks"] == n and [p["step"] for p in summary["points"]] == [0, 5]
    for name in ("cst", "sasrec"):
        assert (out / f"shop-{name}-valid-200.tasks.jsonl").exists()
        reference = summary["references_AvgHR"][name]
        top, bottom = summary["points"][1][f"vs_{name}"], summary["points"][0][f"vs_{name}"]
        # a head that ranks every target first gains exactly what the reference misses
        assert top["difference"] == pytest.approx(100 - reference, abs=0.01)
        assert top["losses"] == 0 and bottom["wins"] == 0
        assert top["ci95"][0] <= top["difference"] <= top["ci95"][1]
    assert "| 5 | 100.0 |" in (out / "shop-rank-head-valid-curve.md").read_text()
    with pytest.raises(SystemExit):
        bench.main(["--head", str(tmp_path / "nothing"), "--dataset", str(shop)])


def test_rank_head_cost_renders_the_heads_own_prompt_at_each_budget(shop, tmp_path, tiny_lm_dir):
    """The cost rows use the folder card's prompt spec (only budget and history vary), and
    a larger evidence budget gives a longer prompt."""
    import shutil

    from starrec.llm.card import HeadSpec, ModelCard, write_model_card

    head = tmp_path / "head"
    shutil.copytree(tiny_lm_dir, head)
    write_model_card(head, ModelCard(stage="rank", base_model="tiny", base_model_path=str(head),
                                     head=HeadSpec(readout="line", evidence_style="compact",
                                                   history_items=3)))
    out = tmp_path / "cost.json"
    argv = ["--model", str(head), "--dataset", str(shop), "--tasks", "2", "--budgets", "0", "24",
            "--repeats", "1", "--threads", "1", "--out", str(out)]
    assert script("rank_head_cost").main(argv) == 0
    record = json.loads(out.read_text())
    assert record["head"]["readout"] == "line" and record["head"]["evidence_style"] == "compact"
    rows = record["rows"]
    assert [row["evidence_tokens"] for row in rows] == [0, 24]
    assert {row["history_items"] for row in rows} == {3}  # the card's, unless asked
    assert record["model_hash"] and record["repeats"] == 1
    assert rows[0]["prompt_tokens"] < rows[1]["prompt_tokens"]
    assert all(row["head_s"] > 0 and row["prefill_s"] > 0 for row in rows)
    assert record["machine"]["cores"] >= 1 and record["code_version"]


def test_sasrec_threads_times_every_case(shop, tmp_path):
    bench = script("sasrec_threads")
    out = tmp_path / "threads.json"
    assert bench.main(["--dataset", str(shop), "--threads", "1", "--negatives", "full,8",
                       "--epochs", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(c["negatives"], c["threads"]) for c in result["cases"]] == [("full softmax", 1), (8, 1)]
    assert all(c["s_per_epoch"] > 0 for c in result["cases"]) and result["rows"] > 0
    with pytest.raises(SystemExit):
        bench.main(["--dataset", str(shop), "--negatives", "all"])


def test_spread_share_counts_the_subsets_whose_rewards_differ():
    bench = script("grpo_spread")
    assert bench.spread_share([[1.0, 1.0, 1.0, 1.0]], 2) == 0
    # one odd pass among four: 3 of the 6 pairs hold it, 3 of the 4 triples
    assert bench.spread_share([[0.0, 1.0, 1.0, 1.0]], 2) == pytest.approx(0.5)
    assert bench.spread_share([[0.0, 1.0, 1.0, 1.0]], 3) == pytest.approx(0.75)
    assert bench.spread_share([[0.0, 1.0, 1.0, 1.0]], 4) == 1
    assert bench.spread_share([[0.0, 0.0], [0.0, 1.0]], 2) == pytest.approx(0.5)


def test_grpo_spread_samples_every_group_at_every_temperature(shop, tmp_path, tiny_lm_dir):
    bench = script("grpo_spread")
    out = tmp_path / "spread.json"
    assert bench.main(["--model", str(tiny_lm_dir), "--dataset", str(shop), "--prompts", "3",
                       "--group", "3", "--temperatures", "0.7,1.5", "--out", str(out),
                       "--set", "grpo.max_completion_length=12",
                       "--set", "grpo.difficulty_ratio=[1,1,1]", *overrides(FAST)]) == 0
    result = json.loads(out.read_text())
    assert set(result["by_temperature"]) == {"0.7", "1.5"}
    rows = [json.loads(line) for line in out.with_suffix(".tasks.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3 * 3
    for temperature, summary in result["by_temperature"].items():
        mine = [r for r in rows if r["temperature"] == float(temperature)]
        assert summary["passes"] == 9 and summary["prompts"] == 3
        assert all(r["task_id"].startswith("train") for r in mine)
        assert set(summary["spread_share"]) == {"2", "3"}
        assert 0 <= summary["spread_share"]["2"] <= summary["spread_share"]["3"] <= 1
        assert summary["reward"] == pytest.approx(sum(r["reward"] for r in mine) / 9)
        # the passes of a group are seeded apart: the same seeds at both temperatures
        assert len({r["seed"] for r in mine}) == 3
    # a rerun samples nothing again (a resume), and other settings are refused
    argv = ["--model", str(tiny_lm_dir), "--dataset", str(shop), "--prompts", "3",
            "--temperatures", "0.7,1.5", "--out", str(out), "--set",
            "grpo.max_completion_length=12", "--set", "grpo.difficulty_ratio=[1,1,1]",
            *overrides(FAST)]
    before = out.with_suffix(".tasks.jsonl").read_text()
    assert bench.main([*argv, "--group", "3"]) == 0
    assert out.with_suffix(".tasks.jsonl").read_text() == before
    assert json.loads(out.read_text())["by_temperature"] == result["by_temperature"]
    with pytest.raises(SystemExit, match="other settings"):
        bench.main([*argv, "--group", "2"])
    assert bench.main([*argv, "--group", "2", "--fresh"]) == 0
    assert len(out.with_suffix(".tasks.jsonl").read_text().splitlines()) == 2 * 3 * 2
    with pytest.raises(SystemExit):
        bench.main(["--model", str(tiny_lm_dir), "--temperatures", "0"])


def test_grpo_study_stages_call_star_with_the_studys_paths(tmp_path):
    import subprocess

    def stage(*args: str, **extra: str) -> subprocess.CompletedProcess:
        env = {"PATH": "/usr/bin:/bin", "R": str(tmp_path / "runs"), "STAR": "echo star",
               "PY": "echo python", **extra}
        return subprocess.run(["bash", str(ROOT / "benchmarks" / "grpo_study.sh"), *args],
                              cwd=tmp_path, env=env, capture_output=True, text=True)

    runs = tmp_path / "runs"
    assert stage("sft").stdout.split() == [
        "star", "distill", "sft", "--trajectories", f"{runs}/teacher-train.jsonl", "--top-k",
        "5", "--out", f"{runs}/sft", "--resume"]
    grpo = stage("grpo", "--max-steps", "3").stdout.split()
    assert grpo[:3] == ["star", "distill", "grpo"] and grpo[-2:] == ["--max-steps", "3"]
    assert "--resume" in grpo and f"{runs}/sft" in grpo
    evaluated = stage("eval-grpo").stdout.split()
    assert f"{runs}/grpo" in evaluated and evaluated[evaluated.index("--users") + 1] == "eval-200"
    assert evaluated[-1].endswith("grpo-study/ml-100k-star-grpo-test-eval-200.json")
    assert "grpo_spread.py" in stage("spread").stdout
    lists = stage("lists").stdout.split()
    assert "grpo_list_temperature.py" in lists[1] and f"{runs}/sft" in lists
    assert lists[lists.index("--out") + 1].endswith("grpo-study/grpo_list_temperature.json")
    assert lists[lists.index("--temperatures") + 1] == "1,2,3,5"
    ablated = [line.split() for line in stage("ablate-sft").stdout.splitlines()]
    assert [(a[a.index("--out") + 1], a[-2]) for a in ablated] == [
        (f"{runs}/sft-no-reflection", "--no-reflection"), (f"{runs}/sft-no-tools", "--no-tools")]
    evals = [line.split() for line in stage("eval-ablate").stdout.splitlines()]
    assert [e[e.index("--model") + 1] for e in evals] == [
        f"{runs}/sft-no-reflection", f"{runs}/sft-no-tools", f"{runs}/grpo"]
    assert all(e[e.index("--users") + 1] == "eval-200" for e in evals)
    assert evals[2][evals[2].index("--set") + 1] == "student.evidence=false"
    assert len({e[-1] for e in evals}) == 3 and all(e[-1].endswith("-test-eval-200.json") for e in evals)
    # one ablation at a time, and the evidence ablation on the student the study settled on
    one = stage("ablate-sft", "no-tools").stdout.splitlines()
    assert len(one) == 1
    one = one[0].split()
    assert one[one.index("--out") + 1] == f"{runs}/sft-no-tools" and one[-2] == "--no-tools"
    assert stage("eval-ablate", "no-tools").stdout.split()[-1].endswith(
        "ml-100k-star-sft-no-tools-test-eval-200.json")
    on_sft = stage("eval-ablate", "no-evidence", EVIDENCE_MODEL="sft").stdout.split()
    assert on_sft[on_sft.index("--model") + 1] == f"{runs}/sft"
    assert on_sft[-1].endswith("ml-100k-star-sft-no-evidence-test-eval-200.json")
    # a wrong name anywhere is refused before any ablation runs
    for bad in (("ablate-sft", "no-tools", "no-evidence"), ("eval-ablate", "no-tools", "no-grpo")):
        refused = stage(*bad)
        assert refused.returncode == 2 and "unknown ablation" in refused.stderr
        assert refused.stdout == ""
    wrong = stage("nonsense")
    assert wrong.returncode == 2 and "usage" in wrong.stderr



def test_grpo_list_temperature_samples_lists_where_a_repair_would_start_them(shop, tmp_path,
                                                                             tiny_lm_dir,
                                                                             monkeypatch):
    from starrec.training.rollout import PolicyModel

    bench = script("grpo_list_temperature")
    asked = []  # (prompt, temperature, constrained) of every list sampled
    complete = PolicyModel.complete

    def spy(self, prompt, **kwargs):
        asked.append((prompt, kwargs["temperature"], kwargs["constraint"] is not None))
        return complete(self, prompt, **kwargs)

    monkeypatch.setattr(PolicyModel, "complete", spy)
    out = tmp_path / "lists.json"
    argv = ["--model", str(tiny_lm_dir), "--dataset", str(shop), "--prompts", "3",
            "--samples", "2", "--temperatures", "1,50", "--out", str(out),
            "--set", "grpo.max_completion_length=12", "--set", "grpo.difficulty_ratio=[1,1,1]",
            *overrides(FAST)]
    assert bench.main(argv) == 0
    result = json.loads(out.read_text())
    rows = [json.loads(line) for line in out.with_suffix(".tasks.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["task_id"].startswith("train") for r in rows)
    # 2 lists at each of 2 temperatures a prompt, each continuing the pass's text at a new
    # <recommend> opening, under the mask
    assert len(asked) == 3 * 2 * 2
    assert all(prompt.endswith("\n<recommend>") and constrained for prompt, _, constrained in asked)
    assert [t for _, t, _ in asked] == [1.0, 1.0, 50.0, 50.0] * 3
    assert len({prompt for prompt, _, _ in asked}) == 3
    for row in rows:
        assert set(row["lists"]) == {"1.0", "50.0"}
        assert isinstance(row["pass_opened_recommend"], bool) and 1 <= row["shown_rank"] <= 20
        for lists in row["lists"].values():
            # the mask makes every list a permutation of the shown candidates
            assert all(len(s["ranking"]) == 20 and len(set(s["ranking"])) == 20 for s in lists)
            assert all(s["rank"] is not None and -1 <= s["tau"] <= 1 for s in lists)
            # the same seeds on every prompt and at every temperature
            assert [s["seed"] for s in lists] == [s["seed"] for s in rows[0]["lists"]["1.0"]]
        assert len({s["seed"] for s in row["lists"]["1.0"]}) == 2
    for temperature in ("1.0", "50.0"):
        summary = result["by_temperature"][temperature]
        lists = [s for r in rows for s in r["lists"][temperature]]
        assert summary["lists"] == 6 and summary["prompts"] == 3
        assert summary["shown_order_share"] == pytest.approx(
            sum(s["shown_order"] for s in lists) / 6)
        assert summary["first_shown_first_share"] == pytest.approx(
            sum(s["first_is_first_shown"] for s in lists) / 6)
        assert summary["outcome"] == pytest.approx(sum(s["outcome"] for s in lists) / 6)
        assert summary["outcome_spread_share"] == pytest.approx(sum(
            len({s["outcome"] for s in r["lists"][temperature]}) > 1 for r in rows) / 3)
    # a near-flat distribution over labels (T = 50) leaves the shown order behind
    assert result["by_temperature"]["50.0"]["tau_to_shown"] < 0.9
    # a resume runs nothing again; a last line cut by a kill is run again
    rows_file = out.with_suffix(".tasks.jsonl")
    before = rows_file.read_text()
    assert bench.main(argv) == 0
    assert rows_file.read_text() == before
    rows_file.write_text(before[:-40])
    assert bench.main(argv) == 0
    assert [json.loads(line)["task_id"] for line in rows_file.read_text().splitlines()] == [
        r["task_id"] for r in rows]
    with pytest.raises(SystemExit, match="other settings"):
        bench.main([*argv, "--samples", "3"])
    # a broken line before the last is no kill's doing: refused, not dropped
    lines = rows_file.read_text().splitlines()
    rows_file.write_text("\n".join([lines[0][:-5], *lines[1:]]) + "\n")
    with pytest.raises(SystemExit, match="line 1 is not JSON"):
        bench.main(argv)


def test_grpo_list_temperature_refuses_a_single_sample(capsys):
    bench = script("grpo_list_temperature")
    with pytest.raises(SystemExit):
        bench.parse_args(["--model", "m", "--samples", "1"])
    assert "--samples at least 2" in capsys.readouterr().err


def test_list_opening_starts_a_list_after_the_last_recommend_or_after_the_text():
    from starrec.inference.student import list_opening

    assert list_opening("<plan>p</plan>\n<recommend>[A, A") == ("<plan>p</plan>", "\n<recommend>")
    # a part left open is closed first, so the list is the answer's own part
    kept, opening = list_opening("<plan>p</plan>\n<reflection>r ")
    assert kept == "<plan>p</plan>\n<reflection>r"
    assert opening == "</reflection>\n<recommend>"
