"""`star pipeline` end to end on tiny data: baselines, a scripted teacher, a 1-step SFT of
a tiny model, teacher and student evaluated; a second run resumes instead of redoing."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from starrec.cli.main import app
from starrec.llm import models
from starrec.trajectories.recorder import read_runs
from tests.conftest import write_dataset_folder
from tests.fakes import ScriptedModel, permutation


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_resumes(tmp_path, monkeypatch, tiny_lm_dir):
    monkeypatch.setenv("STAR_HOME", str(tmp_path / "home"))
    data = tmp_path / "shop"
    write_dataset_folder(data, n_users=10, n_items=40)

    real_loader = models.load_chat_model
    teachers = []

    def load(spec, cfg):
        if spec != "fake-teacher":
            return real_loader(spec, cfg)  # the student: the tiny model SFT wrote
        teachers.append(ScriptedModel({"planner": "recent: x", "recent": "Fine.",
                                       "reflector": "ACCEPT", "ranker": permutation(20, [2])}))
        return teachers[-1]

    monkeypatch.setattr(models, "load_chat_model", load)
    monkeypatch.setattr("starrec.cli.teach._load_model", load)
    fitted = []
    from starrec import experiment

    real_evaluate = experiment.evaluate

    def evaluate(name, *a, **k):  # the rankers (baselines and cst) the pipeline fits
        if isinstance(name, str) and name in experiment.RANKER_SYSTEMS:
            fitted.append(name)
        return real_evaluate(name, *a, **k)

    monkeypatch.setattr(experiment, "evaluate", evaluate)
    out = tmp_path / "run"
    args = ["pipeline", "--dataset", str(data), "--systems", "pop,cst", "--teacher-tasks", "4",
            "--llm-eval-tasks", "2", "--model", "fake-teacher", "--out", str(out),
            "--set", "cst.content=false", "--set", f"sft.base_model={tiny_lm_dir}",
            "--set", "sft.max_steps=1", "--set", "sft.max_length=2048",
            "--set", "sft.filter.top_k=20",  # a scripted teacher rarely ranks the target first
            "--set", "student.max_new_tokens=8", "--set", "mars.llm.backend=transformers",
            "--set", "student.llm.backend=transformers",
            "--set", "grpo.max_completion_length=8", "--set", "grpo.train_tasks=2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    runs = read_runs(out / "teacher" / "train.jsonl")
    assert len(runs) == 4 and {r.task["split"] for r in runs} == {"train"}
    assert len({r.task["user_id"] for r in runs}) == 4
    assert (out / "student" / "star_model.json").exists()
    names = {p.name for p in out.glob("*.json")}
    assert {"shop-pop-test-all.json", "shop-cst-test-eval-200.json",
            "shop-mars-test-eval-200-first2.json", "shop-star-test-eval-200-first2.json",
            "shop-star-grpo-test-eval-200-first2.json",
            "shop-star-sft-unconstrained-test-eval-200-first2.json"} <= names
    assert (out / "student-grpo" / "star_model.json").exists()
    grpo = json.loads((out / "shop-star-grpo-test-eval-200-first2.json").read_text())
    assert grpo["config"]["variant"] == "grpo" and grpo["config"]["preset"] == "quick"
    stages = json.loads((out / "stages.json").read_text())
    assert {"tasks", "baselines and cst", "teacher (train tasks)", "sft", "grpo",
            "eval star (sft)", "eval star (grpo)", "eval star (sft, unconstrained)",
            "eval mars (teacher)"} <= set(stages)
    # the same student without the decoding props, on the same tasks
    free = json.loads((out / "shop-star-sft-unconstrained-test-eval-200-first2.json").read_text())
    assert free["config"]["variant"] == "sft, unconstrained" and free["n_tasks"] == 2
    assert free["config"]["params"]["constrain"] is False
    assert all(s["seconds"] >= 0 and s["status"] == "ran" for s in stages.values())
    assert "stage wall times" in result.output and "| grpo |" in result.output
    star = json.loads((out / "shop-star-test-eval-200-first2.json").read_text())
    # a pass is as many generation requests as it has continuations, not one LLM call
    assert star["n_tasks"] == 2 and star["efficiency"]["llm_calls_per_task"] >= 1
    assert (star["efficiency"]["llm_calls_per_task"]
            == star["efficiency"]["generation_requests_per_task"])
    assert (out / "shop-star-test-eval-200-first2.tasks.jsonl").exists()
    assert (out / "shop-pop-test-eval-200.tasks.jsonl").exists()
    # what the student's passes did, counted from their records' details
    answers = star["answers"]
    assert sum(answers["stop"].values()) == 2 and 0 <= answers["well_formed"] <= 2
    assert answers["tool_calls_per_task"] >= 0 and "answers" not in json.loads(
        (out / "shop-pop-test-all.json").read_text())
    mars = json.loads((out / "shop-mars-test-eval-200-first2.json").read_text())
    assert mars["n_tasks"] == 2 and mars["metrics"]["valid_rate"] == 100.0
    (teacher_runs,) = (out / "teacher").glob("test-eval-200-first2.*.jsonl")
    assert len(read_runs(teacher_runs)) == 2
    report = (out / "shop-report.md").read_text()
    assert all(f"| {name} |" in report for name in ("pop", "cst", "mars", "star (sft)",
                                                     "star (grpo)", "star (sft, unconstrained)"))
    assert sorted(fitted) == ["cst", "pop"]
    assert sum(len(t.calls) for t in teachers) > 0

    # a second run finds every stage done: nothing refitted, taught, trained or re-asked
    first_run = len(teachers)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(fitted) == ["cst", "pop"]
    assert len(teachers) > first_run and all(not t.calls for t in teachers[first_run:])
    assert "0 run(s) written, 4 already done" in result.output
    assert "sft: " in result.output and "is trained" in result.output
    assert "grpo: " in result.output and json.loads((out / "stages.json").read_text())[
        "grpo"]["status"] == "resumed"
    assert (out / "shop-report.md").read_text() == report


def test_teacher_draws_are_nested_and_whole_users():
    from starrec.pipeline import teacher_sample
    from starrec.data.tasks import build_split_tasks
    from tests.conftest import make_dataset

    tasks = build_split_tasks(make_dataset(n_users=30), "train")
    small, large = teacher_sample(tasks, 5, seed=0), teacher_sample(tasks, 12, seed=0)
    assert len({t.user_id for t in small}) == 5 and len({t.user_id for t in large}) == 12
    assert {t.task_id for t in small} <= {t.task_id for t in large}
    assert [t for t in tasks if t in large] == large  # file order
    assert {t.user_id for t in teacher_sample(tasks, 5, seed=1)} != {t.user_id for t in small}


def test_pipeline_refuses_orders_that_would_drop_every_teacher_run(tmp_path):
    # one of the two set: the other follows (StarConfig's rule, tests/test_config.py)
    result = CliRunner().invoke(app, ["pipeline", "--out", str(tmp_path),
                                      "--set", "mars.candidate_order=cst",
                                      "--set", "sft.format.candidate_order=presented"])
    assert result.exit_code == 2 and "must agree" in result.output
    assert not any(tmp_path.iterdir())  # refused before any stage


def test_answerer_key_follows_what_decides_the_answers(tmp_path):
    from starrec.pipeline import answerer_key
    from starrec.config import StarConfig
    from starrec.llm.card import ModelCard, write_model_card

    card = ModelCard(stage="sft", base_model="smollm2", base_model_path="x", created="t0",
                     plan_choices=["recent: x"], max_reflection_tokens=10)
    write_model_card(tmp_path, card)
    cfg = StarConfig()
    key = answerer_key("star", str(tmp_path), cfg)
    assert key == answerer_key("star", str(tmp_path), cfg)
    for change in ({"max_reflection_tokens": 11}, {"plan_choices": []}, {"created": "t1"}):
        write_model_card(tmp_path, card.model_copy(update=change))
        assert answerer_key("star", str(tmp_path), cfg) != key, change
    write_model_card(tmp_path, card.model_copy(update={"metrics": {"seconds": 1.0}}))
    assert answerer_key("star", str(tmp_path), cfg) == key  # not read by inference
    other = cfg.model_copy(update={"student": cfg.student.model_copy(update={"max_new_tokens": 9})})
    assert answerer_key("star", str(tmp_path), other) != key
    assert answerer_key("mars", None, cfg) != answerer_key(
        "mars", None, cfg.model_copy(update={"mars": cfg.mars.model_copy(update={"max_turns": 2})}))


def test_presets_lie_under_the_config_file_and_the_overrides(tmp_path):
    from starrec.config import load_config, preset_names

    assert {"quick", "full"} <= set(preset_names())
    quick = load_config(preset="quick")
    assert quick.pipeline.preset == "quick" and quick.pipeline.teacher_tasks < 60
    assert quick.grpo.steps < load_config().grpo.steps
    # at the quick size the outcome filter could keep no teacher run for SFT to train on
    assert quick.sft.filter.top_k >= 20 and quick.pipeline.teacher_tasks >= 1
    config = tmp_path / "c.yaml"
    config.write_text("pipeline:\n  teacher_tasks: 9\n")
    both = load_config(config, ["pipeline.llm_eval_tasks=3"], preset="quick")
    assert both.pipeline.teacher_tasks == 9 and both.pipeline.llm_eval_tasks == 3
    assert both.sft.max_steps == quick.sft.max_steps  # the preset's, where nothing overrides
    full = load_config(preset="full")
    assert full.pipeline.preset == "full" and full.pipeline.llm_eval_tasks is None
    with pytest.raises(ValueError, match="unknown preset"):
        load_config(preset="nope")


def test_pipeline_refuses_an_unknown_preset_with_one_line(tmp_path):
    result = CliRunner().invoke(app, ["pipeline", "--out", str(tmp_path), "--preset", "huge"])
    assert result.exit_code == 2 and "huge" in result.output
