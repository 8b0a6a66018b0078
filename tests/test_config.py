"""The configuration's layout and its rules: the teacher's and the student's own LLM
sections, the old top-level `llm` section read with a deprecation warning, the rules
between fields as validators (refused at load, whichever command loads it), and the
records identity of an unchanged teacher setup."""

from __future__ import annotations

import warnings

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from starrec.config import (
    ConfigDeprecationWarning,
    LLMConfig,
    MarsConfig,
    StarConfig,
    StudentConfig,
    load_config,
)


def _load(*overrides: str) -> StarConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigDeprecationWarning)  # none expected
        return load_config(None, list(overrides))


# --- the two LLM sections ------------------------------------------------------------------


def test_teacher_and_student_each_have_their_own_llm_section():
    cfg = _load("student.llm.base_url=http://gpu:8000/v1", "student.llm.served_model=student",
                "mars.llm.threads=2")
    assert cfg.student.llm.base_url == ["http://gpu:8000/v1"] and cfg.mars.llm.base_url is None
    assert cfg.student.llm.served_model == "student" and cfg.mars.llm.served_model is None
    assert cfg.mars.llm.threads == 2 and cfg.student.llm.threads is None
    assert "llm" not in StarConfig.model_fields  # no section answers for both
    with pytest.raises(ValidationError):
        _load("mars.llm.no_such_key=1")


def test_the_old_llm_section_applies_to_both_with_a_deprecation_warning(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text("llm:\n  backend: transformers\n  threads: 2\nmars:\n  llm:\n    threads: 4\n")
    with pytest.warns(ConfigDeprecationWarning, match=r"llm\.backend, llm\.threads.*mars\.llm.*student\.llm"):
        cfg = load_config(path, ["llm.n_ctx=2048"])
    assert cfg.mars.llm.backend == cfg.student.llm.backend == "transformers"
    assert cfg.mars.llm.n_ctx == cfg.student.llm.n_ctx == 2048
    assert (cfg.mars.llm.threads, cfg.student.llm.threads) == (4, 2)  # the new section wins
    # as keyword arguments too (a notebook's StarConfig(llm=...))
    with pytest.warns(ConfigDeprecationWarning):
        made = StarConfig(llm=LLMConfig(threads=3), student=StudentConfig(max_new_tokens=9))
    assert made.mars.llm.threads == made.student.llm.threads == 3
    assert made.student.max_new_tokens == 9


def test_the_cli_prints_the_deprecation_as_one_warning_line(capsys):
    from starrec.cli.options import config_from

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may escape as a Python warning
        cfg = config_from(None, ["llm.threads=2"])
    assert cfg.mars.llm.threads == cfg.student.llm.threads == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: the top-level llm section")


def test_records_identity_of_an_unchanged_teacher_keeps_its_old_layout():
    """The settings a teacher run's identity hashes are laid out as before the split:
    the teacher's section without its LLM under "params", the LLM's under "llm". The
    hash below is the one a records file written by commit a8449e5 holds for the default
    teacher (runs/eval/mars-presented.records.jsonl), with that run's store name."""
    from starrec.evaluation.identity import config_hash
    from starrec.experiment import llm_identity_params

    cfg = StarConfig()
    params = llm_identity_params("mars", cfg, None, "ml-100k-test-e359b03af4441e47.sqlite")
    assert set(params) == {"params", "model", "llm", "cst_store", "candidate_order"}
    assert "llm" not in params["params"] and params["model"] == "smollm2"
    assert config_hash(params) == "d0f1c265a94b259f"
    # what only moves answers elsewhere or faster stays out, as before
    served = cfg.mars.model_copy(update={"llm": LLMConfig(concurrency=8, threads=2, timeout_s=5)})
    moved = llm_identity_params("mars", cfg.model_copy(update={"mars": served}), None,
                                "ml-100k-test-e359b03af4441e47.sqlite")
    assert config_hash(moved) == "d0f1c265a94b259f"
    # the student's own section is the student's identity, not the teacher's
    student = llm_identity_params("star", cfg.model_copy(update={
        "mars": cfg.mars.model_copy(update={"llm": LLMConfig(n_ctx=1024)})}), "runs/s", "x")
    assert student["llm"] == cfg.student.llm.model_dump()


def test_teacher_runs_record_the_teacher_settings_without_its_llm(world):
    from starrec.agents.mars import MarsTeacher
    from tests.fakes import ScriptedModel, permutation

    store, tasks = world
    model = ScriptedModel({"planner": "recent: x", "recent": "Fine.", "ranker": permutation(20)})
    config = MarsConfig(reflection_rounds=0, llm=LLMConfig(base_url="http://a/v1"))
    run = MarsTeacher(model, store, config).run(tasks[0])
    assert run.config["mars"] == config.model_dump(exclude={"llm"})  # as runs always held it


# --- rules between fields ------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (["mars.llm.backend=transformers", "mars.llm.base_url=http://a/v1"],
     "base_url is set but backend=transformers"),
    (["student.llm.backend=llamacpp", "student.llm.guided=vllm"],
     "guided=vllm is server-side decoding"),
    (["mars.llm.backend=openai", "mars.llm.chat_template=t.jinja"],
     "chat_template applies to in-process models"),
    (["student.llm.base_url=http://a/v1", "student.llm.chat_template=t.jinja"],
     "chat_template applies to in-process models"),
    (["student.mode=reason", "student.debias_shuffles=4"],
     "debias_shuffles=4 applies to the fast mode"),
    (["student.mode=generate", "student.debias_shuffles=2"],
     "debias_shuffles=2 applies to the fast mode"),
    (["student.debias_shuffles=0"], "must be at least 1"),
    (["mars.candidate_order=cst", "sft.format.candidate_order=presented"],
     "mars.candidate_order (cst) and sft.format.candidate_order (presented) must agree"),
])
def test_settings_that_cannot_hold_together_are_refused_at_load(overrides, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _load(*overrides)


def test_settings_that_hold_together_load():
    _load("mars.llm.backend=openai", "mars.llm.base_url=http://a/v1", "mars.llm.guided=vllm")
    _load("student.llm.backend=transformers", "student.llm.chat_template=t.jinja")
    _load("student.mode=fast", "student.debias_shuffles=4")
    _load("student.mode=auto", "student.debias_shuffles=4")  # the card decides; checked at run
    _load("mars.candidate_order=cst", "sft.format.candidate_order=cst")


def test_the_teacher_order_and_the_student_format_order_are_one_setting():
    assert _load("mars.candidate_order=cst").sft.format.candidate_order == "cst"
    assert _load("sft.format.candidate_order=cst").mars.candidate_order == "cst"
    assert _load().mars.candidate_order == _load().sft.format.candidate_order == "presented"
    # a config file written by `star config dump` sets both: changing one there is refused
    with pytest.raises(ValidationError, match="must agree"):
        StarConfig.model_validate({"mars": {"candidate_order": "cst"},
                                   "sft": {"format": {"candidate_order": "presented"}}})


def test_a_refused_setting_is_one_error_line_naming_it(tmp_path):
    from starrec.cli.main import app

    result = CliRunner().invoke(app, ["eval", "--system", "mars", "--out", str(tmp_path / "r.json"),
                                      "--set", "mars.llm.backend=transformers",
                                      "--set", "mars.llm.base_url=http://a/v1"])
    assert result.exit_code == 2
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [line for line in result.output.splitlines() if line.strip()]
    assert "mars.llm: base_url is set but backend=transformers" in errors[0]
    result = CliRunner().invoke(app, ["eval", "--system", "mars", "--out", str(tmp_path / "r.json"),
                                      "--set", "mars.candidate_order=cst",
                                      "--set", "sft.format.candidate_order=presented"])
    assert result.exit_code == 2 and "error: bad setting in --config/--set: mars.candidate_order" \
        in result.output


# --- the dump ----------------------------------------------------------------------------


def test_the_dump_writes_long_descriptions_as_comment_lines_above_their_key():
    from starrec.cli.admin import WIDTH, dump_defaults

    text = dump_defaults()
    assert max(len(line) for line in text.splitlines()) <= WIDTH
    lines = text.splitlines()
    at = lines.index("  candidate_order: presented")  # mars's: a long description
    assert lines[at - 1].startswith("  # ") and "DESIGN.md 3.7" in "".join(lines[at - 4:at])
    assert "  llm:  # the teacher's LLM: engine, model, server" in lines
    assert "  llm:  # the student's LLM: engine, server (the model is --model, a student folder)" \
        in lines


def test_a_setting_added_later_leaves_earlier_run_identities_alone():
    """`negative_sampling` at its default hashes as the settings without it did, for a
    SASRec baseline and for the cst store's own SASRec; set away from it, it counts."""
    from starrec.evaluation.identity import config_hash

    cfg = StarConfig()
    sasrec = cfg.baselines.sasrec.model_dump()
    before = {k: v for k, v in sasrec.items() if k != "negative_sampling"}
    assert config_hash({"system": "sasrec", "params": sasrec}) == \
        config_hash({"system": "sasrec", "params": before})
    assert config_hash({"system": "sasrec", "params": {
        **sasrec, "negatives": 64, "negative_sampling": "popularity"}}) != \
        config_hash({"system": "sasrec", "params": {**sasrec, "negatives": 64}})
    cst = cfg.cst.model_dump()
    cst_before = {**cst, "latent_sasrec": {k: v for k, v in cst["latent_sasrec"].items()
                                           if k != "negative_sampling"}}
    assert config_hash({"system": "cst", "params": cst}) == \
        config_hash({"system": "cst", "params": cst_before})
    with pytest.raises(ValidationError, match="needs negatives"):
        StarConfig.model_validate({"baselines": {"sasrec": {"negative_sampling": "popularity"}}})
