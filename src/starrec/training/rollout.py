"""GRPO rollouts: real student passes on the live policy, turned into TRL's token lists.

A rollout is `Student.answer` (`starrec.inference.student`), unchanged: the pass opens
with the format's masks and choices, pauses at `</tool_call>`, has the call executed
against the evidence store of the task's split, appends the `<tool_response>` and
continues, exactly as at inference. Only the `ChatModel` under it differs: a sampler over
the model being trained (`PolicyModel`, transformers; `starrec.training.vllm_rollout`,
vLLM on a GPU), wrapped per pass in `Recorded`, which keeps every continuation the pass
asked for with the token ids that were sampled (`Segment`).

From the pass's final text and its segments, `assemble` rebuilds what TRL trains on:

- which characters the model generated: a segment's text counts where the final text
  still holds it after everything the runtime did (a repair cuts text away; what
  survives is the common prefix at the segment's place). Every other character was
  written by the runtime: tool responses, the limit message, the `<plan>` that opens a
  pass, an option chosen without decoding (a single one), a closing tag it added;
- `completion_ids`: for the model's characters the sampled ids, for the runtime's (and
  the rare model run whose ids do not decode to exactly its characters) the tokenizer's
  ids of that text. At inference every continuation re-reads the text so far; these ids
  differ from that re-reading only where two pieces meet;
- `env_mask` (TRL's name; its tool mask): 1 on the model's tokens, 0 on the runtime's,
  so tool responses carry no loss. Tokens sampled under a mask (choices, repairs) count
  as the model's unless `grpo.learn_masked` is off;
- `logprobs`: the sampling log-probabilities where the engine reports them (vLLM); None
  from transformers, as TRL's own transformers path returns, and then TRL computes what
  it needs from the model itself (old log-probs only when generations are reused).

A pass that finished (its `</recommend>`, or the model's own end of sequence) ends with
the end-of-sequence token, the model's if it wrote it and the runtime's (mask 0)
otherwise; a pass the runtime cut has none, which TRL counts as clipped.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from starrec.config import GRPOSettings, StudentConfig, StudentFormatConfig
from starrec.core import Task
from starrec.cst.store import EvidenceStore
from starrec.inference.student import Student, StudentAnswer
from starrec.llm.base import Completion, Constraint, Message
from starrec.llm.hf_backend import HFChatModel
from starrec.trajectories.format import (
    PLAN,
    RECOMMEND,
    REFLECTION,
    STOP_STRINGS,
    TOOL_CALL,
    close_tag,
    tool_response_spans,
)
from starrec.training.reward import FormatVerdict, judge_format, target_rank, total_reward

log = logging.getLogger(__name__)

RUNTIME = -1  # owner of a character the runtime wrote
# parts whose closing tag the student is expected to write itself
CLOSED_BY_STUDENT = (PLAN, TOOL_CALL, REFLECTION, RECOMMEND)


@dataclass
class Segment:
    """One continuation of a pass: the text it continued (`prefix`: prompt and pass so
    far), what it returned, and the sampled ids that decode to exactly that text (None
    when they do not, then the text is tokenized again)."""

    prefix: str
    text: str
    ids: list[int] | None
    logprobs: list[float | None] | None = None
    masked: bool = False  # decoded under a constraint (a choice or a repair)
    eos: bool = False  # ended by the model's end-of-sequence token
    finish: str = "stop"
    eos_id: int | None = None  # which end-of-sequence id it sampled (a model may have several)


class Sampler(Protocol):
    """What a rollout needs of an engine: a ChatModel's rendering and constraints, and a
    continuation that also returns its `Segment`."""

    name: str
    tokenizer: Any

    def supports(self, constraint: Constraint) -> bool: ...

    def render_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> str: ...

    def sample(self, prompt: str, *, max_tokens: int, temperature: float,
               stop: list[str] | None, constraint: Constraint | None,
               seed: int | None) -> tuple[Completion, Segment]: ...


class Recorded:
    """A `ChatModel` for one pass: every continuation goes to `sampler` and its segment
    is kept in `segments`, in order."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler = sampler
        self.name = sampler.name
        self.segments: list[Segment] = []

    def supports(self, constraint: Constraint) -> bool:
        return self.sampler.supports(constraint)

    def render_chat(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        return self.sampler.render_chat(messages, add_generation_prompt)

    def complete(self, prompt: str, *, max_tokens: int = 256, temperature: float = 0.0,
                 stop: list[str] | None = None, constraint: Constraint | None = None,
                 seed: int | None = None) -> Completion:
        completion, segment = self.sampler.sample(prompt, max_tokens=max_tokens,
                                                  temperature=temperature, stop=stop,
                                                  constraint=constraint, seed=seed)
        self.segments.append(segment)
        return completion

    def chat(self, messages: list[Message], *, max_tokens: int = 256, temperature: float = 0.0,
             stop: list[str] | None = None, constraint: Constraint | None = None,
             seed: int | None = None) -> Completion:
        return self.complete(self.render_chat(messages), max_tokens=max_tokens,
                             temperature=temperature, stop=stop, constraint=constraint, seed=seed)


def settle(tokenizer: Any, ids: list[int], stop: Sequence[str] | None,
           logprobs: list[float | None] | None = None
           ) -> tuple[str, list[int] | None, list[float | None] | None, bool]:
    """(text, ids, logprobs, stopped) of generated `ids`: the text up to and including the
    first stop string (kept: the student closes a part only where it is missing), the ids
    that decode to exactly that text (None when no prefix of them does), and whether a
    stop string ended it. A generation stops on the token that completes a stop string,
    which may carry a few characters past it (an engine may run on past it): the tokens
    past the stop string are dropped; one that straddles it leaves the ids None."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    ends = [i + len(s) for s in stop or [] if s and (i := text.find(s)) >= 0]
    stopped = bool(ends)
    if stopped:
        text = text[:min(ends)]
    for keep in range(len(ids), -1, -1):
        decoded = tokenizer.decode(ids[:keep], skip_special_tokens=False)
        if decoded == text:
            kept = None if logprobs is None else list(logprobs[:keep])
            return text, list(ids[:keep]), kept, stopped
        if len(decoded) < len(text):
            break
    return text, None, None, stopped


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Decode without dropout, as inference does; the training mode comes back after."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


class PolicyModel(HFChatModel):
    """The trainer's live model (no copy, no reload: every rollout samples the weights of
    that moment) as the student's ChatModel, generating as `HFChatModel` does, except that
    a continuation keeps its stop string and reports its sampled ids (`sample`)."""

    def __init__(self, model: Any, tokenizer: Any, name: str = "policy") -> None:
        training = model.training
        super().__init__(model, tokenizer, name=name)
        model.train(training)  # HFChatModel puts it in eval mode for good; a trainer must not

    def _generate(self, text: str, add_special: bool, max_tokens: int, temperature: float,
                  stop: list[str] | None, constraint: Constraint | None,
                  seed: int | None) -> Completion:
        return self._sample(text, add_special, max_tokens, temperature, stop, constraint, seed)[0]

    def sample(self, prompt: str, *, max_tokens: int, temperature: float,
               stop: list[str] | None, constraint: Constraint | None,
               seed: int | None) -> tuple[Completion, Segment]:
        bos = self.tokenizer.bos_token
        add_special = not (bos and prompt.startswith(bos))
        return self._sample(prompt, add_special, max_tokens, temperature, stop, constraint, seed)

    @contextlib.contextmanager
    def _decoding(self) -> Iterator[None]:
        """No gradients and no dropout while sampling; the training mode comes back after
        (inference-mode tensors could not meet the trainer's autograd later)."""
        import torch

        with torch.no_grad(), eval_mode(self.model):
            yield

    def _sample(self, text: str, add_special: bool, max_tokens: int, temperature: float,
                stop: list[str] | None, constraint: Constraint | None,
                seed: int | None) -> tuple[Completion, Segment]:
        start = time.perf_counter()
        new_ids, prompt_len, constraint = self._new_ids(text, add_special, max_tokens,
                                                        temperature, stop, constraint, seed)
        eos = bool(new_ids) and new_ids[-1] in self.eos_ids
        eos_id = new_ids.pop() if eos else None
        settled, ids, _, stopped = settle(self.tokenizer, new_ids, stop)
        finish = "stop" if eos or stopped else "length"
        completion = Completion(text=settled, prompt_tokens=prompt_len,
                                completion_tokens=len(new_ids),
                                seconds=time.perf_counter() - start, finish_reason=finish,
                                constrained=constraint is not None)
        return completion, Segment(text, settled, ids, None, constraint is not None,
                                   eos and not stopped, finish, eos_id)


# --- from a pass to TRL's lists -------------------------------------------------------------

def char_owners(prompt: str, text: str, segments: Sequence[Segment]) -> list[int]:
    """For each character of `text` (the pass's completion), the index of the segment that
    generated it, or RUNTIME. A segment owns the characters of its text that survive at its
    place: its prefix must still begin the pass, and it keeps the common prefix of its text
    and what follows there; a later segment wins over an earlier one."""
    owners = [RUNTIME] * len(text)
    full = prompt + text
    for index, segment in enumerate(segments):
        if not segment.prefix.startswith(prompt) or not full.startswith(segment.prefix):
            continue
        start = len(segment.prefix) - len(prompt)
        rest = text[start:]
        kept = 0
        limit = min(len(rest), len(segment.text))
        while kept < limit and rest[kept] == segment.text[kept]:
            kept += 1
        owners[start:start + kept] = [index] * kept
    return owners


def runtime_closed(text: str, owners: Sequence[int], segments: Sequence[Segment],
                   chosen_plan: bool) -> list[str]:
    """The parts whose closing tag the runtime wrote because the student stopped, or was
    stopped, inside them: a closing tag with a character of the runtime's, outside tool
    responses. A part decoded under a mask (a plan among the plan choices, a repaired
    call or list) is closed by the runtime with the choice, so that tag is not counted
    (the repair is judged as a repair)."""
    responses = tool_response_spans(text)
    closed: list[str] = []
    for tag in CLOSED_BY_STUDENT:
        closing = close_tag(tag)
        position = text.find(closing)
        while position >= 0:
            inside = any(s <= position < e for s, e in responses)
            written = all(owners[i] != RUNTIME for i in range(position, position + len(closing)))
            before = owners[position - 1] if position else RUNTIME
            with_choice = ((before != RUNTIME and segments[before].masked)
                           or (tag == PLAN and chosen_plan))
            if not inside and not written and not with_choice:
                closed.append(tag)
            position = text.find(closing, position + len(closing))
    return closed


def _runs(owners: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """(owner, start, end) of each maximal run of equal owners."""
    start = 0
    for i in range(1, len(owners) + 1):
        if i == len(owners) or owners[i] != owners[start]:
            yield owners[start], start, i
            start = i


def _token_ends(tokenizer: Any, segment: Segment) -> list[int] | None:
    """Character end of each sampled token within the segment's text; None where a prefix
    of the ids does not decode to a prefix of the text (a character split across tokens)."""
    ends = []
    for i in range(1, len(segment.ids or []) + 1):
        piece = tokenizer.decode(segment.ids[:i], skip_special_tokens=False)
        if not segment.text.startswith(piece):
            return None
        ends.append(len(piece))
    return ends


@dataclass
class Assembled:
    completion_ids: list[int] = field(default_factory=list)
    env_mask: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    sampled: list[bool] = field(default_factory=list)  # the id is one the engine sampled

    def add(self, ids: Sequence[int], mask: int, logprobs: Sequence[float | None] | None,
            sampled: bool) -> None:
        self.completion_ids += list(ids)
        self.env_mask += [mask] * len(ids)
        self.logprobs += list(logprobs) if logprobs is not None else [None] * len(ids)
        self.sampled += [sampled] * len(ids)


def assemble(tokenizer: Any, prompt: str, text: str, segments: Sequence[Segment],
             learn_masked: bool = True, inserted: Sequence[tuple[int, int]] = ()
             ) -> tuple[Assembled, list[int]]:
    """The completion's token ids with their env mask and sampling log-probabilities (None
    where unknown, 0 for runtime tokens), and the owner of each character. `inserted`
    are spans the runtime declares it wrote (`StudentAnswer.inserted`): they are its own
    even where a segment happened to write the same characters before a repair cut them."""
    owners = char_owners(prompt, text, segments)
    for start, end in inserted:
        owners[start:end] = [RUNTIME] * (min(end, len(text)) - start)
    out = Assembled()

    def encode(piece: str) -> list[int]:
        return tokenizer.encode(piece, add_special_tokens=False) if piece else []

    for owner, start, end in _runs(owners):
        if owner == RUNTIME:
            ids = encode(text[start:end])
            out.add(ids, 0, [0.0] * len(ids), False)
            continue
        segment = segments[owner]
        mask = 1 if learn_masked or not segment.masked else 0
        offset = len(segment.prefix) - len(prompt)
        a, b = start - offset, end - offset  # the run within the segment's text
        if segment.ids is not None and a == 0 and b == len(segment.text):
            out.add(segment.ids, mask, segment.logprobs, True)
            continue
        ends = _token_ends(tokenizer, segment) if segment.ids is not None else None
        if not ends:
            out.add(encode(segment.text[a:b]), mask, None, False)
            continue
        starts = [0, *ends[:-1]]
        inside = [i for i in range(len(ends)) if starts[i] >= a and ends[i] <= b]
        head = starts[inside[0]] if inside else b
        tail = ends[inside[-1]] if inside else b
        out.add(encode(segment.text[a:head]), mask, None, False)
        out.add([segment.ids[i] for i in inside], mask,
                [segment.logprobs[i] for i in inside] if segment.logprobs else None, True)
        out.add(encode(segment.text[tail:b]), mask, None, False)
    return out, owners


# --- one pass, many passes ---------------------------------------------------------------

@dataclass
class Rollout:
    """One student pass in TRL's terms, with its reward inputs."""

    task: Task
    answer: StudentAnswer
    seed: int
    prompt_ids: list[int]
    completion_ids: list[int]
    env_mask: list[int]
    logprobs: list[float | None]
    verdict: FormatVerdict
    rank: int | None  # the target's rank in the completed ranking
    runtime_closed: list[str]
    seconds: float


def rollout_pass(sampler: Sampler, task: Task, store: EvidenceStore, fmt: StudentFormatConfig,
                 student: StudentConfig, seed: int, *, plan_choices: Sequence[str] = (),
                 reflection_cap: int | None = None, learn_masked: bool = True,
                 explore_ranking: float | None = None) -> Rollout:
    """One student pass on `task` sampled with `seed`, in TRL's terms (`explore_ranking`:
    `Student`'s, the list sampled under the permutation mask at that temperature)."""
    started = time.perf_counter()
    model = Recorded(sampler)
    config = student.model_copy(update={"seed": seed})
    runner = Student(model, store, fmt, config, plan_choices=plan_choices,
                     reflection_cap=reflection_cap, explore_ranking=explore_ranking)
    prompt = runner.prompt(task)
    answer = runner.answer(task)
    tokenizer = sampler.tokenizer
    assembled, owners = assemble(tokenizer, prompt, answer.text, model.segments, learn_masked,
                                 answer.inserted)
    closed = runtime_closed(answer.text, owners, model.segments, answer.chosen_plan)
    if answer.stop in ("recommend", "end"):
        last = model.segments[-1] if model.segments else None
        own = (answer.stop == "end" and last is not None and last.eos
               and not any(answer.text.endswith(s) for s in STOP_STRINGS))
        mask = 1 if own and (learn_masked or not last.masked) else 0
        sampled = last.eos_id if own and last.eos_id is not None else _eos_id(tokenizer)
        assembled.add([sampled], mask, [None] if own else [0.0], own)
    if not assembled.completion_ids:  # a pass that failed before a token: TRL needs one
        assembled.add([_eos_id(tokenizer)], 0, [0.0], False)
    prompt_ids = prompt_token_ids(tokenizer, prompt)
    verdict = judge_format(answer, len(task.candidates), runtime_closed=closed)
    return Rollout(task=task, answer=answer, seed=seed, prompt_ids=list(prompt_ids),
                   completion_ids=assembled.completion_ids, env_mask=assembled.env_mask,
                   logprobs=assembled.logprobs, verdict=verdict,
                   rank=target_rank(answer.completed.ranking, task.target),
                   runtime_closed=closed, seconds=time.perf_counter() - started)


def prompt_token_ids(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's ids as the backends feed them: a prompt that opens with the BOS text
    (a chat template's) gets no second one."""
    bos = tokenizer.bos_token
    ids = tokenizer(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))["input_ids"]
    return list(ids)


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no end-of-sequence token")
    return int(tokenizer.eos_token_id)


def pass_seed(seed: int, step: int, index: int) -> int:
    """The sampling seed of the `index`-th pass of the generation at `step`: every pass of
    a group gets its own, and a resumed run draws what the interrupted one would have."""
    return (seed * 1_000_003 + step) * 10_007 + index


def run_passes(sampler: Sampler, jobs: Sequence[tuple[Task, int]], store: EvidenceStore,
               fmt: StudentFormatConfig, student: StudentConfig, *, concurrent: bool = False,
               plan_choices: Sequence[str] = (), reflection_cap: int | None = None,
               learn_masked: bool = True, explore_ranking: float | None = None
               ) -> list[Rollout]:
    """A pass per (task, seed), in order. `concurrent` runs them in threads, for an engine
    that batches requests from many passes (vLLM); an in-process transformers model
    answers one request at a time, so its passes run one after another."""
    def one(job: tuple[Task, int]) -> Rollout:
        return rollout_pass(sampler, job[0], store, fmt, student, job[1],
                            plan_choices=plan_choices, reflection_cap=reflection_cap,
                            learn_masked=learn_masked, explore_ranking=explore_ranking)

    if not concurrent or len(jobs) < 2:
        return [one(job) for job in jobs]
    from concurrent.futures import ThreadPoolExecutor

    store.graph, store.timeline  # noqa: B018  built once here, not raced for by the threads
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        return list(pool.map(one, jobs))


def rollout_batch(rollouts: Sequence[Rollout], with_logprobs: bool,
                  difficulty: Mapping[str, str] | None = None,
                  resampled: Sequence[int] | None = None) -> dict[str, list]:
    """TRL's rollout output: the three required lists, `env_mask`, and per-completion
    fields its reward functions receive by name (they replace the dataset's columns of the
    same name, so a group sampled in place of a flat one carries its own difficulty)."""
    out = {
        "prompt_ids": [r.prompt_ids for r in rollouts],
        "completion_ids": [r.completion_ids for r in rollouts],
        "logprobs": [r.logprobs for r in rollouts] if with_logprobs else None,
        "env_mask": [r.env_mask for r in rollouts],
        "target_rank": [r.rank for r in rollouts],
        "well_formed": [r.verdict.well_formed for r in rollouts],
        "format_reasons": ["; ".join(r.verdict.reasons) for r in rollouts],
        "rollout_stop": [r.answer.stop for r in rollouts],
        "tool_calls": [len(r.answer.tool_calls) for r in rollouts],
        "task_id": [r.task.task_id for r in rollouts],
    }
    if difficulty is not None:
        out["difficulty"] = [difficulty.get(r.task.task_id, "") for r in rollouts]
    if resampled is not None:
        out["resampled"] = list(resampled)
    return out


def groups_of(prompts: Sequence[str]) -> list[tuple[int, int]]:
    """(start, end) of each run of one prompt: TRL repeats a prompt once per pass of its
    group, one after another."""
    spans, start = [], 0
    for i in range(1, len(prompts) + 1):
        if i == len(prompts) or prompts[i] != prompts[start]:
            spans.append((start, i))
            start = i
    return spans


def is_flat(rollouts: Sequence[Rollout]) -> bool:
    """Whether every pass of a group earned the same reward (no advantage: nothing to learn)."""
    return len({total_reward(r.rank, r.verdict.well_formed) for r in rollouts}) == 1


RolloutFunc = Callable[[list[str], Any], dict[str, Any]]


def make_rollout_func(tasks: Sequence[Task], store: EvidenceStore, fmt: StudentFormatConfig,
                      student: StudentConfig, settings: GRPOSettings, *,
                      plan_choices: Sequence[str] = (), reflection_cap: int | None = None,
                      difficulty: Mapping[str, str] | None = None,
                      sampler_for: Callable[[Any], contextlib.AbstractContextManager[Sampler]]
                      | None = None) -> RolloutFunc:
    """TRL's `rollout_func`: the prompts are task ids (each repeated `group_size` times by
    TRL's sampler), answered by student passes on the trainer's live model, sampled at
    `settings.temperature` with one seed per pass (the `<recommend>` list under the
    permutation mask at `settings.explore_ranking`, where set). Only `tasks` can be answered: a prompt
    naming any other task stops the run (the training prompts are train tasks only).

    With `settings.resample_flat` (dynamic sampling), a group whose passes all earned one
    reward is replaced by a group on another of `tasks` not in this batch, drawn with a
    generator seeded by (seed, step, round), up to that many rounds; every group sampled is
    still a real pass on a train task, and the replaced ones are only not trained on."""
    by_id = {task.task_id: task for task in tasks}
    config = student.model_copy(update={"temperature": settings.temperature,
                                        "max_new_tokens": settings.max_completion_length})
    open_sampler = sampler_for or live_sampler

    def rollout(prompts: list[str], trainer: Any) -> dict[str, Any]:
        unknown = sorted({p for p in prompts if p not in by_id})
        if unknown:
            raise KeyError(f"rollout prompts that are no training task: {unknown[:3]}")
        step = int(trainer.state.global_step)
        jobs = [(by_id[p], pass_seed(settings.seed, step, i)) for i, p in enumerate(prompts)]
        resampled = [0] * len(prompts)
        with open_sampler(trainer) as sampler:
            def run(batch: Sequence[tuple[Task, int]]) -> list[Rollout]:
                return run_passes(sampler, batch, store, fmt, config,
                                  concurrent=getattr(sampler, "concurrent", False),
                                  plan_choices=plan_choices, reflection_cap=reflection_cap,
                                  learn_masked=settings.learn_masked,
                                  explore_ranking=settings.explore_ranking)

            rollouts = run(jobs)
            used = set(prompts)
            for round_ in range(1, settings.resample_flat + 1):
                flat = [(a, b) for a, b in groups_of(prompts) if is_flat(rollouts[a:b])]
                pool = sorted(set(by_id) - used)
                if not flat or not pool:
                    break
                rng = np.random.default_rng([settings.seed, step, round_])
                picks = [pool[int(i)] for i in rng.permutation(len(pool))[:len(flat)]]
                redo = []
                for (a, b), task_id in zip(flat, picks):
                    used.add(task_id)
                    redo += [(by_id[task_id], pass_seed(settings.seed, step,
                                                        round_ * len(prompts) + i))
                             for i in range(a, b)]
                again = iter(run(redo))
                for (a, b), _ in zip(flat, picks):
                    for i in range(a, b):
                        rollouts[i], resampled[i] = next(again), round_
        # None where a token's was not reported: TRL reads it as NaN and leaves it uncorrected
        return rollout_batch(rollouts, getattr(sampler, "reports_logprobs", False), difficulty,
                             resampled if settings.resample_flat else None)

    return rollout


POLICY_ATTRIBUTE = "_star_policy"  # where a trainer keeps its PolicyModel between rollouts


@contextlib.contextmanager
def live_sampler(trainer: Any) -> Iterator[Sampler]:
    """The sampler of `trainer`'s current weights: its vLLM engine when it generates with
    vLLM, else its model unwrapped for generation (gathered under DeepSpeed ZeRO-3)."""
    if getattr(trainer, "use_vllm", False):
        from starrec.training.vllm_rollout import VLLMSampler

        yield VLLMSampler.for_trainer(trainer)
        return
    from trl.models import unwrap_model_for_generation

    with unwrap_model_for_generation(
            trainer.model_wrapped, trainer.accelerator,
            gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
            gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs) as model:
        policy = getattr(trainer, POLICY_ATTRIBUTE, None)
        if policy is None or policy.model is not model:
            # built once: its constraint vocabulary is scanned on first use
            policy = PolicyModel(model, trainer.processing_class)
            setattr(trainer, POLICY_ATTRIBUTE, policy)
        # the weights changed since the last rollouts: a cached prefix is of the old ones
        policy.forget_prefix()
        try:
            yield policy
        finally:
            policy.forget_prefix()
