"""The ranking head (issue 15): scores to ranking, objectives, leave-the-user-out
evidence, training with checkpoints and resume, both modes, debiasing. On the tiny
random model of tests/tiny_lm.py, whose byte-level tokenizer has every letter as one
token."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from starrec.config import CSTConfig, StarConfig, StudentConfig
from starrec.core import ranked
from starrec.cst.evidence import candidate_evidence
from starrec.data.schema import Dataset
from starrec.inference.rank_head import (
    LabelTokenError,
    RankHead,
    RankHeadSystem,
    evidence_text,
    label_token_ids,
    log_softmax,
    shuffle_orders,
)
from starrec.inference.system import load_star_system
from starrec.labels import candidate_labels
from starrec.llm.card import HeadSpec, read_model_card
from starrec.training.rank import (
    RankSettings,
    avg_hr,
    avghr_hook,
    listwise_loss,
    outcome_reward,
    pl_policy_loss,
    plackett_luce_log_prob,
    plackett_luce_sample,
    target_ranks,
    task_batches,
    train_rank,
)
from starrec.training.rank_data import (
    build_fold_stores,
    leave_out_interactions,
    position_tasks,
    user_fold,
)
from tests.conftest import make_dataset


@pytest.fixture(scope="module")
def tiny_head(tiny_lm_dir):
    from starrec.inference.rank_head import load_head

    head, chat = load_head(str(tiny_lm_dir), threads=1)
    return head, chat


def test_labels_are_single_tokens_or_refused(tiny_lm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    ids = label_token_ids(tok, candidate_labels(20), "<recommend>[")
    assert len(set(ids)) == 20
    assert [tok.decode([i]) for i in ids] == list(candidate_labels(20))
    # numbers past 9 are two characters: not one token of this tokenizer (no merge "17")
    multi = [label for label in candidate_labels(20, "numbers")
             if len(tok.encode(label, add_special_tokens=False)) > 1]
    if multi:
        with pytest.raises(LabelTokenError, match="tokens of this tokenizer"):
            label_token_ids(tok, candidate_labels(20, "numbers"), "<recommend>[")
    with pytest.raises(LabelTokenError):
        label_token_ids(tok, ["AB", "C"], "[")


# --- objectives ---------------------------------------------------------------------------

def test_listwise_loss_is_cross_entropy_over_the_labels():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([0, 2])
    expected = (-(2 - math.log(math.exp(2) + 2)) + math.log(3)) / 2
    assert listwise_loss(logits, targets).item() == pytest.approx(expected)


def test_plackett_luce_probabilities_sum_to_one_and_samples_are_permutations():
    scores = torch.tensor([[1.5, -0.3, 0.2, 0.0]], dtype=torch.float64)
    perms = torch.tensor([list(itertools.permutations(range(4)))])
    log_p = plackett_luce_log_prob(scores, perms)
    assert torch.exp(log_p).sum().item() == pytest.approx(1.0)
    # P(first = i) is the softmax of the scores
    first = torch.zeros(4, dtype=torch.float64)
    for perm, lp in zip(perms[0], log_p[0]):
        first[perm[0]] += torch.exp(lp)
    assert torch.allclose(first, torch.softmax(scores[0], 0))
    sampled = plackett_luce_sample(scores.repeat(3, 1), 500, torch.Generator().manual_seed(0))
    assert sampled.shape == (3, 500, 4)
    assert (sampled.sort(-1).values == torch.arange(4)).all()
    # the most likely first item is drawn first most often, near its probability
    share = (sampled[:, :, 0] == 0).double().mean().item()
    assert share == pytest.approx(torch.softmax(scores[0], 0)[0].item(), abs=0.05)


def test_reward_tiers_and_target_ranks():
    ranks = torch.tensor([1, 2, 3, 4, 5, 6, 20])
    assert outcome_reward(ranks).tolist() == pytest.approx(
        [2, 1 + 2 / 3, 1 + 2 / 3, 1 + 1 / 3, 1 + 1 / 3, 1, 1])
    perms = torch.tensor([[[2, 0, 1], [0, 1, 2]]])
    assert target_ranks(perms, torch.tensor([0])).tolist() == [[2, 1]]
    assert avg_hr([1, 4, 10]) == pytest.approx(100 * (1 / 3 + 1 / 3 + 2 / 3) / 3)


def test_policy_gradient_pushes_the_target_up():
    logits = torch.zeros((1, 5), requires_grad=True)
    loss, reward = pl_policy_loss(logits, torch.tensor([3]), 64, torch.Generator().manual_seed(1))
    loss.backward()
    assert 1.0 <= reward <= 2.0
    assert logits.grad[0, 3] < 0  # descending the loss raises the target's score
    assert logits.grad[0, 3] == logits.grad[0].min()


# --- leave-the-user-out evidence ------------------------------------------------------------

def _without_tail(dataset: Dataset, user: str, t: int) -> Dataset:
    frame = dataset.interactions
    own = frame["user"] == user
    position = own.cumsum() - 1
    keep = ~own | (position < t)
    return replace(dataset, interactions=frame[keep].reset_index(drop=True))


def test_position_tasks_cover_train_positions_only():
    dataset = make_dataset(n_users=12, per_user=8)
    tasks = position_tasks(dataset, min_history=2)
    sequences = dataset.interactions.groupby("user")["item"].agg(list)
    for task in tasks:
        seq = sequences[task.user_id]
        assert task.history == seq[:task.cutoff] and task.target == seq[task.cutoff]
        assert 2 <= task.cutoff <= len(seq) - 3  # never the valid or test target
        assert task.target in task.candidates and len(set(task.candidates)) == 20
    assert len(tasks) == 12 * (8 - 3 - 2 + 1)
    assert len(position_tasks(dataset, min_history=2, max_per_user=1)) == 12


def test_evidence_of_a_position_ignores_the_users_rows_at_and_after_it(tmp_path):
    dataset = make_dataset(n_users=12, per_user=8)
    config = CSTConfig(content=False)
    task = next(t for t in position_tasks(dataset, min_history=2) if t.cutoff == 3)
    full = build_fold_stores(dataset, config, folds=3, folder=tmp_path / "full", progress=False)
    cut = build_fold_stores(_without_tail(dataset, task.user_id, task.cutoff), config, folds=3,
                            folder=tmp_path / "cut", progress=False)
    a = candidate_evidence(full.store_for(task.user_id), task)
    b = candidate_evidence(cut.store_for(task.user_id), task)
    assert [e.to_dict() for e in a] == [e.to_dict() for e in b]
    # the user's store holds nothing of the user; the other folds' stores hold their rows
    assert not full.store_for(task.user_id).knows_user(task.user_id)
    other = full.stores[(user_fold(task.user_id, 3) + 1) % 3]
    assert other.knows_user(task.user_id)
    # and no one's train, valid or test target is in any store (the train split's fit data)
    frame = leave_out_interactions(dataset, [])
    assert len(frame) == len(dataset.interactions) - 3 * 12


# --- the head, both modes, debiasing --------------------------------------------------------

def test_fast_mode_scores_every_candidate_and_ranks_by_them(world, tiny_head):
    store, tasks = world
    head, _ = tiny_head
    system = RankHeadSystem(head, store, mode="fast")
    task = tasks[0]
    rec = system.recommend(task)
    scores = rec.details["scores"]
    assert sorted(rec.ranking) == sorted(task.candidates) and rec.well_formed
    assert list(scores) == task.candidates
    assert rec.ranking == ranked(task.candidates, list(scores.values()))
    # the score is the label logit at the answer position, in one forward pass
    text = head.prompt(task, store)
    assert text.endswith("<recommend>[") and "A: " in text
    assert rec.llm_calls == 1 and rec.generation_requests == 0
    logits = head.scores([text], 20)[0]
    assert np.allclose(list(scores.values()), logits)
    # batched with a longer text, a text scores as alone (left padding, own positions)
    both = head.scores([text, head.prompt(tasks[1], store) + " more words"], 20)
    assert np.allclose(both[0], logits, atol=1e-4)


def test_evidence_budget_and_compact_prompt(world, tiny_head):
    store, tasks = world
    head, _ = tiny_head
    task = tasks[0]
    ev = candidate_evidence(store, task)[0]
    short = evidence_text(ev, len(task.history), store.title, 8, head.count)
    long = evidence_text(ev, len(task.history), store.title, 200, head.count)
    assert head.count(short) <= 8 and len(short) <= len(long)
    assert evidence_text(ev, len(task.history), store.title, 0, head.count) == ""
    titles_only = RankHead(head.model, head.tokenizer, HeadSpec(evidence_tokens=0))
    assert head.count(titles_only.prompt(task, store)) < head.count(head.prompt(task, store))


def test_debiasing_averages_label_log_probabilities_over_shuffles(world, tiny_head):
    store, tasks = world
    head, _ = tiny_head
    task = tasks[1]
    system = RankHeadSystem(head, store, mode="fast", shuffles=3, seed=7)
    rec = system.recommend(task)
    orders = shuffle_orders(20, 3, 7, task.task_id)
    assert orders[0] == list(range(20)) and all(sorted(o) == list(range(20)) for o in orders)
    expected = np.zeros(20)
    for order in orders:
        shown = replace(task, candidates=[task.candidates[i] for i in order])
        row = log_softmax(head.scores([head.prompt(shown, store)], 20)[0])
        expected[order] += row / 3
    assert np.allclose(list(rec.details["scores"].values()), expected, atol=1e-4)
    assert rec.details["passes"] == 3 and rec.llm_calls == 3
    assert sorted(rec.ranking) == sorted(task.candidates)
    with pytest.raises(ValueError, match="fast mode"):
        RankHeadSystem(head, store, mode="reason", shuffles=2, student=object())


def test_reason_mode_reads_the_head_after_the_students_generation(world, tiny_head):
    from starrec.inference.student import Student

    store, tasks = world
    head, chat = tiny_head
    student = Student(chat, store, config=StudentConfig(max_new_tokens=12, constrain=False))
    system = RankHeadSystem(head, store, mode="reason", student=student)
    task = tasks[2]
    rec = system.recommend(task)
    assert sorted(rec.ranking) == sorted(task.candidates) and rec.well_formed
    assert rec.generation_requests >= 1 and rec.completion_tokens > 0
    assert rec.details["mode"] == "reason" and "text" in rec.details
    scores = rec.details["scores"]
    shown = rec.shown
    assert rec.ranking == ranked(shown, [scores[c] for c in shown])


# --- training -------------------------------------------------------------------------------

def test_two_steps_change_the_weights_checkpoint_resume_and_load(world, tiny_lm_dir, tmp_path):
    from safetensors.torch import load_file

    store, tasks = world
    settings = RankSettings(base_model=str(tiny_lm_dir), lora=False, learning_rate=1e-2,
                            steps=2, batch_tasks=2, save_every=1, eval_every=1,
                            objective="listwise+pl", pl_samples=4, warmup_steps=0,
                            head=HeadSpec(evidence_tokens=10, history_items=3))
    batches = task_batches(tasks, lambda user: store, settings.batch_tasks)
    out = tmp_path / "head"
    result = train_rank(str(tiny_lm_dir), batches, out, settings,
                        evaluate=avghr_hook(tasks[:3], store), show_progress=False)
    assert result.global_step == 2
    before = load_file(tiny_lm_dir / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    curve = __import__("json").loads((out / "loss.json").read_text())
    assert [p["step"] for p in curve["train"]] == [1, 2]
    assert {"listwise", "pl", "reward"} <= set(curve["train"][0])
    assert [p["step"] for p in curve["eval"]] == [0, 1, 2] and "AvgHR" in curve["eval"][0]
    assert len(curve["eval"][0]["ranks"]) == 3 and "vs_step_0" not in curve["eval"][0]
    assert {"difference", "ci95", "wins"} <= set(curve["eval"][2]["vs_step_0"])
    assert curve["n_candidates"] == 20
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = read_model_card(out)
    assert card.stage == "rank" and card.head.mode == "fast"
    assert card.head.labels == list(candidate_labels(20))
    assert (out / "checkpoints" / "step-2" / "state.pt").is_file()

    # an earlier run's checkpoints are not overwritten; resume continues from the latest
    with pytest.raises(FileExistsError):
        train_rank(str(tiny_lm_dir), batches, out, settings, show_progress=False)
    more = settings.model_copy(update={"steps": 3})
    resumed = train_rank(str(tiny_lm_dir), batches, out, more, resume=True, show_progress=False)
    assert resumed.resumed_from == "step-2" and resumed.global_step == 3
    curve = __import__("json").loads((out / "loss.json").read_text())
    assert [p["step"] for p in curve["train"]] == [1, 2, 3]
    kept = {"step-2", "step-3", f"step-{curve['best']['step']}"}  # the best leaves the rotation
    assert {p.name for p in (out / "checkpoints").iterdir()} == kept

    # `star eval --system star --model OUT --set student.mode=...` loads the head system
    for mode, expected in (("auto", "fast"), ("fast", "fast"), ("reason", "reason")):
        cfg = StarConfig.model_validate({"student": {"mode": mode, "max_new_tokens": 8,
                                                     "constrain": False}})
        system = load_star_system(out, store, cfg)
        assert isinstance(system, RankHeadSystem) and system.mode == expected
        rec = system.recommend(tasks[0])
        assert sorted(rec.ranking) == sorted(tasks[0].candidates)


def test_lora_step_changes_the_merged_weights(world, tiny_lm_dir, tmp_path):
    from safetensors.torch import load_file

    store, tasks = world
    settings = RankSettings(base_model=str(tiny_lm_dir), lora=True, lora_r=4,
                            lora_targets=["q_proj", "v_proj"], learning_rate=5e-2, steps=1,
                            batch_tasks=2, eval_every=0, warmup_steps=0)
    out = tmp_path / "lora"
    train_rank(str(tiny_lm_dir), task_batches(tasks, lambda user: store, 2), out, settings,
               show_progress=False)
    before = load_file(tiny_lm_dir / "model.safetensors")
    after = load_file(out / "model.safetensors")
    changed = [k for k in before if k in after and not torch.equal(before[k], after[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)


def test_distill_rank_command_trains_resumes_and_writes_a_loadable_folder(tiny_lm_dir, tmp_path,
                                                                          monkeypatch):
    from typer.testing import CliRunner

    from starrec.cli.main import app
    from tests.conftest import write_dataset_folder

    monkeypatch.setenv("STAR_HOME", str(tmp_path / "home"))
    data = tmp_path / "data"
    write_dataset_folder(data, n_users=12, per_user=8)
    out = tmp_path / "head"
    args = ["distill", "rank", "--out", str(out), "--model", str(tiny_lm_dir), "--dataset",
            str(data), "--set", "cst.content=false", "--set", "rank.folds=2", "--set",
            "rank.batch_tasks=2", "--set", "rank.eval_every=1", "--set", "rank.eval_tasks=3",
            "--set", "rank.min_history=3", "--set", "rank.head.evidence_tokens=8"]
    runner = CliRunner()
    result = runner.invoke(app, [*args, "--steps", "1"])
    assert result.exit_code == 0, result.output
    assert "rank: 1 steps" in result.output and "valid AvgHR" in result.output
    card = read_model_card(out)
    assert card.head.evidence_tokens == 8 and card.data["train_tasks"] == 12 * 3
    result = runner.invoke(app, [*args, "--steps", "2"])
    assert result.exit_code != 0 and "resume" in result.output
    result = runner.invoke(app, [*args, "--steps", "2", "--resume"])
    assert result.exit_code == 0, result.output
    assert "resumed from step-1" in result.output
    result = runner.invoke(app, [*args[:-2], "--set", "rank.nope=1", "--steps", "1"])
    assert result.exit_code != 0


def test_the_policy_gradient_scores_the_leading_places_only():
    scores = torch.tensor([[0.4, -1.0, 2.0, 0.3, 0.0]], dtype=torch.float64)
    perms = torch.tensor([list(itertools.permutations(range(5)))])
    full = plackett_luce_log_prob(scores, perms)
    top2 = plackett_luce_log_prob(scores, perms, positions=2)
    # the probability of a top-2 prefix: the sum of the full probabilities sharing it
    prefix = {}
    for perm, lp in zip(perms[0].tolist(), full[0]):
        prefix[tuple(perm[:2])] = prefix.get(tuple(perm[:2]), 0.0) + torch.exp(lp).item()
    for perm, lp in zip(perms[0].tolist(), top2[0]):
        assert torch.exp(lp).item() == pytest.approx(prefix[tuple(perm[:2])])
    assert torch.equal(plackett_luce_log_prob(scores, perms, positions=None), full)


def _tasks_of(users: dict[str, int]) -> list:
    from starrec.core import Task

    return [Task(task_id=f"{user}-{t}", user_id=user, history=["h"], candidates=["a", "b", "c"],
                 target="a", split="train", scenario="classic")
            for user, count in users.items() for t in range(count)]


class _Prompting:
    """A stand-in for RankHead in the batch sampler: the prompt names the task's user."""

    def prompt(self, task, store):
        return f"{task.user_id}|{','.join(task.candidates)}"


def test_batches_draw_users_uniformly_or_positions_uniformly():
    tasks = _tasks_of({"heavy": 200, **{f"u{i}": 1 for i in range(9)}})
    head = _Prompting()
    by_user = task_batches(tasks, lambda user: None, 4, seed=3, sample="user")
    by_position = task_batches(tasks, lambda user: None, 4, seed=3, sample="position")
    heavy_user = heavy_position = 0
    for step in range(100):
        users = [e.text.split("|")[0] for e in by_user(head, step)]
        assert len(users) == len(set(users)) == 4  # distinct users in a batch
        heavy_user += users.count("heavy")
        heavy_position += [e.text.split("|")[0] for e in by_position(head, step)].count("heavy")
    # a user uniformly: the heavy user is in 4/10 of batches; a position uniformly: ~3.8 of 4
    assert 20 <= heavy_user <= 65 and heavy_position >= 300
    # same step, same batch (a resumed run sees what the stopped one would have)
    assert [e.text for e in by_user(head, 7)] == [e.text for e in by_user(head, 7)]
    with pytest.raises(ValueError, match="sampling"):
        task_batches(tasks, lambda user: None, 4, sample="tasks")


def test_a_misspelt_head_setting_is_refused():
    with pytest.raises(ValueError, match="evidence_token"):
        RankSettings.model_validate({"head": {"evidence_token": 3}})
    assert RankSettings.model_validate({"head": {"evidence_tokens": 3}}).head.evidence_tokens == 3


def test_micro_batches_accumulate_the_same_step(world, tiny_lm_dir, tmp_path):
    from safetensors.torch import load_file

    store, tasks = world
    results = {}
    for micro in (None, 1):
        settings = RankSettings(base_model=str(tiny_lm_dir), lora=False, learning_rate=1e-2,
                                steps=1, batch_tasks=3, micro_batch=micro, eval_every=0,
                                warmup_steps=0, max_grad_norm=0.0,
                                head=HeadSpec(evidence_tokens=6, history_items=2))
        out = tmp_path / f"micro-{micro}"
        train_rank(str(tiny_lm_dir), task_batches(tasks, lambda user: store, 3), out, settings,
                   show_progress=False)
        results[micro] = (load_file(out / "model.safetensors"),
                          __import__("json").loads((out / "loss.json").read_text()))
    (whole, whole_curve), (micro, micro_curve) = results[None], results[1]
    assert whole_curve["train"][0]["loss"] == pytest.approx(micro_curve["train"][0]["loss"], rel=1e-4)
    for key in whole:
        assert torch.allclose(whole[key], micro[key], atol=1e-5), key


def test_the_final_model_is_the_best_valid_point_and_its_checkpoint_survives(world, tiny_lm_dir,
                                                                            tmp_path):
    import json

    from safetensors.torch import load_file

    store, tasks = world
    scripted = iter([10.0, 50.0, 20.0, 30.0, 40.0])  # steps 0..4: the best after 0 is step 1

    def evaluate(head):
        return {"AvgHR": next(scripted)}

    settings = RankSettings(base_model=str(tiny_lm_dir), lora=False, learning_rate=1e-2,
                            steps=4, batch_tasks=2, eval_every=1, save_every=1,
                            save_total_limit=1, warmup_steps=0,
                            head=HeadSpec(evidence_tokens=6, history_items=2))
    out = tmp_path / "best"
    result = train_rank(str(tiny_lm_dir), task_batches(tasks, lambda user: store, 2), out,
                        settings, evaluate=evaluate, show_progress=False)
    curve = json.loads((out / "loss.json").read_text())
    assert curve["best"] == {"step": 1, "AvgHR": 50.0} and curve["final_step"] == 1
    assert {p.name for p in (out / "checkpoints").iterdir()} == {"step-1", "step-4"}
    assert result.eval_metrics == {"AvgHR": 50.0}
    assert read_model_card(out).metrics["final_step"] == 1
    saved = load_file(out / "model.safetensors")
    state = torch.load(out / "checkpoints" / "step-1" / "state.pt", weights_only=False)
    for name, value in state["trainable"].items():
        assert torch.equal(saved[name], value), name
    last = settings.model_copy(update={"final": "last"})
    scripted = iter([10.0, 50.0, 20.0, 30.0, 40.0])
    train_rank(str(tiny_lm_dir), task_batches(tasks, lambda user: store, 2), tmp_path / "last",
               last, evaluate=evaluate, show_progress=False)
    assert json.loads((tmp_path / "last" / "loss.json").read_text())["final_step"] == 4


def test_the_valid_hook_builds_its_prompts_once(world, tiny_head, monkeypatch):
    store, tasks = world
    head, _ = tiny_head
    hook = avghr_hook(tasks[:3], store, chunk=2)
    built = []
    real = RankHead.prompt
    monkeypatch.setattr(RankHead, "prompt", lambda self, task, s: built.append(task.task_id)
                        or real(self, task, s))
    first, second = hook(head), hook(head)
    assert first == second and first["n_tasks"] == 3 and len(first["ranks"]) == 3
    assert built == [task.task_id for task in tasks[:3]]
    # the hook's ranks are the fast mode's
    system = RankHeadSystem(head, store, mode="fast")
    ranks = [system.answer(task).ranking.index(task.target) + 1 for task in tasks[:3]]
    assert first["AvgHR"] == pytest.approx(avg_hr(ranks))


def test_the_cst_rank_feature_uses_the_hand_set_weights(world, tiny_head, monkeypatch):
    # a store's learned ranker exists only where one was fitted into it (eval stores, not
    # the training folds): the feature must mean the same ranker in training and at inference
    from starrec.cst.ranker import CSTRanker
    from starrec.inference import rank_head

    store, tasks = world
    head, _ = tiny_head
    asked = []
    real = CSTRanker.on_store.__func__
    monkeypatch.setattr(CSTRanker, "on_store", classmethod(
        lambda cls, s, config=None, learned=None: asked.append(learned) or real(cls, s, config, learned)))
    spec = HeadSpec(evidence_tokens=0, cst_rank=True)
    messages = rank_head.head_messages(tasks[0], store, spec, head.labels[:20], head.count)
    assert asked == [False] and "cst rank" in messages[1]["content"]


def test_the_reason_mode_refuses_a_student_format_with_other_labels(world, tiny_lm_dir):
    from starrec.config import StudentFormatConfig
    from starrec.inference.rank_head import head_system

    store, _ = world
    with pytest.raises(ValueError, match="one label style"):
        head_system(str(tiny_lm_dir), store, HeadSpec(), "reason", StudentConfig(),
                    fmt=StudentFormatConfig(labels="numbers"), threads=1)
    system = head_system(str(tiny_lm_dir), store, HeadSpec(), "reason", StudentConfig(),
                         fmt=StudentFormatConfig(), threads=1)
    assert system.mode == "reason"


def _evidence(**changes):
    from starrec.cst.evidence import CandidateEvidence

    base = dict(item="7", title="Heat (1995)", known=True, cooc_score=1.0, cooc_linked=12,
                cooc_best_item="3", cooc_best_count=9, cooc_best_base=30, transition_count=2,
                transition_best_item="3", transition_best_count=2, transition_best_total=40,
                user_votes=13, similar_users=50, pop=100, pop_pct=88.0, recent_pct=70.0,
                content_best_item=None, content_similarity=None, sequence_rank=2,
                sequence_score=1.5, sequence_share=0.31, sequence_of=20, factor_rank=12,
                factor_score=0.2, factor_of=20)
    return CandidateEvidence(**{**base, **changes})


def test_clauses_by_kind_in_both_styles():
    from starrec.cst.verbalize import CLAUSE_KINDS, candidate_clauses, candidate_line

    titles = {"3": "Casino (1995)"}.get
    sentences = candidate_clauses(_evidence(), 20, titles)
    compact = candidate_clauses(_evidence(), 20, titles, "compact")
    kinds = [kind for kind, _ in sentences]
    assert kinds == [kind for kind, _ in compact] == [k for k in CLAUSE_KINDS if k in kinds]
    assert kinds == ["links", "transition", "similar_users", "sequence", "factors", "popularity"]
    by = dict(compact)
    assert by["sequence"] == "sequence model rank 2/20" and by["factors"] == "factor model rank 12/20"
    assert by["similar_users"] == "similar users 13/50" and "Casino" not in by["links"]
    assert "2nd of the 20" in dict(sentences)["sequence"]
    # the line the teacher reads is the sentences, joined, as before
    line = candidate_line("A", _evidence(), 20, titles)
    assert line.endswith("; ".join(text for _, text in sentences) + ".")
    assert dict(candidate_clauses(_evidence(known=False), 20, titles, "compact"))["links"] == "cold item"
    with pytest.raises(ValueError, match="style"):
        candidate_clauses(_evidence(), 20, titles, "terse")


def test_evidence_clauses_are_chosen_in_priority_order_within_the_budget(tiny_head):
    head, _ = tiny_head
    titles = {"3": "Casino (1995)"}.get
    ev = _evidence(factor_rank=None)  # no factor clause: skipped, not an error
    text = evidence_text(ev, 20, titles, 200, head.count, "compact",
                         ["sequence", "factors", "similar_users"])
    assert text == "sequence model rank 2/20; similar users 13/50"
    tight = evidence_text(ev, 20, titles, head.count("sequence model rank 2/20") + 1, head.count,
                          "compact", ["sequence", "similar_users"])
    assert tight == "sequence model rank 2/20"
    assert evidence_text(ev, 20, titles, 200, head.count, "compact", ["content"]) == ""
    with pytest.raises(ValueError, match="evidence_clauses"):
        HeadSpec(evidence_clauses=["sequence", "gossip"])
    with pytest.raises(ValueError, match="evidence_clauses"):
        HeadSpec(evidence_clauses=["sequence", "sequence"])


def test_a_head_setting_changes_the_rank_default_not_headspecs():
    from starrec.training.rank import RANK_HEAD

    settings = RankSettings.model_validate({"head": {"evidence_tokens": 24}})
    assert settings.head.evidence_tokens == 24
    assert settings.head.evidence_style == RANK_HEAD.evidence_style == "compact"
    assert settings.head.evidence_clauses == RANK_HEAD.evidence_clauses
    assert settings.head.readout == RANK_HEAD.readout == "line"
    # a card written before these fields reads as it was trained: sentences, all clauses
    assert HeadSpec.model_validate({"evidence_tokens": 40}).evidence_style == "sentences"
    assert HeadSpec.model_validate({"evidence_tokens": 40}).evidence_clauses == []
    assert HeadSpec.model_validate({"evidence_tokens": 40}).readout == "label"


@pytest.fixture(scope="module")
def line_head(tiny_head):
    head, _ = tiny_head
    spec = HeadSpec(readout="line", evidence_tokens=6, history_items=2)
    return RankHead(head.model, head.tokenizer, spec)


def test_the_line_readout_reads_each_candidates_last_token(world, line_head):
    store, tasks = world
    task = tasks[0]
    text = line_head.prompt(task, store)
    n = len(task.candidates)
    ends = line_head.line_ends(text, n)
    enc = line_head.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    lines = [line for line in text.split("\n") if line[:3] in {f"{l}: " for l in line_head.labels[:n]}]
    assert len(ends) == n == len(lines) and ends == sorted(ends)
    for end, line in zip(ends, lines):  # the token covers the line's last character
        a, b = enc["offset_mapping"][end]
        assert text[a:b].rstrip("\n").endswith(line[-1]) and text.find(line) + len(line) <= b
    with torch.inference_mode():
        full = line_head.model(input_ids=torch.tensor([enc["input_ids"]])).logits[0]
        scores = line_head.label_logits([text], n)[0]
    expected = full[ends, line_head.tokenizer.eos_token_id]
    assert torch.allclose(scores, expected, atol=1e-4)
    # in a batch with a longer prompt (left padding) a text scores as alone
    other = line_head.prompt(replace(tasks[1], history=tasks[1].history * 3), store)
    with torch.inference_mode():
        batched = line_head.label_logits([other, text], n)[1]
    assert torch.allclose(batched, scores, atol=1e-4)


def test_the_line_readout_ranks_trains_and_refuses_the_reason_mode(world, line_head, tiny_lm_dir,
                                                                   tmp_path):
    from safetensors.torch import load_file

    store, tasks = world
    system = RankHeadSystem(line_head, store, mode="fast")
    answer = system.answer(tasks[0])
    assert answer.ranking == ranked(tasks[0].candidates, answer.scores)
    with pytest.raises(ValueError, match="line-readout"):
        RankHeadSystem(line_head, store, mode="reason", student=object())
    with pytest.raises(LabelTokenError, match="score token"):
        RankHead(line_head.model, line_head.tokenizer, HeadSpec(readout="line", score_token="yes no"))
    settings = RankSettings(base_model=str(tiny_lm_dir), lora=False, learning_rate=1e-2, steps=1,
                            batch_tasks=2, eval_every=0, warmup_steps=0,
                            head={"readout": "line", "evidence_tokens": 6, "history_items": 2})
    out = tmp_path / "line"
    train_rank(str(tiny_lm_dir), task_batches(tasks, lambda user: store, 2), out, settings,
               show_progress=False)
    before, after = load_file(tiny_lm_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before if k in after)
    assert read_model_card(out).head.readout == "line"
