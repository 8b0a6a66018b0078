"""Typed configuration, loadable from YAML, with dotted command-line overrides.

`configs/default.yaml` holds the defaults a user sees; the pydantic models below are the
single source of truth for types and fallbacks, so a missing YAML key is never an error
and a misspelt one always is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, field_validator

from starrec.labels import LabelStyle


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(Strict):
    dataset: str = "ml-100k"
    seed: int = 0
    source: str = "auto"
    # our column names -> the data's, for folders of tables and RecBole atomic files:
    # {user: userId, item: movieId} or "user=userId,item=movieId" (the form of --columns)
    columns: dict[str, str] = {}

    @field_validator("columns", mode="before")
    @classmethod
    def _columns(cls, value: Any) -> Any:
        """The string form parsed, and unknown keys refused here, so a misspelt mapping
        stops at the config rather than being ignored by the loader."""
        from starrec.data.generic import check_columns, parse_columns

        if isinstance(value, str):
            return parse_columns(value)
        if isinstance(value, dict):
            return check_columns(value)
        return value


class RandomConfig(Strict):
    seed: int = 0


class ItemKNNConfig(Strict):
    k: int | None = None
    shrink: float = 0.0


class ALSConfig(Strict):
    factors: int = 64
    regularization: float = 0.05
    alpha: float = 2.0
    iterations: int = 20
    seed: int = 0


class SASRecConfig(Strict):
    max_len: int = 50
    hidden: int = 64
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.2
    lr: float = 1e-3
    batch_size: int = 128
    epochs: int = 50  # chosen on validation tasks: benchmarks/sasrec_epochs.py
    seed: int = 0


class BaselinesConfig(Strict):
    random: RandomConfig = RandomConfig()
    pop: Strict = Strict()
    itemknn: ItemKNNConfig = ItemKNNConfig()
    als: ALSConfig = ALSConfig()
    sasrec: SASRecConfig = SASRecConfig()


class CSTConfig(Strict):
    neighbours: int = 20  # precomputed neighbours per item (co-consumption, next, content)
    recent_fraction: float = 0.1  # "recent" popularity: a window of this share of the data's time span, ending at each task's cutoff
    recent_items: int = 3  # a history's recent items, for sequential evidence
    similar_users: int = 50  # neighbourhood size of user-CF
    content: bool = True  # MiniLM title/genre embeddings (needed for cold items)
    token_budget: int = 1200  # verbalised evidence per prompt section, in tokens
    # weights of the non-LLM `cst` ranker over the per-candidate evidence
    weight_cooccurrence: float = 1.0
    weight_transition: float = 0.5
    weight_similar_users: float = 1.0
    weight_popularity: float = 0.5
    weight_content: float = 0.1
    # how the store is computed (not part of its version: both engines write the same
    # store): memory = sparse matrices in this process, fastest while the log fits in
    # RAM; duckdb = the counts as SQL over Parquet, out of core (`pip install .[scale]`)
    engine: Literal["memory", "duckdb"] = "memory"
    duckdb_memory_limit: str = "4GB"  # DuckDB's memory cap; past it, it spills beside the store
    duckdb_threads: int | None = None  # DuckDB worker threads; None = all cores


class EvalConfig(Strict):
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 0


class LLMConfig(Strict):
    """Which engine answers `ChatModel` calls (see `starrec.llm.models.load_chat_model`)."""

    backend: Literal["auto", "transformers", "llamacpp", "openai"] = "auto"
    model: str = "smollm2"  # smollm2 | local folder | hub id | .gguf file | http(s)://host:port/v1
    base_url: str | None = None  # OpenAI-compatible server; `model` is then the served name
    api_key_env: str = "OPENAI_API_KEY"  # name of the env var holding the key, never the key
    timeout_s: float = 120.0
    max_retries: int = 3  # on timeouts, 5xx and connection errors, with exponential backoff
    concurrency: int = 8  # parallel requests to a server
    # server-side constrained decoding: vllm (>=0.12 structured_outputs), vllm-legacy
    # (guided_*), llamacpp (llama.cpp server grammar/json_schema) or none
    guided: Literal["none", "vllm", "vllm-legacy", "llamacpp"] = "none"
    threads: int | None = None  # in-process backends; None = all cores
    n_ctx: int = 8192  # llama.cpp context (prompt + answer), in tokens
    # llama.cpp weights of a model folder, exported once next to it (model-<dtype>.gguf)
    gguf_dtype: Literal["f32", "f16", "q8_0"] = "f16"
    # a chat template for a model that has none (a base model, a GGUF written without
    # one) or to replace its own: a Jinja file, or a model folder whose
    # chat_template.jinja / tokenizer_config.json holds one. In-process backends only; a
    # server applies its own.
    chat_template: str | None = None
    max_tokens: int = 512
    temperature: float = 0.0


class MarsTokens(Strict):
    """Generated tokens per call, by role: decoding is most of a teacher run's time
    (SmolLM2-135M, llama.cpp, 2 cores: about 17 tokens/s at a 2.5k-token context)."""

    planner: int = 96
    analyst: int = 64  # per turn: a tool call or the findings
    reflector: int = 64
    ranker: int = 120  # <recommend> and a permutation of 20 indices (about 75 tokens)


CandidateOrder = Literal["cst", "presented"]


class MarsConfig(Strict):
    """The multi-agent teacher (`starrec.agents.mars`): roles, caps, decoding."""

    analysts: list[Literal["user_profile", "long_term", "recent", "divergence"]] = [
        "user_profile", "long_term", "recent", "divergence"]
    max_turns: int = 4  # LLM turns per analyst run, the final answer included
    max_tool_calls: int = 1  # per analyst run; at the cap its next turn must answer
    reflection_rounds: int = 1  # times the Reflector may send analysts back; 0: no Reflector
    max_repairs: int = 2  # re-asks after an unparsable answer, per call
    # decode plans, verdicts and tool calls as a choice among well-formed options where the
    # backend can (small models cannot follow those formats); findings stay free text
    constrain: bool = True
    temperature: float = 0.0
    seed: int = 0  # a run's seed is seed + sample unless given
    history_items: int = 10  # most recent history items shown in every prompt
    # the order in which the model is shown (and labels) the candidates (DESIGN.md 3.7):
    # "presented" = the task file's shuffled order, the protocol of headline numbers;
    # "cst" = the cst ranker's order, a secondary setting judged by its lift over cst
    candidate_order: CandidateOrder = "presented"
    labels: LabelStyle = "letters"  # candidate labels in prompts and rankings (starrec.labels)
    evidence_budget: int | None = 400  # tokens per tool response; None: the store's cst.token_budget
    max_tokens: MarsTokens = MarsTokens()


class StudentFormatConfig(Strict):
    """What a student's sequence holds and how its prompt shows a task. Copied into the
    model's star_model.json, so inference renders exactly what training saw."""

    plan: bool = True  # False: ablation without <plan>
    tools: bool = True  # False: ablation without CST tool calls and responses
    reflection: bool = True  # False: ablation without <reflection>
    history_items: int = 20  # most recent history titles shown in the prompt
    max_tool_calls: int = 8  # teacher calls kept per sequence (the first ones)
    keep_failed_tools: bool = False  # also keep calls a tool answered with an error
    candidate_order: CandidateOrder = "presented"  # as mars.candidate_order; must match the teacher's
    labels: LabelStyle = "letters"  # as mars.labels; a teacher's rankings are relabelled


class TrajectoryFilterConfig(Strict):
    top_k: int = 1  # keep runs whose ranking put the target within the first k
    per_task: Literal["first", "best", "all"] = "first"  # which samples of a task to keep
    balance: bool = False  # equal counts per (target popularity, history length) stratum
    per_stratum: int | None = None  # with balance: cap per stratum; None = smallest stratum
    seed: int = 0


class FineTuneSettings(Strict):
    """What every fine-tune of a base model shares: the model and LoRA or full weights."""

    base_model: str = "smollm2"  # model spec, resolved like llm.model (folder, hub id, ...)
    lora: bool = True  # False: full fine-tune
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # every linear layer: a few dozen steps on CPU must move the model, not only attention
    lora_targets: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                               "down_proj"]
    merge: bool = True  # merge LoRA into the weights: eval/serve load a plain model folder


class SFTSettings(FineTuneSettings):
    learning_rate: float | None = None  # None: 1e-3 with LoRA, 2e-5 for a full fine-tune
    # ML-100K's 19 kept runs: validation loss fell through epoch 6 (0.64, 0.37, 0.29, 0.20,
    # 0.17, 0.15); after 3 the student had not learned where its plan ends
    epochs: float = 6.0
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs)
    max_length: int = 4096  # longer sequences are dropped, never cut before <recommend>
    batch_size: int = 1
    grad_accum: int = 4
    warmup: float = 0.03  # fraction of the steps
    eval_fraction: float = 0.1  # tasks held out for validation when no validation file is given
    eval_steps: int = 5
    save_steps: int = 5  # checkpoint every N steps (resume restarts from the latest)
    save_total_limit: int = 2
    logging_steps: int = 1
    gradient_checkpointing: bool = False  # GPUs only; always off on CPU (13x slower there)
    seed: int = 0
    format: StudentFormatConfig = StudentFormatConfig()
    filter: TrajectoryFilterConfig = TrajectoryFilterConfig()

    @property
    def lr(self) -> float:
        """The learning rate used: the setting, else a default for LoRA or full. LoRA's is
        high because its runs here are short: 15 steps at 2e-4 moved the attention weights
        by about 0.1% of their norm (benchmarks/weight_change.py), and the student still
        wrote like its base model."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-3 if self.lora else 2e-5


class StudentConfig(Strict):
    """Single-pass inference of a distilled student (`star eval --system star`, serve)."""

    max_tool_calls: int = 8  # later calls are answered with a "limit reached" message
    # generated tokens per task, over all continuations (a repair under way may finish past
    # it): the first ML-100K SFT data held at most 594 tokens of the student's own per
    # sequence (`max_trained_tokens` of a card's data), so this bounds a pass that rambles
    max_new_tokens: int = 768
    temperature: float = 0.0
    seed: int | None = None
    # where the backend can, the format's structure is decoded under masks (see
    # inference/student.py): the plan among the card's plan_choices (the plans its teacher
    # chose among), the part after the plan and after each tool response among those the
    # format allows there, and a reflection pauses at its end (cut at the card's
    # max_reflection_tokens) so the ranking follows; a tool call that does not parse, fails
    # its schema, names an unknown item or rambles past any runnable call is decoded again
    # among the runnable calls, and a <recommend> list that is not a permutation (or none
    # at all) is decoded again as one
    constrain: bool = True
    # how the ranking is produced: generate = written as a <recommend> list; fast = read from
    # the label logits of a ranking head after one forward pass over a compact prompt;
    # reason = plan, tools and reflection generated as in `generate`, then the ranking read
    # from the same head at the <recommend>[ position; auto = the card's head mode where the
    # model folder has a head (`star distill rank`), else generate
    mode: Literal["auto", "generate", "fast", "reason"] = "auto"
    # head modes: average the label scores over this many seeded shuffles of the candidates
    # (LLMRank's bootstrapping; the first is the shown order); 1 = no debiasing
    debias_shuffles: int = 1


class PipelineConfig(Strict):
    """`star pipeline`, the main job. Its LLM stages take hours on a 2-core CPU (teacher
    about 50 s per task there), so their task counts are settings."""

    systems: list[str] = ["random", "presented", "pop", "itemknn", "als", "sasrec", "cst"]
    llm: bool = True  # the teacher, SFT and student stages
    teacher_tasks: int = 60  # train tasks the teacher runs for the SFT data (seeded draw)
    llm_eval_tasks: int | None = 50  # first N of eval-200 for teacher and student; None: all


class StarConfig(Strict):
    data: DataConfig = DataConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    cst: CSTConfig = CSTConfig()
    eval: EvalConfig = EvalConfig()
    llm: LLMConfig = LLMConfig()
    mars: MarsConfig = MarsConfig()
    sft: SFTSettings = SFTSettings()
    student: StudentConfig = StudentConfig()
    pipeline: PipelineConfig = PipelineConfig()


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML, so 3 is an int)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> StarConfig:
    data: dict[str, Any] = {}
    if path is not None:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return StarConfig.model_validate(data)
