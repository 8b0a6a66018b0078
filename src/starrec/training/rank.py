"""Training the ranking head on outcomes (`star distill rank`).

The head (`starrec.inference.rank_head.RankHead`) reads one logit per candidate label at
the answer position; training moves those same logits, so what is trained is what
inference reads. Objectives over a batch of tasks (`RankSettings.objective`):

- `listwise`: cross-entropy of the target's label over the candidates' label logits
  (a softmax over 20 labels, not over the vocabulary: only the comparison is learned);
- `pl`: a one-pass policy gradient on the ranking: G permutations are sampled from the
  scores under Plackett-Luce (Gumbel top-k), each rewarded with DESIGN.md 3.6 (format +1,
  valid by construction, plus the outcome tier of the target's rank), advantages
  relative to the group (GRPO without a generation), loss = -advantage x log-probability
  of the permutation's first `pl_positions` places (the reward depends on those only, so
  the places after them add variance and no signal: dropping them leaves the gradient's
  expectation unchanged);
- `listwise+pl`: their sum, the policy gradient weighted by `pl_weight`.

The loop is plain torch (TRL's trainers optimise token likelihoods of generated text,
which a label-logit head has none of); LoRA comes from PEFT. Batches are a function of
the step (seeded), so a resumed run sees the batches the interrupted one would have.
Checkpoints (`OUT/checkpoints/step-N/state.pt`: trainable weights, optimizer, scheduler,
curve) every `save_every` steps and at every new best of the evaluation hook (valid-200
AvgHR, every `eval_every` steps; the best is kept out of the rotation); `loss.json`
holds the train loss per step, the hook's points and the best, rewritten at every point
so a killed run leaves its curve. The finished folder is the best point's weights
(`final: best`, the default; a choice made on valid tasks) or the last step's, as a
plain transformers model (LoRA merged) with a card whose `head` records the mode,
labels and prompt settings, which `star eval --system star --model OUT` follows.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pydantic import field_validator

from starrec.config import FineTuneSettings, StarConfig
from starrec.core import Task, ranked
from starrec.cst.store import EvidenceStore
from starrec.core.files import write_text_atomic
from starrec.inference.rank_head import RankHead
from starrec.labels import candidate_labels
from starrec.llm.card import HeadSpec, ModelCard, read_model_card, write_model_card
from starrec.progress import progress, progress_bar
from starrec.training.reward import FORMAT_GOOD, compare_to_start, outcome_rewards

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "state.pt"
# DESIGN.md 3.6: a head's ranking is always a valid permutation
FORMAT_REWARD = FORMAT_GOOD


# The prompt a new head is trained on: the strongest signals first (the sequence and
# factor models' ranks, similar users, co-consumption), compact, so that a candidate's
# evidence costs about as many tokens as its title and all four fit. A card keeps the
# spec it was trained with, so changing this changes only heads trained later. Each
# candidate is scored at the end of its own line (readout `line`): a small model learns
# to judge the line it has just read, not to point at one of twenty lines from the answer
# position (docs/ranking-head.md).
RANK_HEAD = HeadSpec(readout="line", evidence_style="compact", evidence_tokens=48,
                     evidence_clauses=["sequence", "factors", "similar_users", "links",
                                       "transition", "popularity"])


class RankSettings(FineTuneSettings):
    """Settings of `star distill rank` (`--set rank.KEY=VALUE`); `base_model` may also be
    an SFT student folder."""

    lora_dropout: float = 0.0
    learning_rate: float | None = None  # None: 3e-4 with LoRA, 2e-5 for a full fine-tune
    weight_decay: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    steps: int = 300  # optimizer steps
    batch_tasks: int = 8  # tasks per optimizer step
    # tasks per forward/backward pass (gradients accumulated up to batch_tasks); None:
    # the whole batch in one pass, which needs memory for batch_tasks prompts' activations
    micro_batch: int | None = None
    objective: Literal["listwise", "pl", "listwise+pl"] = "listwise"
    pl_samples: int = 8  # permutations sampled per task (the group of GRPO)
    pl_weight: float = 1.0
    pl_positions: int | None = 5  # leading places scored by the policy gradient; None: all
    # training tasks: every train position with at least this much history
    min_history: int = 5
    max_positions_per_user: int | None = None  # None: all; else each user's latest ones
    # how a batch draws its tasks: `user` a user uniformly, then one of their positions
    # (evaluation has one task per user, so heavy users do not outweigh the rest);
    # `position` uniformly over all positions
    sample: Literal["user", "position"] = "user"
    folds: int = 5  # leave-the-users-out evidence stores (starrec.training.rank_data)
    eval_every: int = 50  # valid-200 AvgHR every N steps (and at the start and end); 0: never
    eval_tasks: int | None = 200  # valid tasks the hook scores; None: all it is given
    save_every: int = 50
    save_total_limit: int = 2  # the best checkpoint by the eval hook's AvgHR is kept besides
    # the folder's model: the checkpoint with the best eval-hook AvgHR (a choice made on
    # valid tasks) or the last step
    final: Literal["best", "last"] = "best"
    seed: int = 0
    head: HeadSpec = RANK_HEAD

    @field_validator("head", mode="before")
    @classmethod
    def _known_head_keys(cls, value: Any) -> Any:
        # HeadSpec ignores unknown keys when a card is read (older cards); a setting with a
        # misspelt key would silently train another prompt than the one intended. Keys
        # given (`--set rank.head.KEY=...`) change RANK_HEAD, not HeadSpec's defaults.
        if isinstance(value, dict):
            unknown = set(value) - set(HeadSpec.model_fields)
            if unknown:
                raise ValueError(f"unknown rank.head setting(s) {sorted(unknown)}; known: "
                                 f"{sorted(HeadSpec.model_fields)}")
            return {**RANK_HEAD.model_dump(), **value}
        return value

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 3e-4 if self.lora else 2e-5


# --- objectives --------------------------------------------------------------------------

def listwise_loss(logits: Any, targets: Any) -> Any:
    """Mean cross-entropy of each target's label over its row of label logits (B, n)."""
    import torch.nn.functional as F

    return F.cross_entropy(logits, targets)


def plackett_luce_sample(scores: Any, samples: int, generator: Any | None = None) -> Any:
    """(B, G, n) permutations drawn from Plackett-Luce with log-weights `scores` (B, n):
    sorting scores plus Gumbel noise draws a whole permutation in one step."""
    import torch

    batch, n = scores.shape
    uniform = torch.rand((batch, samples, n), generator=generator, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(uniform.clamp(1e-12, 1 - 1e-12)))
    keys = scores.detach().double().unsqueeze(1) + gumbel.to(scores.device)
    return torch.argsort(keys, dim=-1, descending=True)


def plackett_luce_log_prob(scores: Any, perms: Any, positions: int | None = None) -> Any:
    """(B, G) log-probabilities of permutations (B, G, n) under Plackett-Luce:
    sum over positions i of score[perm_i] - logsumexp(score[perm_i:]); with `positions`
    = k, of their first k places only (the probability of that top-k prefix)."""
    import torch

    ordered = torch.gather(scores.unsqueeze(1).expand(-1, perms.shape[1], -1), 2, perms)
    tails = torch.logcumsumexp(ordered.flip(-1), dim=-1).flip(-1)
    terms = ordered - tails
    return (terms[..., :positions] if positions else terms).sum(-1)


def outcome_reward(ranks: Any) -> Any:
    """DESIGN.md 3.6 for 1-based target ranks: format (+1, a head is always valid) plus
    the outcome tiers of `starrec.training.reward` (1, 2/3, 1/3, 0 for rank 1, within 3,
    within 5, elsewhere)."""
    import torch

    outcome = torch.from_numpy(outcome_rewards(ranks.detach().cpu().numpy()))
    return FORMAT_REWARD + outcome.to(ranks.device)


def target_ranks(perms: Any, targets: Any) -> Any:
    """(B, G) 1-based positions of each task's target in its sampled permutations."""
    hit = perms == targets.view(-1, 1, 1)
    return hit.float().argmax(-1) + 1


def pl_policy_loss(logits: Any, targets: Any, samples: int,
                   generator: Any | None = None, positions: int | None = None) -> tuple[Any, float]:
    """(loss, mean reward): GRPO on rankings sampled from the head's own scores; the
    advantage of a sample is its reward standardised within its task's group (zero when
    every sample got the same reward, which then teaches nothing)."""
    perms = plackett_luce_sample(logits, samples, generator)
    rewards = outcome_reward(target_ranks(perms, targets))
    std = rewards.std(dim=1, keepdim=True, unbiased=False)
    advantage = (rewards - rewards.mean(dim=1, keepdim=True)) / (std + 1e-6)
    log_prob = plackett_luce_log_prob(logits, perms.to(logits.device), positions)
    loss = -(advantage.to(log_prob.dtype).to(logits.device) * log_prob).mean()
    return loss, float(rewards.mean())


def rank_loss(logits: Any, targets: Any, settings: RankSettings,
              generator: Any | None = None) -> tuple[Any, dict[str, float]]:
    """The objective of `settings.objective` and its parts, for logging."""
    parts: dict[str, float] = {}
    total = None
    if settings.objective in ("listwise", "listwise+pl"):
        total = listwise_loss(logits, targets)
        parts["listwise"] = total.item()
    if settings.objective in ("pl", "listwise+pl"):
        policy, reward = pl_policy_loss(logits, targets, settings.pl_samples, generator,
                                        settings.pl_positions)
        parts["pl"], parts["reward"] = policy.item(), reward
        total = settings.pl_weight * policy if total is None else total + settings.pl_weight * policy
    return total, parts


# --- data and evaluation -----------------------------------------------------------------

def avg_hr(ranks: Sequence[int]) -> float:
    """AvgHR x100 (DESIGN.md 3.4) of 1-based target ranks."""
    ranks = np.asarray(ranks)
    if len(ranks) == 0:
        return float("nan")
    return float(100 * np.mean([(ranks <= k).mean() for k in (1, 3, 5)]))


@dataclass
class RankExample:
    text: str  # the prompt up to the answer position
    target: int  # the target's position among the shown candidates
    n: int


Batches = Callable[[RankHead, int], list[RankExample]]
EvalHook = Callable[[RankHead], dict[str, float]]


def task_batches(tasks: Sequence[Task], store_for: Callable[[str], EvidenceStore],
                 batch_tasks: int, seed: int = 0,
                 sample: Literal["user", "position"] = "user") -> Batches:
    """Batches as a function of the step: `batch_tasks` tasks drawn with a generator
    seeded by (seed, step), each with its candidates shuffled again by that generator, so
    a task seen twice is seen in two orders and position carries no signal. `sample`
    `user` draws distinct users uniformly and one position of each (as many users as the
    batch holds, fewer if there are fewer); `position` draws distinct tasks uniformly."""
    if not tasks:
        raise ValueError("no training tasks")
    if sample not in ("user", "position"):
        raise ValueError(f"unknown sampling {sample!r}; expected user or position")
    by_user: dict[str, list[int]] = {}
    for index, task in enumerate(tasks):
        by_user.setdefault(task.user_id, []).append(index)
    groups = list(by_user.values())

    def draw(rng: np.random.Generator) -> list[int]:
        if sample == "position":
            return [int(i) for i in rng.choice(len(tasks), size=min(batch_tasks, len(tasks)),
                                               replace=False)]
        users = rng.choice(len(groups), size=min(batch_tasks, len(groups)), replace=False)
        return [groups[int(u)][int(rng.integers(len(groups[int(u)])))] for u in users]

    def batch(head: RankHead, step: int) -> list[RankExample]:
        rng = np.random.default_rng([seed, step])
        examples = []
        for index in draw(rng):
            task = tasks[index]
            order = rng.permutation(len(task.candidates))
            shown = replace(task, candidates=[task.candidates[i] for i in order])
            examples.append(RankExample(head.prompt(shown, store_for(task.user_id)),
                                        shown.target_index, len(shown.candidates)))
        return examples

    return batch


def avghr_hook(tasks: Sequence[Task], store: EvidenceStore, limit: int | None = None,
               chunk: int = 8, show_progress: bool = True) -> EvalHook:
    """AvgHR and HR@1 (x100) of the head in the fast mode on `tasks` (valid-200), in
    their presented order, as `RankHeadSystem` ranks them. The prompts depend on the
    head's prompt settings and tokenizer, not its weights, so they are built once (the
    evidence of 200 tasks, latent models included, is not recomputed at every point of
    the curve) and scored `chunk` at a time, under a progress bar of tasks."""
    chosen = list(tasks)[:limit] if limit else list(tasks)
    built: dict[str, list[str]] = {}

    def evaluate(head: RankHead) -> dict[str, float]:
        key = head.spec.model_dump_json() + "|" + "".join(head.labels)
        if key not in built:
            built.clear()
            built[key] = [head.prompt(task, store) for task in chosen]
        texts, ranks = built[key], []
        bar = progress_bar("valid AvgHR", total=len(chosen), unit="task", enabled=show_progress)
        for start in range(0, len(chosen), chunk):
            part = chosen[start: start + chunk]
            logits = head.scores(texts[start: start + chunk], max(len(t.candidates) for t in part))
            for task, row in zip(part, logits):
                ranking = ranked(task.candidates, row[: len(task.candidates)])
                ranks.append(ranking.index(task.target) + 1)
            bar.update(len(part))
        bar.close()
        return {"AvgHR": avg_hr(ranks), "HR@1": avg_hr_at(ranks, 1), "n_tasks": len(ranks),
                "ranks": ranks}

    return evaluate


def avg_hr_at(ranks: Sequence[int], k: int) -> float:
    return float(100 * (np.asarray(ranks) <= k).mean()) if len(ranks) else float("nan")


# --- the loop -------------------------------------------------------------------------------

@dataclass
class RankResult:
    model_dir: Path
    global_step: int
    resumed_from: str | None
    train_loss: float | None
    eval_metrics: dict[str, float] | None
    seconds: float


def checkpoints(out: Path) -> list[Path]:
    folder = out / CHECKPOINTS
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()),
                  key=lambda p: int(p.name.split("-")[1]))


def rank_resume_point(out: Path, resume: bool) -> Path | None:
    """The latest checkpoint to continue from; refuses to start afresh over the
    checkpoints of an earlier run, so a forgotten `--resume` cannot overwrite it."""
    found = checkpoints(out)
    if found and not resume:
        raise FileExistsError(f"{out} holds checkpoints of an earlier run; resume it or choose "
                              "another output folder")
    return found[-1] if found else None


def _peft(model: Any, settings: RankSettings) -> Any:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha,
                        lora_dropout=settings.lora_dropout,
                        target_modules=list(settings.lora_targets), task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def _trainable(model: Any) -> dict[str, Any]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(out: Path, step: int, model: Any, optimizer: Any, scheduler: Any,
                     curve: dict[str, Any], limit: int) -> Path:
    import torch

    folder = out / CHECKPOINTS / f"step-{step}"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save({"step": step,
                "trainable": {k: v.detach().cpu() for k, v in _trainable(model).items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "curve": curve, "torch_rng": torch.get_rng_state()}, tmp / STATE_FILE)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    best = (curve.get("best") or {}).get("step")
    for old in checkpoints(out)[:-max(limit, 1)]:
        if old.name != f"step-{best}":
            shutil.rmtree(old, ignore_errors=True)
    return folder


def _load_weights(folder: Path, model: Any) -> dict:
    """The trainable weights of a checkpoint, into `model`; the checkpoint's whole state."""
    import torch

    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=False)
    params = _trainable(model)
    missing = set(params) - set(state["trainable"])
    if missing:
        raise ValueError(f"{folder}: checkpoint of another model or LoRA setting "
                         f"(missing {sorted(missing)[:3]})")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value.to(params[name].device))
    return state


def _write_curve(out: Path, curve: dict[str, Any]) -> None:
    """loss.json, and loss.png beside it: the train loss against chance (ln of the
    candidates) and the valid AvgHR against step 0 (matplotlib's Agg canvas)."""
    from matplotlib.figure import Figure

    write_text_atomic(out / "loss.json", json.dumps(curve, indent=2) + "\n")
    figure = Figure(figsize=(10, 4))
    loss_axes, hr_axes = figure.subplots(1, 2)
    train = curve["train"]
    if train:
        loss_axes.plot([p["step"] for p in train], [p["loss"] for p in train], label="train loss")
    if curve.get("n_candidates"):
        loss_axes.axhline(float(np.log(curve["n_candidates"])), linestyle="--", color="grey",
                          label=f"chance: ln {curve['n_candidates']}")
    loss_axes.set_title("train loss (per step's tasks)")
    evaluation = curve["eval"]
    if evaluation:
        hr_axes.plot([p["step"] for p in evaluation], [p["AvgHR"] for p in evaluation],
                     marker="o", label="valid AvgHR")
        hr_axes.axhline(evaluation[0]["AvgHR"], linestyle="--", color="grey",
                        label=f"step {evaluation[0]['step']}: {evaluation[0]['AvgHR']:.1f}")
        hr_axes.set_title(f"valid AvgHR ({evaluation[-1].get('n_tasks')} tasks)")
    for axes in (loss_axes, hr_axes):
        axes.set_xlabel("optimizer step")
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize="small")
    figure.tight_layout()
    tmp = out / "loss.tmp.png"
    figure.savefig(tmp, dpi=100)
    tmp.replace(out / "loss.png")


def _load_checkpoint(folder: Path, model: Any, optimizer: Any, scheduler: Any) -> dict:
    """A checkpoint's weights, optimizer, scheduler and RNG, to resume from it."""
    import torch

    state = _load_weights(folder, model)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state


def head_spec(settings: RankSettings, n_candidates: int) -> HeadSpec:
    """The card's head: the settings' prompt and the labels of `n_candidates`."""
    spec = settings.head
    labels = spec.labels or list(candidate_labels(n_candidates, spec.label_style))
    return spec.model_copy(update={"labels": labels})


def train_rank(base_model: str, batches: Batches, out: Path, settings: RankSettings, *,
               evaluate: EvalHook | None = None, resume: bool = False,
               n_candidates: int = 20, data_info: dict[str, Any] | None = None,
               show_progress: bool = True) -> RankResult:
    """Train the head of `base_model` (a spec, see `starrec.training.sft.resolve_base_model`)
    for `settings.steps` optimizer steps on `batches(head, step)`, evaluating with
    `evaluate` every `eval_every` steps, and write the model folder `out`."""
    import torch

    from starrec.training.sft import load_base, resolve_base_model

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = rank_resume_point(out, resume)
    path = resolve_base_model(base_model)
    base_card = read_model_card(path) if Path(path).is_dir() else None
    model, tokenizer = load_base(path)
    if torch.cuda.is_available():
        # load_base gives bf16 on a GPU; a full fine-tune keeps fp32 weights, whose small
        # AdamW updates bf16 would round away
        model = model.to("cuda") if settings.lora else model.float().to("cuda")
    if settings.lora:
        model = _peft(model, settings)
    spec = head_spec(settings, n_candidates)
    head = RankHead(model, tokenizer, spec, n_candidates)
    params = list(_trainable(model).values())
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = max(settings.warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0)
    curve: dict[str, Any] = {"train": [], "eval": [], "best": None}
    start = 0
    if checkpoint is not None:
        state = _load_checkpoint(checkpoint, model, optimizer, scheduler)
        start, curve = int(state["step"]), {"best": None, **state["curve"]}
        log.info("rank: resumed from %s", checkpoint)
    curve["n_candidates"] = n_candidates
    if evaluate is not None and settings.eval_every and start == 0:
        model.eval()
        curve["eval"].append({"step": 0, **evaluate(head)})
        _write_curve(out, curve)
    model.train()
    bar = progress(range(start, settings.steps), desc="rank", total=settings.steps,
                   unit="step", enabled=show_progress, initial=start)
    for step in bar:
        examples = batches(head, step)
        n = examples[0].n
        if any(e.n != n for e in examples):
            raise ValueError("a batch mixes tasks with different candidate counts")
        generator = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
        size = settings.micro_batch or len(examples)
        loss_value, parts = 0.0, {}
        for first in range(0, len(examples), size):
            chunk = examples[first: first + size]
            logits = head.label_logits([e.text for e in chunk], n)
            targets = torch.tensor([e.target for e in chunk], device=logits.device)
            loss, chunk_parts = rank_loss(logits, targets, settings, generator)
            share = len(chunk) / len(examples)  # the batch's mean, accumulated
            (loss * share).backward()
            loss_value += loss.item() * share
            for key, value in chunk_parts.items():
                parts[key] = parts.get(key, 0.0) + value * share
        if settings.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        curve["train"].append({"step": done, "loss": loss_value, **parts})
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss_value:.3f}")
        last = done == settings.steps
        new_best = evaluated = False
        if evaluate is not None and settings.eval_every and (done % settings.eval_every == 0 or last):
            model.eval()
            point = {"step": done, **evaluate(head)}
            evaluated = True
            curve["eval"].append(point)
            compare_to_start(curve["eval"])
            model.train()
            if curve["best"] is None or point["AvgHR"] > curve["best"]["AvgHR"]:
                curve["best"] = {"step": done, "AvgHR": point["AvgHR"]}
                new_best = True
        saved = (settings.save_every and done % settings.save_every == 0) or last or new_best
        if saved:
            _save_checkpoint(out, done, model, optimizer, scheduler, curve,
                             settings.save_total_limit)
        if saved or evaluated:
            _write_curve(out, curve)
    model.eval()
    best = curve.get("best")
    chosen_step = max(start, settings.steps)
    if settings.final == "best" and best and best["step"] != chosen_step:
        _load_weights(out / CHECKPOINTS / f"step-{best['step']}", model)
        chosen_step = best["step"]
        log.info("rank: the model is step %d's, the best valid AvgHR (%.1f)", best["step"],
                 best["AvgHR"])
    curve["final_step"] = chosen_step
    _write_curve(out, curve)
    merged = settings.lora and settings.merge
    final = model.merge_and_unload() if merged else model
    final.save_pretrained(out)
    tokenizer.save_pretrained(out)
    result = RankResult(
        model_dir=out, global_step=max(start, settings.steps),
        resumed_from=checkpoint.name if checkpoint else None,
        train_loss=curve["train"][-1]["loss"] if curve["train"] else None,
        eval_metrics=next(({k: v for k, v in point.items() if k not in ("step", "ranks")}
                           for point in reversed(curve["eval"]) if point["step"] == chosen_step),
                          None),
        seconds=round(time.perf_counter() - started, 1))
    card_kwargs: dict[str, Any] = {}
    if base_card is not None:  # an SFT student: its reason mode keeps its format
        card_kwargs = {"format": base_card.format, "plan_choices": base_card.plan_choices,
                       "max_reflection_tokens": base_card.max_reflection_tokens}
    write_model_card(out, ModelCard(
        stage="rank", base_model=base_model, base_model_path=path, lora=settings.lora,
        merged=merged or not settings.lora, head=spec, data=data_info or {},
        training=settings.model_dump(exclude={"head"}),
        metrics={"global_step": result.global_step, "resumed_from": result.resumed_from,
                 "train_loss": result.train_loss, "eval": result.eval_metrics,
                 "final_step": chosen_step,
                 "seconds": result.seconds},
        **card_kwargs))
    return result


def train_rank_on_dataset(dataset: Any, out: Path, cfg: StarConfig, settings: RankSettings, *,
                          valid_tasks: Sequence[Task] | None = None, resume: bool = False,
                          show_progress: bool = True) -> RankResult:
    """`star distill rank`: the train positions of `dataset` (`rank_data.position_tasks`)
    with leave-the-users-out evidence, evaluated on `valid_tasks` (valid-200) against the
    store of the valid split."""
    from starrec.cst.store import ensure_store
    from starrec.data.splits import task_interactions
    from starrec.training.rank_data import build_fold_stores, position_tasks

    rank_resume_point(out, resume)  # before anything is built
    tasks = position_tasks(dataset, seed=cfg.data.seed, min_history=settings.min_history,
                           max_per_user=settings.max_positions_per_user)
    folds = build_fold_stores(dataset, cfg.cst, settings.folds, settings.seed,
                              progress=show_progress)
    evaluate = None
    if valid_tasks:
        allowed = task_interactions(dataset, valid_tasks, "valid")
        store = EvidenceStore(ensure_store(allowed, dataset.items, cfg.cst, dataset=dataset.name,
                                           split="valid", progress=show_progress))
        evaluate = avghr_hook(valid_tasks, store, settings.eval_tasks,
                              show_progress=show_progress)
    data_info = {"dataset": dataset.name, "train_tasks": len(tasks),
                 "users": len({t.user_id for t in tasks}),
                 "fold_stores": [str(p) for p in folds.paths],
                 "valid_tasks": len(valid_tasks or [])}
    log.info("rank: %d training tasks of %d users", len(tasks), data_info["users"])
    return train_rank(settings.base_model, task_batches(tasks, folds.store_for,
                                                        settings.batch_tasks, settings.seed,
                                                        settings.sample),
                      out, settings, evaluate=evaluate, resume=resume, data_info=data_info,
                      show_progress=show_progress)
