"""SFT on the tiny model: weights change, the folder loads, checkpoints resume, CLI."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from starrec.agents.choices import plan_options
from starrec.config import SFTSettings, StudentFormatConfig
from starrec.llm.card import read_model_card
from starrec.trajectories.dataset import build_sft_dataset
from starrec.trajectories.serialize import PROMPT_VERSION, serialize_run
from starrec.training.pipeline import plan_choices
from starrec.training.sft import train_sft
from tests.conftest import write_dataset_folder
from tests.test_trajectories import make_run, make_task, title

# No tool list in the prompt: sequences stay inside the tiny model's 1024 positions.
FORMAT = StudentFormatConfig(tools=False)
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
MLP = "model.layers.0.mlp.up_proj.weight"
EMBEDDINGS = "model.embed_tokens.weight"


def settings(**changes) -> SFTSettings:
    base = dict(max_steps=2, batch_size=2, grad_accum=1, learning_rate=1e-3, warmup=0.0,
                save_steps=1, eval_steps=1, logging_steps=1, max_length=1024, lora_r=4,
                lora_alpha=8, format=FORMAT)
    return SFTSettings(**{**base, **changes})


@pytest.fixture(scope="module")
def data(tiny_lm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    runs = [serialize_run(make_run(make_task(f"train-u{k}", history=k)), title, FORMAT)
            for k in range(1, 6)]
    train, _ = build_sft_dataset(runs[:4], tokenizer, 1024, show_progress=False)
    valid, _ = build_sft_dataset(runs[4:], tokenizer, 1024, show_progress=False)
    return train, valid


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_lora_sft_changes_weights_and_writes_a_loadable_folder(tiny_lm_dir, data, tmp_path):
    from starrec.llm.hf_backend import HFChatModel

    train, valid = data
    out = tmp_path / "student"
    result = train_sft(str(tiny_lm_dir), train, out, settings(), eval_data=valid,
                       data_info={"train": len(train)}, show_progress=False)
    assert result.global_step == 2 and result.resumed_from is None
    before, after = weights(tiny_lm_dir), weights(out)
    assert set(before) == set(after)  # merged: a plain model, no LoRA tensors
    # LoRA moves its targets (by default every linear layer of the blocks), nothing else
    assert not torch.equal(before[Q_PROJ], after[Q_PROJ])
    assert not torch.equal(before[MLP], after[MLP])
    assert torch.equal(before[EMBEDDINGS], after[EMBEDDINGS])
    attention_only = tmp_path / "attention-only"
    train_sft(str(tiny_lm_dir), train, attention_only, settings(
        lora_targets=["q_proj", "k_proj", "v_proj", "o_proj"]), show_progress=False)
    assert torch.equal(before[MLP], weights(attention_only)[MLP])
    curve = json.loads((out / "loss.json").read_text())
    assert [p["step"] for p in curve["train"]] == [1, 2]
    assert [p["step"] for p in curve["eval"]] == [1, 2]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    card = read_model_card(out)
    assert card.stage == "sft" and card.format == FORMAT and card.lora and card.merged
    assert card.data == {"train": 4} and card.metrics["global_step"] == 2
    assert card.training["learning_rate"] == 1e-3
    model = HFChatModel.load(out, threads=1)
    completion = model.complete(model.render_chat(train[0]["messages"][:2]), max_tokens=3)
    assert completion.completion_tokens == 3


def test_full_fine_tune_and_unmerged_lora(tiny_lm_dir, data, tmp_path):
    train, _ = data
    out = tmp_path / "full"
    train_sft(str(tiny_lm_dir), train, out, settings(lora=False, max_steps=1), show_progress=False)
    assert not torch.equal(weights(tiny_lm_dir)[MLP], weights(out)[MLP])
    assert read_model_card(out).merged and not read_model_card(out).lora
    out = tmp_path / "adapter"
    train_sft(str(tiny_lm_dir), train, out, settings(merge=False, max_steps=1), show_progress=False)
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    assert not read_model_card(out).merged


def test_a_resume_with_nothing_to_resume_says_so_once(tmp_path, caplog):
    """`resume` on an empty folder starts afresh and logs it; the early check a pipeline
    makes before building anything stays silent, so the line is not printed twice."""
    import logging

    from starrec.training.sft import resume_point

    with caplog.at_level(logging.INFO, logger="starrec.training.sft"):
        assert resume_point(tmp_path, True, announce=False) is None
        assert not caplog.records
        assert resume_point(tmp_path, True) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"no checkpoint in {tmp_path / 'checkpoints'}: starting from the model given"]
    (tmp_path / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="resume it or choose another"):
        resume_point(tmp_path, False, announce=False)


def test_resume_continues_from_the_latest_checkpoint(tiny_lm_dir, data, tmp_path, monkeypatch):
    from trl import SFTTrainer

    train, _ = data
    out = tmp_path / "student"
    train_sft(str(tiny_lm_dir), train, out, settings(), show_progress=False)
    with pytest.raises(FileExistsError, match="resume it or choose another"):
        train_sft(str(tiny_lm_dir), train, out, settings(max_steps=3), show_progress=False)

    steps = []
    original = SFTTrainer.training_step

    def counted(self, *args, **kwargs):
        steps.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "training_step", counted)
    result = train_sft(str(tiny_lm_dir), train, out, settings(max_steps=3), resume=True,
                       show_progress=False)
    assert result.resumed_from == "checkpoint-2" and result.global_step == 3
    assert steps == [2]  # one optimizer step, taken from step 2 on
    curve = json.loads((out / "loss.json").read_text())
    assert [p["step"] for p in curve["train"]] == [1, 2, 3]


def test_distill_sft_command(tiny_lm_dir, tmp_path):
    from starrec.cli.distill import app as distill_app

    folder = tmp_path / "data"
    dataset = write_dataset_folder(folder, n_users=6, n_items=30)
    items = list(dataset.items.index)

    def task(k: int, target: int) -> dict:
        candidates = items[10:30]
        return {"task_id": f"train-u{k}", "user_id": f"u{k}", "scenario": "classic",
                "history": items[:3], "candidates": candidates, "target": candidates[target],
                "split": "train"}

    runs = []
    for k in range(4):
        run = make_run()
        run.task_id, run.task = f"train-u{k}", task(k, target=k)
        order = [k] + [i for i in range(20) if i != k]
        run.ranking_indices = order if k != 3 else list(range(20))  # u3: target at rank 4
        run.ranking = [run.task["candidates"][i] for i in run.ranking_indices]
        run.config["mars"].update(constrain=True, analysts=["recent", "long_term"])
        run.plan = plan_options(["recent", "long_term"])[0]
        runs.append(run)
    trajectories = tmp_path / "runs.jsonl"
    trajectories.write_text("".join(r.to_json() + "\n" for r in runs))

    root = typer.Typer()
    root.add_typer(distill_app, name="distill")
    out = tmp_path / "student"
    result = CliRunner().invoke(root, [
        "distill", "sft", "--trajectories", str(trajectories), "--out", str(out),
        "--model", str(tiny_lm_dir), "--dataset", str(folder), "--no-tools", "--max-steps", "1",
        "--lr", "0.001", "--set", "sft.max_length=1024", "--set", "sft.batch_size=2"])
    assert result.exit_code == 0, result.output
    assert "target in top 1" in result.output and "sft: 1 steps" in result.output
    card = read_model_card(out)
    assert card.format.tools is False and card.format.plan is True
    assert card.data["filter_report"]["kept"] == 3
    assert card.data["train"]["examples"] + card.data["eval"]["examples"] == 3
    assert card.training["learning_rate"] == 0.001 and card.base_model == str(tiny_lm_dir)
    assert (out / "data" / "train").is_dir() and (out / "filter_report.json").is_file()
    # the teacher planned under a mask: its student's plan is decoded among the same plans
    assert card.plan_choices == list(plan_options(["recent", "long_term"])) and len(card.plan_choices) == 3
    # the longest trained reflection, where a student's reflection is cut
    assert card.max_reflection_tokens == card.data["train"]["max_reflection_tokens"] > 0

    common = ["--trajectories", str(trajectories), "--model", str(tiny_lm_dir), "--dataset",
              str(folder), "--no-tools", "--max-steps", "1", "--set", "sft.max_length=1024"]
    result = CliRunner().invoke(root, ["distill", "sft", "--out", str(out), *common])
    assert result.exit_code == 2 and "resume it or choose another" in result.output
    # validation from a file: every kept run trains, the file's kept runs validate
    result = CliRunner().invoke(root, ["distill", "sft", "--out", str(tmp_path / "s2"), *common,
                                       "--valid-trajectories", str(trajectories)])
    assert result.exit_code == 0, result.output
    data = read_model_card(tmp_path / "s2").data
    assert data["train"]["examples"] == 3 and data["eval"]["examples"] == 3
    result = CliRunner().invoke(root, [
        "distill", "sft", "--trajectories", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x"),
        "--model", str(tiny_lm_dir), "--dataset", str(folder)])
    assert result.exit_code == 2 and "none.jsonl" in result.output


def test_plan_choices_are_the_teachers_only_when_every_plan_was_chosen_under_a_mask():
    runs = [make_run(), make_run()]
    for run, analysts in zip(runs, (["recent"], ["recent", "divergence"])):
        run.config["mars"].update(constrain=True, analysts=analysts)
        run.plan = plan_options(analysts)[-1]
    assert plan_choices(runs) == list(dict.fromkeys(
        plan_options(["recent"]) + plan_options(["recent", "divergence"])))
    assert len(plan_choices(runs)) == 3  # "recent" alone is one choice of both teachers
    assert plan_choices([make_run()]) == []  # no mars.constrain in its settings
    runs[1].plan = "recent: what I like"  # set to constrain, but its backend could not mask
    assert plan_choices(runs) == []
    runs[1].plan, runs[1].config["mars"]["constrain"] = plan_options(["recent"])[0], False
    assert plan_choices(runs) == []


def test_learning_rate_defaults_by_kind_of_fine_tune():
    assert SFTSettings().lr == 1e-3 and SFTSettings(lora=False).lr == 2e-5
    assert SFTSettings(lora=False, learning_rate=1e-3).lr == 1e-3


def test_a_card_of_a_student_that_ranks_with_indices_is_refused(tmp_path):
    card = {"stage": "sft", "base_model": "smollm2", "base_model_path": "x",
            "prompt_version": "student-v2", "format": {"plan": True}}
    (tmp_path / "star_model.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="0-based indices; retrain"):
        read_model_card(tmp_path)
    card["prompt_version"] = PROMPT_VERSION
    (tmp_path / "star_model.json").write_text(json.dumps(card))
    fmt = read_model_card(tmp_path).format
    assert (fmt.candidate_order, fmt.labels) == ("presented", "letters")
