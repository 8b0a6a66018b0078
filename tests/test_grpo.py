"""GRPO: the reward, rollouts that are student passes, train-only prompts, TRL's config
reached through ours, and a two-step run on a tiny model that checkpoints and resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from starrec.config import (
    CSTConfig,
    GRPO_PRESETS,
    GRPOSettings,
    SFTSettings,
    StudentConfig,
    StudentFormatConfig,
    load_config,
    preset_overrides,
)
from starrec.core import complete_ranking
from starrec.core.fingerprint import model_hash
from starrec.cst.tools import ToolExecutor
from starrec.data.tasks import build_split_tasks
from starrec.inference.student import StudentAnswer
from starrec.labels import candidate_labels, label_list
from starrec.llm.base import ChoiceConstraint, Completion, PermutationConstraint
from starrec.llm.card import ModelCard, read_model_card, write_model_card
from starrec.trajectories.format import TOOL_RESPONSE, parse_student_output, wrap
from starrec.training.grpo_data import (
    check_train_tasks,
    draw_prompts,
    largest_size,
    prompt_dataset,
    quotas,
    read_prompts,
    split_store,
)
from starrec.training.reward import (
    OUTCOME_TIERS,
    judge_format,
    outcome_reward,
    outcome_rewards,
)
from starrec.training.rollout import (
    Segment,
    assemble,
    make_rollout_func,
    rollout_pass,
    settle,
)
from tests.conftest import make_dataset

ROOT = Path(__file__).resolve().parents[1]
N = 20
LABELS = candidate_labels(N)
PERMUTATION = label_list([3, 0, 1, 2, *range(4, N)], LABELS)
PLAN = "recent: what they watched last"
CALL = '<tool_call>{"name": "popularity", "arguments": {"item_ids": ["i1"]}}</tool_call>'
WELL_FORMED = (f"<plan>{PLAN}</plan>\n{CALL}<tool_response>i1 is popular</tool_response>\n"
               f"<reflection>recent items point to D</reflection>\n"
               f"<recommend>{PERMUTATION}</recommend>")


def cst_config() -> CSTConfig:
    """Signals a tiny store builds in well under a second."""
    fast = {"content": False, "latent": False, "ranker": "manual"}
    return CSTConfig(**{k: v for k, v in fast.items() if k in CSTConfig.model_fields})


# --- the reward -------------------------------------------------------------------------

def test_outcome_tiers_are_the_per_task_avghr_and_the_heads_reward_uses_them():
    from starrec.training.rank import outcome_reward as head_reward

    expected = {1: 1.0, 2: 2 / 3, 3: 2 / 3, 4: 1 / 3, 5: 1 / 3, 6: 0.0, 20: 0.0}
    for rank, reward in expected.items():
        assert outcome_reward(rank) == pytest.approx(reward)
        # AvgHR of one task: the mean of HR@1, HR@3, HR@5
        assert reward == pytest.approx(sum(rank <= k for k in (1, 3, 5)) / 3)
    assert outcome_reward(None) == 0.0
    ranks = list(expected)
    assert outcome_rewards(ranks).tolist() == pytest.approx(list(expected.values()))
    assert head_reward(torch.tensor(ranks)).tolist() == pytest.approx(
        [1 + r for r in expected.values()])
    assert OUTCOME_TIERS == ((1, 1.0), (3, 2 / 3), (5, 1 / 3))


def answer_of(text: str, *, stop: str = "recommend", **flags) -> StudentAnswer:
    candidates = [f"i{k}" for k in range(N)]
    parsed = parse_student_output(text, N)
    ranking = None if parsed.ranking is None else [
        candidates[i] if 0 <= i < N else "#?" for i in parsed.ranking]
    answer = StudentAnswer(text=text, parsed=parsed, ranking=ranking,
                           completed=complete_ranking(ranking, candidates), stop=stop, **flags)
    if answer.repaired_calls:  # as the student marks a pass with a repaired call
        answer.parsed.well_formed = False
        answer.parsed.errors.append("a tool call was decoded again")
    return answer


def test_format_reward_judges_what_the_student_wrote():
    good = judge_format(answer_of(WELL_FORMED), N)
    assert good.well_formed and good.reward == 1.0 and good.reasons == ()
    # a plan chosen under a mask among the plan choices is the student's own
    assert judge_format(answer_of(WELL_FORMED, chosen_plan=True), N).reward == 1.0

    def bad(text: str = WELL_FORMED, closed=(), **flags) -> tuple[str, ...]:
        verdict = judge_format(answer_of(text, **flags), N, runtime_closed=closed)
        assert not verdict.well_formed and verdict.reward == -1.0
        return verdict.reasons

    def ranked(body: str) -> str:
        return WELL_FORMED.replace(PERMUTATION, body)

    assert any("duplicate" in r for r in bad(ranked(PERMUTATION.replace("B", "D"))))
    assert any("not candidate labels" in r for r in bad(ranked(PERMUTATION.replace("T", "Z"))))
    assert any("missing labels" in r for r in bad(ranked("[A, B, C]")))
    assert any("not a list" in r for r in bad(ranked("A B C")))
    assert any("missing <reflection>" in r for r in bad(WELL_FORMED.replace(
        "<reflection>recent items point to D</reflection>\n", "")))
    assert any("not closed" in r for r in bad(WELL_FORMED.removesuffix("</recommend>")))
    assert any("outside the tags" in r for r in bad(WELL_FORMED + " and more"))
    assert any("without a response" in r for r in bad(WELL_FORMED.replace(
        "<tool_response>i1 is popular</tool_response>", "")))
    # what a mask repaired, what the runtime cut or closed, is not the student's
    assert any("permutation mask" in r for r in bad(repaired=True))
    assert any("decoded again" in r for r in bad(repaired_calls=['{"name": "x"}']))
    assert any("cut" in r for r in bad(reflection_cut=True))
    for stop in ("length", "tool_cap", "error"):
        assert any(stop in r for r in bad(stop=stop))
    assert bad(closed=["tool_call"]) == ("the runtime closed <tool_call>",)


# --- rollouts -----------------------------------------------------------------------------

class ScriptedSampler:
    """A rollout sampler that writes scripted continuations in a real tokenizer's ids."""

    name = "scripted"

    def __init__(self, tokenizer, script: list[str], supports: tuple = ()) -> None:
        self.tokenizer = tokenizer
        self.script = list(script)
        self._supports = supports
        self.prompts: list[str] = []
        self.temperatures: list[float] = []

    def supports(self, constraint) -> bool:
        return isinstance(constraint, self._supports)

    def render_chat(self, messages, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def sample(self, prompt, *, max_tokens, temperature, stop, constraint, seed):
        self.prompts.append(prompt)
        self.temperatures.append(temperature)
        answer = self.script.pop(0)
        if callable(answer):
            answer = answer(prompt, constraint)
        ids = self.tokenizer.encode(answer, add_special_tokens=False)
        text, kept, _, stopped = settle(self.tokenizer, ids, stop)
        completion = Completion(text, len(prompt) // 4, len(ids), 0.0, "stop",
                                constrained=constraint is not None)
        return completion, Segment(prompt, text, kept, None, constraint is not None, False, "stop")


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm_dir)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    """A tiny dataset's train / valid / test tasks and the train and valid stores."""
    dataset = make_dataset()
    folder = tmp_path_factory.mktemp("grpo-stores")
    tasks = {split: build_split_tasks(dataset, split) for split in ("train", "valid", "test")}
    stores = {split: split_store(dataset, tasks[split], cst_config(), name="tiny",
                                 path=folder / f"{split}.sqlite", progress=False)
              for split in ("train", "valid")}
    return dataset, tasks, stores


def test_a_rollouts_tool_call_is_answered_from_the_store_and_its_response_carries_no_loss(
        tokenizer, splits):
    _, tasks, stores = splits
    task, store = tasks["train"][0], stores["train"]
    item = task.history[-1]
    call = f'<tool_call>{{"name": "item_neighbours", "arguments": {{"item_id": "{item}", "k": 2}}}}</tool_call>'
    first = f"<plan>{PLAN}</plan>\n{call}"
    second = f"\n<reflection>r</reflection>\n<recommend>{PERMUTATION}</recommend>"
    sampler = ScriptedSampler(tokenizer, [first, second])
    rollout = rollout_pass(sampler, task, store, StudentFormatConfig(), StudentConfig(), seed=1)
    expected = ToolExecutor(store, task).call("item_neighbours", {"item_id": item, "k": 2}).text
    response = wrap(TOOL_RESPONSE, expected)
    assert rollout.answer.text == first + response + second
    # the continuation after the call read the real tool response, in the middle of the pass
    assert sampler.prompts[1].endswith(call + response)
    ids, mask = rollout.completion_ids, rollout.env_mask
    assert ids[-1] == tokenizer.eos_token_id and mask[-1] == 0  # the runtime ends the pass
    zeros = [i for i, m in enumerate(mask[:-1]) if m == 0]
    assert zeros == list(range(zeros[0], zeros[-1] + 1))  # one block: the response
    assert tokenizer.decode([ids[i] for i in zeros]) == response
    assert tokenizer.decode([t for t, m in zip(ids, mask) if m]) == first + second
    assert tokenizer.decode(rollout.prompt_ids) == sampler.prompts[0]
    assert rollout.verdict.well_formed and rollout.runtime_closed == []
    assert rollout.rank == complete_ranking(rollout.answer.ranking, task.candidates).ranking.index(
        task.target) + 1


def test_what_the_runtime_writes_or_repairs_is_masked_and_judged(tokenizer, splits):
    _, tasks, stores = splits
    task, store = tasks["train"][1], stores["train"]
    plans = ("recent: what they watched last", "long_term: what they always liked")

    def choose(prompt, constraint):
        assert isinstance(constraint, ChoiceConstraint)
        return constraint.options[-1]

    # the plan is chosen under a mask; the student stops inside its reflection (end of
    # sequence), which the runtime closes; its broken list is decoded again
    script = [choose, "r", "[A, A]</recommend>", lambda p, c: "[" + ", ".join(LABELS) + "]"]
    sampler = ScriptedSampler(tokenizer, script, supports=(ChoiceConstraint, PermutationConstraint))
    fmt = StudentFormatConfig()
    rollout = rollout_pass(sampler, task, store, fmt, StudentConfig(max_tool_calls=0), seed=1,
                           plan_choices=plans)
    text = rollout.answer.text
    assert rollout.answer.chosen_plan and rollout.answer.repaired
    assert text.startswith(f"<plan>{plans[-1]}</plan>\n<reflection>r</reflection>")
    assert rollout.runtime_closed == ["reflection"]
    assert not rollout.verdict.well_formed
    assert "the runtime closed <reflection>" in rollout.verdict.reasons
    ids, mask = rollout.completion_ids, rollout.env_mask
    assert rollout.answer.stop == "recommend" and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids[:-1]) == text and mask[-1] == 0
    written = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    # the model's tokens: the chosen plan, its reflection, the repaired list (the part
    # openings that were the only option, the closing tags and the list's opening are
    # the runtime's)
    assert written == plans[-1] + "r" + "[" + ", ".join(LABELS) + "]"
    # without learning masked tokens, only its free text carries loss
    again = ScriptedSampler(tokenizer, script, supports=(ChoiceConstraint, PermutationConstraint))
    rollout = rollout_pass(again, task, store, fmt, StudentConfig(max_tool_calls=0), seed=1,
                           plan_choices=plans, learn_masked=False)
    assert tokenizer.decode([t for t, m in zip(rollout.completion_ids, rollout.env_mask) if m]) == "r"


def test_exploration_samples_the_list_under_the_mask_at_its_own_temperature(tokenizer, splits):
    _, tasks, stores = splits
    task, store = tasks["train"][1], stores["train"]
    plans = ("recent: what they watched last", "long_term: what they always liked")
    masks = (ChoiceConstraint, PermutationConstraint)

    def choose(prompt, constraint):
        assert isinstance(constraint, ChoiceConstraint)
        return constraint.options[0]

    def permute(prompt, constraint):
        assert isinstance(constraint, PermutationConstraint) and constraint.n == N
        assert prompt.endswith("<reflection>r</reflection>\n<recommend>")
        return PERMUTATION

    student = StudentConfig(max_tool_calls=0, temperature=0.7)
    sampler = ScriptedSampler(tokenizer, [choose, "r</reflection>", permute], supports=masks)
    rollout = rollout_pass(sampler, task, store, StudentFormatConfig(), student, seed=1,
                           plan_choices=plans, explore_ranking=1.3)
    answer = rollout.answer
    assert sampler.temperatures == [0.7, 0.7, 1.3]  # only the list at the exploring temperature
    assert answer.explored and not answer.repaired and answer.stop == "recommend"
    assert answer.text.endswith(f"<recommend>{PERMUTATION}</recommend>")
    # the list is the model's (sampled among the labels left), closed by the runtime with it
    assert rollout.verdict.well_formed and rollout.runtime_closed == []
    written = tokenizer.decode([t for t, m in zip(rollout.completion_ids, rollout.env_mask) if m])
    assert written.endswith("r</reflection>" + PERMUTATION)
    shown = [task.candidates[i] for i in [3, 0, 1, 2, *range(4, N)]]
    assert rollout.rank == shown.index(task.target) + 1
    # a backend that cannot mask writes its list as the pass does
    free = ScriptedSampler(tokenizer, [f"<plan>p</plan>\n<reflection>r</reflection>\n"
                                       f"<recommend>{PERMUTATION}</recommend>"])
    rollout = rollout_pass(free, task, store, StudentFormatConfig(), student, seed=1,
                           explore_ranking=1.3)
    assert not rollout.answer.explored and free.temperatures == [0.7]

    # GRPO's rollouts take it from the settings; off by default, and a temperature >= 0
    class Trainer:
        class state:  # noqa: N801
            global_step = 0

    for explore, temperatures in ((1.3, [0.7, 0.7, 1.3]), (None, [0.7, 0.7, 0.7])):
        settings = GRPOSettings(temperature=0.7, explore_ranking=explore)
        # a list under the mask is closed by the runtime; one written free closes itself
        script = [choose, "r</reflection>", lambda p, c: PERMUTATION + ("" if c else "</recommend>")]
        sampler = ScriptedSampler(tokenizer, script, supports=masks)
        trainer = Trainer()
        trainer.sampler = contextlib_of(sampler)
        rollout = make_rollout_func([task], store, StudentFormatConfig(), student.model_copy(
            update={"temperature": 0.0}), settings, plan_choices=plans,
            sampler_for=lambda trainer: trainer.sampler)
        out = rollout([task.task_id], trainer)
        assert sampler.temperatures == temperatures and out["well_formed"] == [True]
    assert GRPOSettings().explore_ranking is None
    with pytest.raises(ValueError):
        GRPOSettings(explore_ranking=-0.5)


def test_assemble_keeps_the_sampled_ids_of_what_survives_a_repair(tokenizer):
    prompt = "<|im_start|>assistant\n"
    first = "<plan>p</plan>\n<recommend>[A, A"
    ids = tokenizer.encode(first, add_special_tokens=False)
    final = "<plan>p</plan>\n<recommend>[B, A]</recommend>"
    repair = Segment(prompt + "<plan>p</plan>\n<recommend>", "[B, A]",
                     tokenizer.encode("[B, A]", add_special_tokens=False), None, True)
    segments = [Segment(prompt, first, ids, [-0.5] * len(ids)), repair]
    out, owners = assemble(tokenizer, prompt, final, segments)
    assert tokenizer.decode(out.completion_ids) == final
    assert owners[:len("<plan>p</plan>\n<recommend>")] == [0] * len("<plan>p</plan>\n<recommend>")
    assert set(owners[len(final) - len("</recommend>"):]) == {-1}
    assert out.env_mask[-1] == 0 and out.logprobs[0] == -0.5 and out.sampled[0]


# --- prompts: train tasks only, by difficulty -----------------------------------------------

def test_quotas_follow_the_ratio():
    assert quotas(10, [3, 4, 3]) == [3, 4, 3]
    assert quotas(7, [3, 4, 3]) == [2, 3, 2] and sum(quotas(11, [3, 4, 3])) == 11
    assert largest_size([30, 4, 30], [3, 4, 3]) == 10
    assert largest_size([0, 10, 10], [3, 4, 3]) == 1  # one prompt: the largest share's
    assert largest_size([0, 10, 10], [3, 0, 3]) == 0


def test_no_valid_or_test_target_reaches_a_rollout(tokenizer, splits):
    dataset, tasks, stores = splits
    store = stores["train"]
    held_out = {t.user_id: {t.target} for t in tasks["valid"]}
    for t in tasks["test"]:
        held_out[t.user_id].add(t.target)
    # the store the rollouts' tool calls read holds no valid or test interaction of anyone
    for user, targets in held_out.items():
        assert not targets & set(store.user_history(user))
    with pytest.raises(ValueError, match="train tasks only"):
        check_train_tasks(tasks["valid"])
    with pytest.raises(ValueError, match="train tasks only"):
        draw_prompts(tasks["train"] + tasks["test"][:1], store, None, [1, 1, 1], [3, 10])
    prompts = draw_prompts(tasks["train"], store, None, [1, 1, 1], [3, 10])
    assert sum(prompts.report["counts"].values()) == len(prompts.tasks) > 0

    settings = GRPOSettings(group_size=2)
    rollout = make_rollout_func(prompts.tasks, store, StudentFormatConfig(), StudentConfig(),
                                settings, sampler_for=lambda trainer: trainer.sampler)
    answer = f"<plan>{PLAN}</plan>\n<reflection>r</reflection>\n<recommend>{PERMUTATION}</recommend>"

    class Trainer:
        class state:  # noqa: N801
            global_step = 3

    trainer = Trainer()
    ids = [t.task_id for t in prompts.tasks for _ in range(2)]
    sampler = ScriptedSampler(tokenizer, [answer] * len(ids))
    trainer.sampler = contextlib_of(sampler)
    out = rollout(ids, trainer)
    assert len(out["completion_ids"]) == len(out["env_mask"]) == len(ids)
    assert out["logprobs"] is None and out["well_formed"] == [True] * len(ids)
    by_id = {t.task_id: t for t in tasks["train"]}
    for task_id, prompt in zip(ids, sampler.prompts):
        task = by_id[task_id]
        assert task.split == "train" and task.target in task.candidates
        assert not any(f"[{item}]" in prompt for item in held_out[task.user_id])
    for name in (tasks["valid"][0].task_id, tasks["test"][0].task_id):
        with pytest.raises(KeyError, match="no training task"):
            rollout([name, name], trainer)
    data = prompt_dataset(prompts)
    assert data["prompt"] == [t.task_id for t in prompts.tasks]
    assert set(data.column_names) == {"prompt", "difficulty", "cst_rank"}


def test_dynamic_sampling_replaces_a_flat_group_with_a_group_on_another_train_prompt(
        tokenizer, splits):
    _, tasks, stores = splits
    store = stores["train"]
    prompts = draw_prompts(tasks["train"], store, None, [1, 1, 1], [3, 10])
    answer = f"<plan>{PLAN}</plan>\n<reflection>r</reflection>\n<recommend>{PERMUTATION}</recommend>"
    first, second = prompts.tasks[0].task_id, prompts.tasks[1].task_id
    ids = [first, first, second, second]

    class Trainer:
        class state:  # noqa: N801
            global_step = 5

    def run(resample_flat, script):
        settings = GRPOSettings(group_size=2, prompts_per_step=2, resample_flat=resample_flat)
        rollout = make_rollout_func(prompts.tasks, store, StudentFormatConfig(), StudentConfig(),
                                    settings, difficulty=prompts.difficulty,
                                    sampler_for=lambda trainer: trainer.sampler)
        trainer = Trainer()
        sampler = ScriptedSampler(tokenizer, script)
        trainer.sampler = contextlib_of(sampler)
        return rollout(ids, trainer)

    # group 1 flat (both well formed, the same ranking), group 2 spread (one pass malformed);
    # group 1's replacement spreads too
    script = [answer, answer, answer, "no idea", answer, "no idea"]
    plain = run(0, script[:4])
    assert plain["task_id"] == ids and "resampled" not in plain
    assert plain["difficulty"] == [prompts.difficulty[i] for i in ids]
    out = run(1, script)
    kept = out["task_id"]
    assert kept[2:] == [second, second] and out["resampled"] == [1, 1, 0, 0]
    assert kept[0] == kept[1] and kept[0] not in (first, second)
    assert kept[0] in {t.task_id for t in prompts.tasks}  # a drawn train prompt
    assert out["well_formed"] == [True, False, True, False]
    assert out["difficulty"][0] == prompts.difficulty[kept[0]]
    assert len(out["completion_ids"]) == len(out["prompt_ids"]) == 4
    assert run(1, script)["task_id"] == kept  # seeded by (seed, step, round): a resume draws the same
    # a replacement that is flat again is kept when the rounds are spent
    again = run(1, [answer, answer, answer, "no idea", answer, answer])
    assert again["resampled"] == [1, 1, 0, 0] and again["well_formed"][:2] == [True, True]


def contextlib_of(sampler):
    import contextlib

    @contextlib.contextmanager
    def opened():
        yield sampler

    return opened()


# --- TRL's config through ours ---------------------------------------------------------

def test_trl_fields_pass_through_and_unknown_ones_are_refused(tmp_path):
    from starrec.training.grpo import grpo_args
    from starrec.training.sft import trainer_args

    cfg = load_config(None, ["grpo.trl.scale_rewards=false", "grpo.trl.loss_type=grpo",
                             "sft.trl.lr_scheduler_type=constant"])
    args = grpo_args(cfg.grpo, tmp_path)
    assert args.scale_rewards == "none" and args.loss_type == "grpo"
    assert not args.bf16 and args.use_cpu and not args.activation_checkpointing
    assert args.num_generations == 4 and args.beta == 0.001 and args.temperature == 0.7
    assert args.output_dir == str(tmp_path / "checkpoints")
    assert trainer_args(cfg.sft, tmp_path, False, False).lr_scheduler_type == "constant"
    with pytest.raises(ValueError, match="scale_reward'.*did you mean scale_rewards"):
        load_config(None, ["grpo.trl.scale_reward=false"])
    with pytest.raises(ValueError, match="not fields of trl.SFTConfig"):
        SFTSettings(trl={"num_generations": 4})
    with pytest.raises(ValueError, match="set by STAR"):
        GRPOSettings(trl={"output_dir": "elsewhere"})
    # the rollouts sample at grpo.temperature: TRL's log-probabilities may not use another
    with pytest.raises(ValueError, match="grpo.temperature"):
        GRPOSettings(trl={"temperature": 1.0})
    assert SFTSettings(trl={"learning_rate": 1e-4}).trl == {"learning_rate": 1e-4}
    with pytest.raises(ValueError, match="must divide"):
        GRPOSettings(micro_batch=3)


def test_the_gpu_preset_builds_a_vllm_grpo_config_without_a_gpu(tmp_path, monkeypatch):
    import transformers.training_args as training_args

    from starrec.training.grpo import grpo_args

    from_file = load_config(ROOT / "configs" / "grpo-gpu.yaml").grpo
    preset = load_config(None, preset_overrides("gpu")).grpo
    assert from_file == preset == GRPOSettings(**GRPO_PRESETS["gpu"])
    assert (preset.group_size, preset.lr, preset.beta, preset.temperature) == (8, 1e-6, 0.001, 0.7)
    # TrainingArguments checks for a bf16 GPU; this test has none
    monkeypatch.setattr(training_args, "is_torch_bf16_gpu_available", lambda: True)
    args = grpo_args(preset, tmp_path, gpu=True)
    assert args.use_vllm and args.vllm_mode == "colocate" and args.bf16 and not args.use_cpu
    assert args.activation_checkpointing and args.num_generations == 8
    assert args.learning_rate == 1e-6 and args.beta == 0.001 and args.temperature == 0.7
    assert args.generation_batch_size == 16 * 8  # prompts_per_step x group_size per step
    assert args.vllm_importance_sampling_correction  # our vLLM rollouts report log-probs
    assert "accelerate launch" in (ROOT / "docs" / "training-gpu.md").read_text()
    assert (ROOT / "configs" / "accelerate_grpo.yaml").is_file()


def test_vllm_rollout_requests_and_batches(tokenizer):
    from starrec.training.vllm_rollout import Batcher, Output, VLLMSampler, colocate_batch

    calls = []

    class Params(dict):
        def __init__(self, **kwargs):
            super().__init__(kwargs)

    class FakeLLM:
        def generate(self, prompts, sampling_params, use_tqdm):
            calls.append(len(prompts))
            text = "[A, B]</recommend> extra"
            ids = tokenizer.encode(text, add_special_tokens=False)
            step = type("Lp", (), {"logprob": -0.25})
            sample = type("S", (), {"token_ids": ids, "finish_reason": "stop",
                                    "logprobs": [{i: step} for i in ids]})
            assert all(p["include_stop_str_in_output"] for p in sampling_params)
            return [type("R", (), {"outputs": [sample]}) for _ in prompts]

    run = colocate_batch(FakeLLM(), Params, Params)
    sampler = VLLMSampler(Batcher(run, window_s=0.05), tokenizer, [tokenizer.eos_token_id])
    from concurrent.futures import ThreadPoolExecutor

    def one(_):
        return sampler.sample("<|im_start|>assistant\n<recommend>", max_tokens=20,
                              temperature=0.7, stop=["</recommend>"],
                              constraint=PermutationConstraint(2), seed=1)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert sum(calls) == 4 and len(calls) < 4  # requests of concurrent passes share batches
    completion, segment = results[0]
    assert completion.text == "[A, B]</recommend>" and segment.masked
    assert tokenizer.decode(segment.ids) == segment.text
    # under a constraint vLLM reports masked log-probabilities, which TRL must not compare
    # with the unmasked model's: none are passed on
    assert segment.logprobs is None
    completion, segment = sampler.sample("<|im_start|>assistant\n<recommend>", max_tokens=20,
                                         temperature=0.7, stop=["</recommend>"], constraint=None,
                                         seed=1)
    assert not segment.masked and segment.logprobs == [-0.25] * len(segment.ids)
    assert Output([1], None, None).finish is None

    # the end-of-sequence id a pass sampled is the one recorded (a model may have several)
    other_eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert other_eos != tokenizer.eos_token_id

    def ends(batch):
        ids = tokenizer.encode("fine", add_special_tokens=False) + [other_eos]
        return [Output(ids, [-0.1] * len(ids), "stop") for _ in batch]

    sampler = VLLMSampler(Batcher(ends, window_s=0.0), tokenizer,
                          [tokenizer.eos_token_id, other_eos])
    completion, segment = sampler.sample("<|im_start|>assistant\n", max_tokens=20,
                                         temperature=0.7, stop=None, constraint=None, seed=1)
    assert segment.eos and segment.eos_id == other_eos and completion.text == "fine"


# --- a real run on a tiny model --------------------------------------------------------------

@pytest.fixture(scope="module")
def student_dir(tiny_lm_dir, tmp_path_factory):
    """The tiny model as an SFT student: a card with a short prompt (no tool list: the
    rollout tests above cover the calls) and plan choices."""
    folder = tmp_path_factory.mktemp("student") / "sft"
    shutil.copytree(tiny_lm_dir, folder)
    write_model_card(folder, ModelCard(stage="sft", base_model="tiny", base_model_path=str(folder),
                                       format=StudentFormatConfig(history_items=2, tools=False),
                                       plan_choices=[PLAN, "long_term: what they always liked"],
                                       max_reflection_tokens=8))
    return folder


def settings(**changes) -> GRPOSettings:
    # a group of 8 passes: their rankings (decoded under the permutation mask from a random
    # model) differ in where the target lands, so advantages are not all zero
    base = dict(steps=2, group_size=8, prompts_per_step=1, learning_rate=5e-2,
                max_completion_length=12, save_steps=1, eval_steps=2, valid_tasks=2,
                train_tasks=6, difficulty_ratio=[1, 1, 1], lora_r=4, lora_alpha=8,
                resample_flat=1)
    return GRPOSettings(**{**base, **changes})


def test_two_grpo_steps_change_the_weights_checkpoint_and_resume(student_dir, splits, tmp_path,
                                                               monkeypatch):
    from trl import GRPOTrainer

    from starrec.training.grpo import train_grpo

    _, tasks, stores = splits
    prompts = draw_prompts(tasks["train"], stores["train"], 6, [1, 1, 1], [3, 10])
    student = StudentConfig(max_new_tokens=12)
    out = tmp_path / "grpo"
    common = dict(student=student, valid_tasks=tasks["valid"], valid_store=stores["valid"],
                  show_progress=False)
    result = train_grpo(str(student_dir), prompts, stores["train"], out, settings(), **common)
    assert result.global_step == 2 and result.resumed_from is None
    before, after = load_file(str(student_dir / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(before) == set(after)  # LoRA merged: a plain model folder
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(before[q], after[q])
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    card = read_model_card(out)
    assert card.stage == "grpo" and card.format == read_model_card(student_dir).format and card.merged
    assert card.plan_choices == read_model_card(student_dir).plan_choices
    assert card.format.candidate_order == "presented"
    assert card.data["prompts"]["drawn"] == 6 and card.metrics["global_step"] == 2
    curves = json.loads((out / "curves.json").read_text())
    assert [p["step"] for p in curves["train"]] == [1, 2]
    assert {"reward", "reward_std", "format_rate", "kl", "outcome"} <= set(curves["train"][0])
    assert any(p["reward_std"] > 0 for p in curves["train"])
    # one group a step: a step whose rewards spread has no zero-spread group
    assert all(p["zero_spread"] == (0.0 if p["reward_std"] > 0 else 1.0) for p in curves["train"])
    assert all(p["resampled"] in (0.0, 1.0) for p in curves["train"])  # one group a step
    assert [p["step"] for p in curves["valid"]] == [0, 2]
    assert curves["valid"][0]["n_tasks"] == 2 and 0 <= curves["valid"][0]["AvgHR"] <= 100
    assert len(curves["valid"][0]["ranks"]) == 2 and "vs_step_0" in curves["valid"][1]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    start = json.loads((out / "valid-start.json").read_text())  # kept before any checkpoint
    assert start["entry"]["step"] == 0 and start["key"]["base_model"] == model_hash(student_dir)
    kept = read_prompts(out / "prompts.json", tasks["train"])  # what a resume trains on
    assert [t.task_id for t in kept.tasks] == [t.task_id for t in prompts.tasks]
    assert kept.ranks == prompts.ranks and kept.report == prompts.report

    with pytest.raises(FileExistsError, match="resume it or choose another"):
        train_grpo(str(student_dir), prompts, stores["train"], out, settings(steps=3), **common)
    steps = []
    original = GRPOTrainer.training_step

    def counted(self, *args, **kwargs):
        steps.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GRPOTrainer, "training_step", counted)
    result = train_grpo(str(student_dir), prompts, stores["train"], out, settings(steps=3),
                        resume=True, **common)
    assert result.resumed_from == "checkpoint-2" and result.global_step == 3
    # one optimizer step, taken from step 2 on: a micro-batch of one pass per group member
    assert steps == [2] * settings().grad_accum
    curves = json.loads((out / "curves.json").read_text())
    assert [p["step"] for p in curves["train"]] == [1, 2, 3]
    assert [p["step"] for p in curves["valid"]] == [0, 2, 3]  # and at the last step


def test_distill_grpo_command_refuses_bad_input_with_one_line(tmp_path):
    import typer
    from typer.testing import CliRunner

    from starrec.cli.distill import app as distill_app

    root = typer.Typer()
    root.add_typer(distill_app, name="distill")
    result = CliRunner().invoke(root, ["distill", "grpo", "--help"])
    assert result.exit_code == 0 and "Example" in result.output and "--preset" in result.output
    for bad in (["--set", "grpo.trl.not_a_field=1"], ["--preset", "tpu"],
                ["--set", "grpo.group_size=1"], ["--set", "grpo.micro_batch=3"]):
        result = CliRunner().invoke(root, ["distill", "grpo", "--out", str(tmp_path / "x"), *bad])
        assert result.exit_code == 2, result.output
        assert "error" in result.output.lower() or "invalid" in result.output.lower()


def test_grpo_refuses_a_ranking_head_student(student_dir, splits, tmp_path):
    from starrec.llm.card import HeadSpec
    from starrec.training.grpo import train_grpo

    _, tasks, stores = splits
    head = tmp_path / "head"
    shutil.copytree(student_dir, head)
    card = read_model_card(student_dir).model_copy(update={"stage": "rank", "head": HeadSpec()})
    write_model_card(head, card)
    prompts = draw_prompts(tasks["train"], stores["train"], 6, [1, 1, 1], [3, 10])
    with pytest.raises(ValueError, match="ranking-head student.*rank.objective=pl"):
        train_grpo(str(head), prompts, stores["train"], tmp_path / "out", settings(),
                   show_progress=False)
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_every_valid_point_is_compared_with_step_0_task_by_task():
    from starrec.training.grpo_monitor import VALID, curves
    from starrec.training.reward import paired_ranks

    history = [{"step": 0, VALID + "AvgHR": 30.0, VALID + "ranks": [1, 4, 9, 2]},
               {"step": 1, "reward": 1.2},
               {"step": 2, VALID + "AvgHR": 40.0, VALID + "ranks": [1, 2, 9, 6]}]
    valid = curves(history)["valid"]
    assert "vs_step_0" not in valid[0]
    paired = valid[1]["vs_step_0"]
    # per task: 0, +1/3 (4 -> 2), 0, -2/3 (2 -> 6): mean -1/12
    assert paired["difference"] == pytest.approx(100 * (1 / 3 - 2 / 3) / 4, abs=0.01)
    assert (paired["wins"], paired["ties"], paired["losses"]) == (1, 2, 1)
    low, high = paired["ci95"]
    assert low <= paired["difference"] <= high
    with pytest.raises(ValueError, match="other tasks"):
        paired_ranks([1, 2], [1, 2, 3])


def test_a_valid_point_shows_a_bar_over_passes_decoded_one_after_another(monkeypatch, capfd):
    from types import SimpleNamespace

    import starrec.training.grpo_monitor as monitor

    tasks = [SimpleNamespace(task_id=f"valid-{i}", candidates=["a", "b", "c"]) for i in range(3)]
    calls = []

    def fake_run_passes(sampler, jobs, store, fmt, student, *, concurrent, **kwargs):
        calls.append(([job[0].task_id for job in jobs], concurrent))
        return [SimpleNamespace(rank=1 + i, task=task,
                                answer=SimpleNamespace(completed=SimpleNamespace(ranking=task.candidates)),
                                verdict=SimpleNamespace(well_formed=True))
                for i, (task, _) in enumerate(jobs)]

    monkeypatch.setattr(monitor, "run_passes", fake_run_passes)
    metrics = monitor.evaluate_valid(SimpleNamespace(), tasks, None, None, StudentConfig())
    assert calls == [(["valid-0"], False), (["valid-1"], False), (["valid-2"], False)]
    assert metrics["n_tasks"] == 3 and metrics["AvgHR"] == pytest.approx(100.0)
    err = capfd.readouterr().err
    assert "grpo valid" in err and "3/3" in err
    calls.clear()
    monitor.evaluate_valid(SimpleNamespace(), tasks, None, None, StudentConfig(), show_progress=False)
    assert "grpo valid" not in capfd.readouterr().err
    # an engine that batches passes (vLLM) gets them all at once, without a bar
    monitor.evaluate_valid(SimpleNamespace(concurrent=True), tasks, None, None, StudentConfig())
    assert calls[-1] == (["valid-0", "valid-1", "valid-2"], True)


def test_the_step_0_valid_point_survives_a_run_stopped_before_its_first_checkpoint(
        monkeypatch, tmp_path):
    import contextlib
    from types import SimpleNamespace

    import starrec.training.grpo_monitor as monitor

    measured = []

    def fake_evaluate(sampler, tasks, *args, **kwargs):
        measured.append([t.task_id for t in tasks])
        return {"AvgHR": 25.0, "format_rate": 50.0, "n_tasks": len(tasks), "ranks": [1, 7]}

    monkeypatch.setattr(monitor, "evaluate_valid", fake_evaluate)
    monkeypatch.setattr(monitor, "live_sampler", lambda trainer: contextlib.nullcontext(None))
    tasks = [SimpleNamespace(task_id=f"valid-{i}") for i in range(2)]
    start = tmp_path / monitor.VALID_START

    def begin(tasks, key):
        callback = monitor.ValidCallback(tasks, None, StudentFormatConfig(), StudentConfig(), 10,
                                         start_file=start, start_key=key)
        callback.trainer = SimpleNamespace()
        state = SimpleNamespace(global_step=0, log_history=[])
        callback.on_train_begin(None, state, None)
        return state.log_history

    first = begin(tasks, {"base_model": "a"})
    assert len(measured) == 1 and first[0][monitor.VALID + "AvgHR"] == 25.0
    assert begin(tasks, {"base_model": "a"}) == first and len(measured) == 1  # read back
    begin(tasks, {"base_model": "b"})  # other starting weights: measured again
    begin(tasks[:1], {"base_model": "b"})  # other tasks: measured again
    assert measured == [["valid-0", "valid-1"]] * 2 + [["valid-0"]]
    start.write_text("{not json")
    begin(tasks[:1], {"base_model": "b"})
    assert len(measured) == 4


def test_a_step_0_valid_point_stopped_midway_goes_on_from_the_tasks_it_had_done(
        monkeypatch, tmp_path):
    import contextlib
    from types import SimpleNamespace

    import starrec.training.grpo_monitor as monitor

    tasks = [SimpleNamespace(task_id=f"valid-{i}", candidates=["a", "b", "c"]) for i in range(4)]
    ran: list[str] = []
    stop_after: list[int] = [2]

    def fake_run_passes(sampler, jobs, store, fmt, student, *, concurrent, **kwargs):
        if len(ran) == stop_after[0]:
            raise KeyboardInterrupt  # the session ends in the middle of the point
        ran.extend(job[0].task_id for job in jobs)
        return [SimpleNamespace(rank=1 + int(task.task_id[-1]), task=task,
                                answer=SimpleNamespace(completed=SimpleNamespace(ranking=task.candidates)),
                                verdict=SimpleNamespace(well_formed=True))
                for task, _ in jobs]

    monkeypatch.setattr(monitor, "run_passes", fake_run_passes)
    monkeypatch.setattr(monitor, "live_sampler", lambda trainer: contextlib.nullcontext(SimpleNamespace()))
    start = tmp_path / monitor.VALID_START
    partial = tmp_path / monitor.VALID_START_PARTIAL

    def begin(key):
        callback = monitor.ValidCallback(tasks, None, StudentFormatConfig(), StudentConfig(), 10,
                                         start_file=start, start_key=key, show_progress=False)
        callback.trainer = SimpleNamespace()
        state = SimpleNamespace(global_step=0, log_history=[])
        callback.on_train_begin(None, state, None)
        return state.log_history

    with pytest.raises(KeyboardInterrupt):
        begin({"base_model": "a"})
    assert ran == ["valid-0", "valid-1"] and not start.exists()
    with partial.open("a") as f:
        f.write('{"task_id": "valid-2", "ra')  # a line cut by the stop
    stop_after[0] = 3
    with pytest.raises(KeyboardInterrupt):
        begin({"base_model": "a"})
    assert ran == ["valid-0", "valid-1", "valid-2"]  # the cut line was measured again
    stop_after[0] = -1
    history = begin({"base_model": "a"})
    assert ran == ["valid-0", "valid-1", "valid-2", "valid-3"]  # each task once
    assert history[0][monitor.VALID + "ranks"] == [1, 2, 3, 4]
    assert history[0][monitor.VALID + "n_tasks"] == 4
    assert start.exists() and not partial.exists()
    # results kept for other starting weights are not used
    ran.clear()
    stop_after[0] = 1
    with pytest.raises(KeyboardInterrupt):
        begin({"base_model": "b"})
    stop_after[0] = -1
    begin({"base_model": "c"})
    assert ran == ["valid-0", "valid-0", "valid-1", "valid-2", "valid-3"]
