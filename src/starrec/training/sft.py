"""Supervised fine-tuning of the student with TRL's `SFTTrainer`.

The datasets come tokenized with their loss mask (`starrec.trajectories.dataset`): TRL
sees `input_ids` and `labels` and uses the labels as they are (it builds masks only for
datasets without a `labels` column), so tool responses and the prompt stay unlearned.

LoRA on the attention projections by default, full fine-tuning on request. On a CPU,
bf16 and gradient checkpointing are forced off (TRL turns both on by default; DESIGN.md 5
measured that 13x slower). Checkpoints go to `OUT/checkpoints` every `save_steps`;
`resume` continues from the latest one, with the optimizer, scheduler and step count.
The finished folder `OUT` is a plain transformers model (LoRA merged unless asked not
to) with its tokenizer, `loss.json` / `loss.png`, and `star_model.json` written last.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

from starrec.config import SFTSettings
from starrec.llm.card import ModelCard, write_model_card

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
TRAIN_COLUMNS = ["input_ids", "labels"]


@dataclass
class SFTResult:
    model_dir: Path
    global_step: int
    resumed_from: str | None
    train_loss: float | None
    eval_loss: float | None
    seconds: float


def resolve_base_model(spec: str) -> str:
    """A folder or hub id transformers can load. `smollm2` and `.gguf` files are converted
    once into the same cached folders `starrec.llm.models.load_chat_model` uses."""
    from starrec.llm.models import (
        SMOLLM2,
        SMOLLM2_DIR,
        convert_gguf,
        gguf_cache_dir,
        is_url,
        models_dir,
        smollm2_gguf,
    )

    if is_url(spec):
        raise ValueError(f"cannot fine-tune a served model ({spec}); give a model folder or hub id")
    if spec == SMOLLM2:
        return str(convert_gguf(smollm2_gguf(), models_dir() / SMOLLM2_DIR))
    if spec.endswith(".gguf"):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        return str(convert_gguf(path, gguf_cache_dir(path)))
    return spec


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def load_base(path: str):
    """(model, tokenizer) in fp32 on CPU, bf16 on a GPU that supports it."""
    import torch
    from transformers import AutoModelForCausalLM

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    dtype = torch.bfloat16 if bf16 else torch.float32
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype), load_tokenizer(path)


def lora_config(settings: SFTSettings):
    from peft import LoraConfig

    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha,
                      lora_dropout=settings.lora_dropout,
                      target_modules=list(settings.lora_targets), task_type="CAUSAL_LM")


def trainer_args(settings: SFTSettings, out: Path, has_eval: bool, show_progress: bool):
    import torch
    from trl import SFTConfig

    gpu = torch.cuda.is_available()
    built = dict(
        output_dir=str(out / CHECKPOINTS),
        learning_rate=settings.lr,
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps if settings.max_steps is not None else -1,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        warmup_steps=settings.warmup,
        max_length=settings.max_length,
        logging_steps=settings.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=settings.eval_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=settings.save_total_limit,
        bf16=gpu and torch.cuda.is_bf16_supported(),
        activation_checkpointing=gpu and settings.gradient_checkpointing,  # transformers 5 name
        use_cpu=not gpu,
        report_to="none",
        seed=settings.seed,
        disable_tqdm=not show_progress,
    )
    # `sft.trl` (keys checked against SFTConfig when the settings were read) goes last
    return SFTConfig(**{**built, **settings.trl})


def last_checkpoint(out: Path) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    folder = out / CHECKPOINTS
    return get_last_checkpoint(str(folder)) if folder.is_dir() else None


def resume_point(out: Path, resume: bool, *, announce: bool = True) -> str | None:
    """The checkpoint to continue from. Refuses to start afresh over the checkpoints of an
    earlier run, so a forgotten `resume` cannot overwrite it. `announce=False`: a check
    made before anything is built, which the training call repeats and logs."""
    checkpoint = last_checkpoint(out)
    if checkpoint and not resume:
        raise FileExistsError(f"{out} holds checkpoints of an earlier run; resume it or choose "
                              "another output folder")
    if announce and resume and checkpoint is None:
        log.info("no checkpoint in %s: starting from the model given", out / CHECKPOINTS)
    return checkpoint


def loss_curve(log_history: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    train = [{"step": e["step"], "epoch": e.get("epoch"), "loss": e["loss"]}
             for e in log_history if "loss" in e]
    evaluation = [{"step": e["step"], "epoch": e.get("epoch"), "loss": e["eval_loss"]}
                  for e in log_history if "eval_loss" in e]
    return {"train": train, "eval": evaluation}


def write_loss_curve(curve: dict[str, list[dict[str, float]]], out: Path) -> None:
    """loss.json and loss.png (matplotlib's Agg canvas: no display, no global backend)."""
    from matplotlib.figure import Figure

    (out / "loss.json").write_text(json.dumps(curve, indent=2) + "\n", encoding="utf-8")
    figure = Figure(figsize=(6, 4))
    axes = figure.subplots()
    for name, points in curve.items():
        if points:
            axes.plot([p["step"] for p in points], [p["loss"] for p in points],
                      marker="o" if len(points) < 30 else None, label=name)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss (trained tokens)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / "loss.png", dpi=100)


def train_sft(
    base_model: str,
    train: Dataset,
    out: Path,
    settings: SFTSettings,
    *,
    eval_data: Dataset | None = None,
    resume: bool = False,
    data_info: dict[str, Any] | None = None,
    plan_choices: Sequence[str] = (),
    max_reflection_tokens: int | None = None,
    show_progress: bool = True,
) -> SFTResult:
    """Fine-tune `base_model` (a spec, see `resolve_base_model`) on `train` and write the
    student model folder `out`; `plan_choices` and `max_reflection_tokens` go to its card."""
    from trl import SFTTrainer

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = resume_point(out, resume)
    for name, data in (("training", train), ("validation", eval_data)):
        if data is not None and len(data) == 0:
            raise ValueError(f"the {name} dataset is empty")
    path = resolve_base_model(base_model)
    model, tokenizer = load_base(path)
    trainer = SFTTrainer(
        model=model,
        args=trainer_args(settings, out, eval_data is not None, show_progress),
        train_dataset=train.select_columns(TRAIN_COLUMNS),
        eval_dataset=eval_data.select_columns(TRAIN_COLUMNS) if eval_data is not None else None,
        processing_class=tokenizer,
        peft_config=lora_config(settings) if settings.lora else None,
    )
    trainer.train(resume_from_checkpoint=checkpoint)
    curve = loss_curve(trainer.state.log_history)
    result = SFTResult(
        model_dir=out,
        global_step=trainer.state.global_step,
        resumed_from=Path(checkpoint).name if checkpoint else None,
        train_loss=curve["train"][-1]["loss"] if curve["train"] else None,
        eval_loss=curve["eval"][-1]["loss"] if curve["eval"] else None,
        seconds=round(time.perf_counter() - started, 1),
    )
    # Under accelerate every process holds the full result (ZeRO-2 at most); one writes it.
    if trainer.is_world_process_zero():
        merged = settings.lora and settings.merge
        write_loss_curve(curve, out)
        (trainer.model.merge_and_unload() if merged else trainer.model).save_pretrained(out)
        tokenizer.save_pretrained(out)
        write_model_card(out, ModelCard(
            stage="sft", base_model=base_model, base_model_path=path, format=settings.format,
            lora=settings.lora, merged=merged or not settings.lora, data=data_info or {},
            plan_choices=list(plan_choices), max_reflection_tokens=max_reflection_tokens,
            training=settings.model_dump(exclude={"format", "filter"}),
            metrics={"global_step": result.global_step, "resumed_from": result.resumed_from,
                     "train_loss": result.train_loss, "eval_loss": result.eval_loss,
                     "seconds": result.seconds},
        ))
    return result
