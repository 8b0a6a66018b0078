"""Typed configuration, loadable from YAML, with dotted command-line overrides.

The pydantic models below are the single source of truth for types and defaults, so a
missing YAML key is never an error and a misspelt one always is. `configs/default.yaml`
is their dump (`star config dump`): a field's description, else the comment ending its
line, is its comment there. Rules between fields are validators on the models, so a
configuration that cannot work stops when it is loaded, whichever command or library
call loads it. Comments here say why a setting is what it is; the measurements behind
the defaults are in docs/experiment-log.md ("Measurements behind the defaults").
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from starrec.labels import LabelStyle


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(Strict):
    dataset: str = "ml-100k"
    seed: int = 0
    source: str = "auto"
    columns: dict[str, str] = Field({}, description=(
        "our column names -> the data's, for folders of tables and RecBole atomic files: "
        "{user: userId, item: movieId} or \"user=userId,item=movieId\" (the form of --columns)"))

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
    epochs: int = Field(50, description=(
        "passes over the training sequences; the baseline's were chosen on validation "
        "tasks (benchmarks/sasrec_epochs.py)"))
    seed: int = 0
    negatives: int | None = Field(None, ge=1, description=(
        "None: full softmax over the catalogue at every position; N: sampled softmax, each "
        "position's next item against N items drawn per batch (for large catalogues, "
        "where the full softmax is most of the training time)"))
    negative_sampling: Literal["uniform", "popularity"] = Field("uniform", description=(
        "how the N negatives are drawn: uniformly, or in proportion to item frequency with "
        "the log-probability correction of the sampled softmax"))

    @model_validator(mode="after")
    def _sampling_needs_negatives(self) -> SASRecConfig:
        if self.negative_sampling != "uniform" and self.negatives is None:
            raise ValueError("negative_sampling needs negatives (the full softmax draws none)")
        return self


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
    # weights of the hand-set ranker (`cst-manual`, and `cst` on a train store) over the
    # per-candidate evidence
    weight_cooccurrence: float = 1.0  # hand-set ranker: co-consumption with the history
    weight_transition: float = 0.5  # hand-set ranker: transitions from the recent items
    weight_similar_users: float = 1.0  # hand-set ranker: votes of the most similar users
    weight_popularity: float = 0.5  # hand-set ranker: popularity percentile
    weight_content: float = 0.1  # hand-set ranker: content similarity
    latent: bool = Field(True, description=(
        "latent CF models as signals (each candidate's score and rank for the user's next "
        "item), fitted at build time on exactly the store's interactions and kept in it"))
    latent_sasrec: SASRecConfig = Field(SASRecConfig(epochs=20), description=(
        "the store's sequence model; fewer epochs than the baseline's, since a store is "
        "built per split and the test store's ranker needs the valid store too"))
    latent_als: ALSConfig = Field(ALSConfig(), description="the store's latent-factor model")
    ranker: Literal["learned", "manual"] = Field("learned", description=(
        "the `cst` ranker: learned = LightGBM LambdaRank over the evidence features, "
        "fitted on the tasks of the split before the store's (test <- valid, valid <- "
        "train; a train store has none before it and uses the hand-set weights); manual = "
        "the hand-set weights (also the `cst-manual` system). Not part of the store's version"))
    ranker_trees: int = 300  # at most; early stopping on held-out fit users picks fewer
    ranker_leaves: int = 15
    ranker_learning_rate: float = 0.05
    ranker_min_data: int = 20  # rows per leaf at least
    ranker_holdout: float = 0.2  # share of the fit users that choose the number of trees
    ranker_seed: int = 0
    engine: Literal["memory", "duckdb", "spark"] = Field("memory", description=(
        "how the store is computed (not part of its version: every engine writes the same "
        "store): memory = sparse matrices in this process, fastest while the log fits in "
        "RAM; duckdb = the counts as SQL over Parquet, out of core (`pip install .[scale]`); "
        "spark = the same SQL on Spark, local or a cluster (`.[spark]` and Java; "
        "docs/scaling.md)"))
    duckdb_memory_limit: str = "4GB"  # DuckDB's memory cap; past it, it spills beside the store
    duckdb_threads: int | None = None  # DuckDB worker threads; None = all cores
    # Spark's master URL (local[*], spark://host:7077, yarn, k8s://...); None: what Spark is
    # told (spark-submit --master, $MASTER, spark-defaults.conf), else local[*]
    spark_master: str | None = None
    # Spark settings of a session the build starts, e.g. {spark.driver.memory: 8g}
    spark_conf: dict[str, str | int | float | bool] = {}


class EvalConfig(Strict):
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 0


class LLMConfig(Strict):
    """Which engine answers `ChatModel` calls and how it is reached (see
    `starrec.llm.models.load_chat_model`). The teacher (`mars.llm`) and the student
    (`student.llm`) each have one, so one can be served while the other runs in process."""

    backend: Literal["auto", "transformers", "llamacpp", "openai"] = Field("auto", description=(
        "the engine: auto (a server for a URL or with base_url, else llama.cpp where it is "
        "installed, else transformers), transformers, llamacpp or openai (any "
        "OpenAI-compatible server)"))
    model: str = Field("smollm2", description=(
        "the model when --model is not given: smollm2, a model folder, a hub id, a .gguf "
        "file or http(s)://host:port/v1; with a URL as the model, the name the server "
        "serves it under. A student is always given by --model (its folder holds its format)"))
    base_url: list[str] | None = Field(None, description=(
        "OpenAI-compatible server(s) answering the model, requests spread over them "
        "(starrec.llm.endpoints): a URL, a list, or \"url1,url2\"; `model` is then the "
        "served name"))
    served_model: str | None = Field(None, description=(
        "the name the server serves the model under, where it differs from the model's "
        "spec (`vllm serve runs/student` serves it as runs/student); None: the spec"))
    api_key_env: str = Field("OPENAI_API_KEY", description=(
        "name of the environment variable holding the server's key, never the key itself"))
    timeout_s: float = Field(120.0, description="seconds a request may take before it is retried")
    max_retries: int = Field(3, description="retries on timeouts, 429, 5xx and connection errors")
    backoff_s: float = Field(0.5, description=(
        "first retry's wait, doubled per retry; a server's Retry-After wins"))
    endpoint_cooldown_s: float = Field(10.0, description=(
        "an endpoint taken out after failures is tried again after this"))
    concurrency: int = Field(1, description=(
        "tasks in flight at once with a served model (eval, teach, pipeline); in-process "
        "engines run one task at a time"))
    guided: Literal["none", "vllm", "vllm-legacy", "llamacpp"] = Field("none", description=(
        "server-side constrained decoding: vllm (>=0.12 structured outputs), vllm-legacy "
        "(guided_* fields), llamacpp (llama.cpp server grammars) or none (answers are "
        "parsed and repaired); in-process engines mask tokens themselves"))
    threads: int | None = Field(None, description="cores of an in-process engine; None: all")
    n_ctx: int = Field(8192, description="llama.cpp context (prompt + answer), in tokens")
    gguf_dtype: Literal["f32", "f16", "q8_0"] = Field("f16", description=(
        "llama.cpp weights of a model folder, exported once next to it (model-<dtype>.gguf)"))
    chat_template: str | None = Field(None, description=(
        "a chat template for a model without one (a base model, a GGUF written without "
        "one) or to replace its own: a Jinja file, or a model folder holding one. "
        "In-process engines only: a server applies its own"))
    max_tokens: int = Field(512, description=(
        "not read: every call sets its own (mars.max_tokens, student.max_new_tokens); "
        "kept because records identities hash it"))
    temperature: float = Field(0.0, description=(
        "not read: every call sets its own (mars.temperature, student.temperature); kept "
        "because records identities hash it"))

    @field_validator("base_url", mode="before")
    @classmethod
    def _base_urls(cls, value: Any) -> Any:
        """One URL, a comma-separated string of them, or a list; empty means none."""
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, list):
            return [str(url).strip() for url in value if str(url).strip()] or None
        return value

    @field_validator("concurrency")
    @classmethod
    def _at_least_one(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1")
        return value

    @model_validator(mode="after")
    def _engine_and_server(self) -> LLMConfig:
        """Settings of a server and of an in-process engine that cannot both hold: each
        would otherwise be ignored without a word."""
        if self.backend in ("transformers", "llamacpp"):
            if self.base_url:
                raise ValueError(f"base_url is set but backend={self.backend} runs the model "
                                 "in process: use backend auto or openai, or drop base_url")
            if self.guided != "none":
                raise ValueError(f"guided={self.guided} is server-side decoding but "
                                 f"backend={self.backend} runs the model in process (it masks "
                                 "tokens itself): use guided none")
        if self.chat_template and (self.backend == "openai" or self.base_url):
            raise ValueError("chat_template applies to in-process models; a server applies "
                             "its own template (e.g. vllm serve --chat-template)")
        return self


class MarsTokens(Strict):
    """Generated tokens per call, by role: decoding is most of a teacher run's time on a
    CPU, so each cap is what its role's answer needs."""

    planner: int = 96
    analyst: int = 64  # per turn: a tool call or the findings
    reflector: int = 64
    ranker: int = 120  # room for <recommend> and a permutation of 20 labels


CandidateOrder = Literal["cst", "presented"]


class MarsConfig(Strict):
    """The multi-agent teacher (`starrec.agents.mars`): roles, caps, decoding."""

    analysts: list[Literal["user_profile", "long_term", "recent", "divergence"]] = [
        "user_profile", "long_term", "recent", "divergence"]
    max_turns: int = 4  # LLM turns per analyst run, the final answer included
    max_tool_calls: int = 1  # per analyst run; at the cap its next turn must answer
    reflection_rounds: int = 1  # times the Reflector may send analysts back; 0: no Reflector
    max_repairs: int = 2  # re-asks after an unparsable answer, per call
    constrain: bool = Field(True, description=(
        "decode plans, verdicts and tool calls as a choice among well-formed options where "
        "the backend can (small models cannot follow those formats); findings stay free text"))
    temperature: float = 0.0  # of every role's calls
    seed: int = 0  # a run's seed is seed + sample unless given
    history_items: int = 10  # most recent history items shown in every prompt
    candidate_order: CandidateOrder = Field("presented", description=(
        "the order the model is shown (and labels) the candidates in (DESIGN.md 3.7): "
        "presented = the task file's shuffled order, the protocol of headline numbers; cst "
        "= the cst ranker's order, a secondary setting judged by its lift over cst. One "
        "setting with sft.format.candidate_order: set either, the other follows"))
    labels: LabelStyle = "letters"  # candidate labels in prompts and rankings (starrec.labels)
    evidence_budget: int | None = 400  # tokens per tool response; None: the store's cst.token_budget
    max_tokens: MarsTokens = MarsTokens()
    llm: LLMConfig = Field(default_factory=LLMConfig, description=(
        "the teacher's LLM: engine, model, server"))


class StudentFormatConfig(Strict):
    """What a student's sequence holds and how its prompt shows a task. Copied into the
    model's star_model.json, so inference renders exactly what training saw."""

    plan: bool = True  # False: ablation without <plan>
    tools: bool = True  # False: ablation without CST tool calls and responses
    reflection: bool = True  # False: ablation without <reflection>
    history_items: int = 20  # most recent history titles shown in the prompt
    max_tool_calls: int = 8  # teacher calls kept per sequence (the first ones)
    keep_failed_tools: bool = False  # also keep calls a tool answered with an error
    candidate_order: CandidateOrder = Field("presented", description=(
        "the teacher's: one setting with mars.candidate_order (set either, the other "
        "follows), since the filters keep only teacher runs shown this order"))
    labels: LabelStyle = "letters"  # as mars.labels; a teacher's rankings are relabelled


class TrajectoryFilterConfig(Strict):
    top_k: int = 1  # keep runs whose ranking put the target within the first k
    per_task: Literal["first", "best", "all"] = "first"  # which samples of a task to keep
    balance: bool = False  # equal counts per (target popularity, history length) stratum
    per_stratum: int | None = None  # with balance: cap per stratum; None = smallest stratum
    seed: int = 0


# TRL config fields STAR sets itself and a `trl:` passthrough may not replace, and why:
# the checkpoint folder is where `--resume` looks; GRPO's rollouts sample at
# grpo.temperature, and TRL's log-probabilities must divide by the same temperature
TRL_RESERVED = {"output_dir": "the output folder is --out"}
TRL_RESERVED_GRPO = {**TRL_RESERVED,
                     "temperature": "grpo.temperature sets the rollouts' sampling and TRL's "
                                    "log-probabilities together"}


@lru_cache(maxsize=None)
def trl_fields(config_class: str) -> frozenset[str]:
    """The field names of TRL's config dataclass `config_class` (SFTConfig, GRPOConfig)."""
    import dataclasses

    import trl

    return frozenset(field.name for field in dataclasses.fields(getattr(trl, config_class)))


def check_trl_options(options: dict[str, Any], config_class: str,
                      reserved: dict[str, str] = TRL_RESERVED) -> dict[str, Any]:
    """`options` if every key is a field of `trl.<config_class>` that STAR does not own;
    ValueError naming the unknown keys (with the nearest field names) otherwise. TRL is
    imported only when there is something to check."""
    if not options:
        return options
    import difflib

    known = trl_fields(config_class)
    problems = []
    for key in sorted(set(options) - known):
        near = difflib.get_close_matches(key, sorted(known), n=3)
        problems.append(f"{key!r}" + (f" (did you mean {', '.join(near)}?)" if near else ""))
    if problems:
        raise ValueError(f"not fields of trl.{config_class}: {'; '.join(problems)}")
    owned = sorted(set(options) & set(reserved))
    if owned:
        raise ValueError(f"{owned} of trl.{config_class} is set by STAR: "
                         + "; ".join(reserved[key] for key in owned))
    return options


class FineTuneSettings(Strict):
    """What every fine-tune of a base model shares: the model and LoRA or full weights."""

    base_model: str = "smollm2"  # model spec, resolved like mars.llm.model (folder, hub id, ...)
    lora: bool = True  # False: full fine-tune
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_targets: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="every linear layer: a few dozen steps on a CPU must move the model, "
        "not only its attention")
    merge: bool = True  # merge LoRA into the weights: eval/serve load a plain model folder


class SFTSettings(FineTuneSettings):
    learning_rate: float | None = None  # None: 1e-3 with LoRA, 2e-5 for a full fine-tune
    epochs: float = Field(6.0, description=(
        "passes over the kept runs: few runs need several for the student to learn where "
        "each part ends (chosen on the validation loss: docs/experiment-log.md)"))
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
    gradient_checkpointing: bool = False  # GPUs only; always off on a CPU (far slower there)
    seed: int = 0
    format: StudentFormatConfig = StudentFormatConfig()
    filter: TrajectoryFilterConfig = TrajectoryFilterConfig()
    trl: dict[str, Any] = Field({}, description=(
        "any field of trl.SFTConfig, applied over what the settings above build (e.g. "
        "--set sft.trl.lr_scheduler_type=constant); unknown keys are refused"))

    @field_validator("trl")
    @classmethod
    def _trl_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_trl_options(value, "SFTConfig")

    @property
    def lr(self) -> float:
        """The learning rate used: the setting, else a default for LoRA or full. LoRA's is
        high because runs on a CPU are a few dozen steps, and at the usual 2e-4 those
        barely moved the weights (docs/architecture.md, Distillation)."""
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-3 if self.lora else 2e-5


class GRPOSettings(FineTuneSettings):
    """`star distill grpo` (DESIGN.md 3.6): GRPO of a student on train tasks with TRL's
    GRPOTrainer, each rollout a real student pass with its tool calls answered from the
    train store.

    The defaults are the CPU preset (`--preset cpu`), sized so that a 135M student moves
    within hours on 2 cores: a step is `prompts_per_step` x `group_size` passes of up to
    `max_completion_length` tokens decoded one after another. Each is chosen by a
    measurement on train tasks or valid-200, never on eval-200 (DESIGN.md 3.2; the numbers
    are in docs/experiment-log.md, "Measurements behind the defaults"): `temperature`,
    `group_size` and `resample_flat` by benchmarks/grpo_spread.py, the share of an SFT
    student's sampled groups on train prompts whose rewards spread (a group whose rewards
    all tie, TRL's frac_reward_zero_std, teaches nothing) against the seconds per pass;
    `learning_rate` by the weight change per step (benchmarks/weight_change.py) and the
    reward and valid curves (a rising reward with a falling valid AvgHR is too high);
    `steps`, `eval_steps` and `valid_tasks` by the hours a run may take. `--preset gpu`
    (configs/grpo-gpu.yaml) holds the paper's values: group 8, learning rate 1e-6, KL
    0.001, temperature 0.7, full fine-tune, vLLM generation."""

    base_model: str = "smollm2"  # the student to improve: an SFT student folder (its card gives the format)
    lora_dropout: float = 0.0  # rollouts decode without dropout; the trained pass should be the same model
    learning_rate: float | None = None  # None: 5e-5 with LoRA, 1e-6 (the paper's) for a full fine-tune
    group_size: int = 4  # completions per prompt (G): most groups of 4 spread; the paper's 8 doubles a CPU step
    prompts_per_step: int = 1  # prompts per optimizer step (and process, under accelerate): prompts_per_step x group_size passes
    micro_batch: int | None = Field(1, description=(
        "passes per forward/backward (TRL's per_device_train_batch_size); None: a group. 1 "
        "on a CPU: a group of full passes (prompt, tool responses, completion) in one "
        "forward/backward went past a 24 GiB machine's memory"))
    temperature: float = 0.7  # sampling temperature of the rollouts (the paper's; 1.0 spread less)
    beta: float = 0.001  # KL coefficient to the starting model (the paper's); 0 drops the reference pass
    max_completion_length: int = Field(768, description=(
        "the student's own tokens per rollout pass (tool responses not counted), as "
        "student.max_new_tokens at inference: equal, a rollout is an inference pass"))
    steps: int = 40  # optimizer steps
    warmup: float = 0.0  # fraction of the steps
    save_steps: int = 2  # checkpoint every N steps (resume restarts from the latest)
    save_total_limit: int = 2
    logging_steps: int = 1
    eval_steps: int = 10  # valid AvgHR every N steps, and at step 0; 0: never
    valid_tasks: int = Field(20, description=(
        "the first N tasks of valid-200 the valid curve answers (greedy passes, as `star "
        "eval`); each costs a student pass"))
    train_tasks: int | None = Field(None, description=(
        "training prompts drawn from the train split by difficulty_ratio; None: as many "
        "as the ratio allows"))
    difficulty_ratio: list[int] = Field([3, 4, 3], description=(
        "easy : medium : hard, the difficulty being the target's rank under the cst ranker"))
    difficulty_bounds: list[int] = Field([3, 10], description=(
        "easy: cst rank <= the first, medium: <= the second, hard: beyond"))
    candidate_order: CandidateOrder = Field("presented", description=(
        "the order rollouts show the candidates in (DESIGN.md 3.7): presented (the task "
        "file's shuffled order) or cst (secondary); written into the card"))
    learn_masked: bool = Field(True, description=(
        "loss on the tokens sampled under a mask too (a choice among the format's options, "
        "a repaired call or list); False: the student's free text only"))
    explore_ranking: float | None = Field(None, ge=0, description=(
        "exploration of orders: the rollouts' <recommend> list is sampled under the "
        "permutation mask at this temperature, so a group tries orders other than the "
        "shown one (a student that always copies it gives groups of one outcome); the list "
        "is then always a permutation, and the format term judges the rest of the pass. "
        "The valid curve decodes as inference does. None: the list as the pass writes it"))
    resample_flat: int = Field(0, ge=0, description=(
        "dynamic sampling (DAPO's): a group whose passes all earned one reward has no "
        "advantage and teaches nothing, so it is dropped and a group on another drawn train "
        "prompt sampled in its place, up to this many times per group (the last one is kept "
        "whatever it earned); 0: every group is trained on as sampled"))
    use_vllm: bool = False  # generate with vLLM (GPU): every pass of a step in one batched engine
    vllm_mode: Literal["colocate", "server"] = "colocate"  # colocate: vLLM in the training process
    gradient_checkpointing: bool = False  # GPUs only; always off on CPU
    seed: int = 0
    trl: dict[str, Any] = Field({}, description=(
        "any field of trl.GRPOConfig, applied over what the settings above build (e.g. "
        "--set grpo.trl.scale_rewards=false); unknown keys are refused"))

    @field_validator("trl")
    @classmethod
    def _trl_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        return check_trl_options(value, "GRPOConfig", TRL_RESERVED_GRPO)

    @field_validator("difficulty_ratio")
    @classmethod
    def _ratio(cls, value: list[int]) -> list[int]:
        if len(value) != 3 or min(value) < 0 or sum(value) == 0:
            raise ValueError("needs three non-negative weights (easy, medium, hard), not all 0")
        return value

    @field_validator("difficulty_bounds")
    @classmethod
    def _bounds(cls, value: list[int]) -> list[int]:
        if len(value) != 2 or not 1 <= value[0] < value[1]:
            raise ValueError("needs two ranks 1 <= easy < medium")
        return value

    @field_validator("group_size")
    @classmethod
    def _group(cls, value: int) -> int:
        if value < 2:
            raise ValueError("GRPO compares completions within a group: at least 2")
        return value

    @property
    def lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 5e-5 if self.lora else 1e-6

    @model_validator(mode="after")
    def _batches(self) -> GRPOSettings:
        passes = self.prompts_per_step * self.group_size
        if self.prompts_per_step < 1 or self.batch < 1 or passes % self.batch:
            raise ValueError(f"micro_batch={self.batch} must divide the {passes} passes "
                             "of a step (prompts_per_step x group_size)")
        return self

    @property
    def batch(self) -> int:
        """Passes per forward/backward: `micro_batch`, else one group."""
        return self.micro_batch if self.micro_batch is not None else self.group_size

    @property
    def grad_accum(self) -> int:
        """Micro-batches per optimizer step."""
        return self.prompts_per_step * self.group_size // self.batch


# Named sets of `grpo` values (`star distill grpo --preset NAME`), applied over the config
# file and under --set. cpu: the defaults. gpu: the paper's values (group 8, lr 1e-6, KL
# 0.001, temperature 0.7) with a full fine-tune and vLLM generation; configs/grpo-gpu.yaml
# holds the same values.
GRPO_PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {},
    "gpu": {"lora": False, "learning_rate": 1e-6, "group_size": 8, "temperature": 0.7,
            "beta": 0.001, "use_vllm": True, "prompts_per_step": 16, "micro_batch": None,
            "steps": 500, "save_steps": 25, "eval_steps": 25, "valid_tasks": 200,
            "gradient_checkpointing": True},
}


def preset_overrides(name: str) -> list[str]:
    """The `--set` overrides of GRPO preset `name`; ValueError for an unknown name."""
    if name not in GRPO_PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(GRPO_PRESETS)}")
    return [f"grpo.{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
            for key, value in GRPO_PRESETS[name].items()]


class StudentConfig(Strict):
    """Single-pass inference of a distilled student (`star eval --system star`, serve)."""

    max_tool_calls: int = 8  # later calls are answered with a "limit reached" message
    max_new_tokens: int = Field(768, description=(
        "generated tokens per task, over all continuations (a repair under way may finish "
        "past it): above what a student writes in its training data (a card's "
        "max_trained_tokens), so it only stops a pass that rambles"))
    temperature: float = 0.0
    seed: int | None = None
    evidence: bool = Field(True, description=(
        "False: ablation without CST evidence: a tool call that runs is answered with a "
        "fixed line (prompts/student_no_evidence.md) instead of its evidence, so the "
        "student keeps its calls and reads none of what they would return; errors still "
        "come back"))
    constrain: bool = Field(True, description=(
        "where the backend can, decode the format's structure under masks "
        "(inference/student.py): the plan among the card's plan_choices, the part after "
        "the plan and after each tool response among those the format allows there, a "
        "reflection paused at its end (cut at the card's max_reflection_tokens); a tool "
        "call that does not parse, fails its schema, names an unknown item or rambles is "
        "decoded again among the runnable calls, and a <recommend> list that is not a "
        "permutation again as one"))
    mode: Literal["auto", "generate", "fast", "reason"] = Field("auto", description=(
        "how the ranking is produced: generate = written as a <recommend> list; fast = "
        "read from a ranking head (label logits at the answer, or a score token at the end "
        "of each candidate's line: the card's readout) after one forward pass over a "
        "compact prompt; reason = plan, tools and reflection generated, then the ranking "
        "read from the head at the <recommend>[ position; auto = the card's head mode "
        "where the model folder has a head (`star distill rank`), else generate"))
    debias_shuffles: int = Field(1, description=(
        "fast mode: average the head's scores over this many seeded shuffles of the "
        "candidates (LLMRank's bootstrapping; the first is the shown order); 1 = none"))
    llm: LLMConfig = Field(default_factory=LLMConfig, description=(
        "the student's LLM: engine, server (the model is --model, a student folder)"))

    @field_validator("debias_shuffles")
    @classmethod
    def _shuffles(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be at least 1 (1: no debiasing)")
        return value

    @model_validator(mode="after")
    def _debias_needs_fast(self) -> StudentConfig:
        if self.debias_shuffles > 1 and self.mode in ("generate", "reason"):
            raise ValueError(
                f"debias_shuffles={self.debias_shuffles} applies to the fast mode (mode fast, "
                f"or auto on a card whose head is fast), not mode={self.mode}: a generated "
                "ranking or reasoning names the candidates by their labels in one order")
        return self


class PipelineConfig(Strict):
    """`star pipeline`, the main job. Its LLM stages take hours on a 2-core CPU at full
    scale, so their sizes are settings; `star pipeline` applies the `quick` preset
    (resources/presets/quick.yaml) unless `--preset full` is given."""

    preset: str = Field("none", description="the preset these settings came from, named in the report")
    systems: list[str] = ["random", "presented", "pop", "itemknn", "als", "sasrec", "cst"]
    llm: bool = Field(True, description="the teacher, SFT, GRPO and student stages")
    teacher_tasks: int = Field(60, description="train tasks of this many users the teacher runs for the SFT data (seeded, nested draws)")
    llm_eval_tasks: int | None = Field(50, description="first N of eval-200 for the teacher and the students; None: all")
    grpo: bool = Field(True, description="GRPO of the SFT student (the `grpo` section) and its evaluation")
    unconstrained: bool = Field(True, description="also evaluate the SFT student with "
                                "student.constrain off (row `star (sft, unconstrained)`): what "
                                "the decoding props that keep a small model in its format add")


class ConfigDeprecationWarning(FutureWarning):
    """A setting that still works but is going away (FutureWarning: shown by default, as
    warnings meant for users are). The commands print it as a `warning:` line."""


# the old top-level `llm` section, which answered for teacher and student alike: read for
# one release, then refused
LEGACY_LLM_TARGETS = ("mars", "student")


def _plain_section(value: Any) -> dict[str, Any]:
    """A section given as a dict or a model, as a dict of what was set in it."""
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_unset=True)
    return dict(value) if isinstance(value, dict) else {}


class StarConfig(Strict):
    data: DataConfig = DataConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    cst: CSTConfig = CSTConfig()
    eval: EvalConfig = EvalConfig()
    mars: MarsConfig = MarsConfig()
    sft: SFTSettings = SFTSettings()
    grpo: GRPOSettings = GRPOSettings()
    student: StudentConfig = StudentConfig()
    pipeline: PipelineConfig = PipelineConfig()

    @model_validator(mode="before")
    @classmethod
    def _legacy_llm(cls, data: Any) -> Any:
        """The top-level `llm` section of before the split, laid under `mars.llm` and
        `student.llm` (keys set there win), with a ConfigDeprecationWarning."""
        if not isinstance(data, dict) or "llm" not in data:
            return data
        import warnings

        data = dict(data)
        legacy = _plain_section(data.pop("llm"))
        if not legacy:
            return data
        keys = ", ".join(f"llm.{key}" for key in legacy)
        warnings.warn(
            f"the top-level llm section ({keys}) is deprecated and will be refused in the "
            "next release: it is applied to both mars.llm (the teacher) and student.llm (the "
            "student); write those sections instead (e.g. --set mars.llm.base_url=URL)",
            ConfigDeprecationWarning, stacklevel=2)
        for target in LEGACY_LLM_TARGETS:
            section = _plain_section(data.get(target, {}))
            section["llm"] = {**legacy, **_plain_section(section.get("llm", {}))}
            data[target] = section
        return data

    @model_validator(mode="after")
    def _one_candidate_order(self) -> StarConfig:
        """The teacher's candidate order and its student's format's are one setting: the
        SFT filters keep only teacher runs shown the format's order, so a pipeline whose
        two differ would run the teacher for hours and train on nothing. Set one and the
        other follows; two different values set explicitly are refused."""
        teacher, student = self.mars.candidate_order, self.sft.format.candidate_order
        if teacher == student:
            return self
        teacher_set = "candidate_order" in self.mars.model_fields_set
        student_set = "candidate_order" in self.sft.format.model_fields_set
        if teacher_set and student_set:
            raise ValueError(
                f"mars.candidate_order ({teacher}) and sft.format.candidate_order ({student}) "
                "must agree: the student is trained on teacher runs shown its format's order "
                "(set one of them; the other follows)")
        if teacher_set:
            fmt = self.sft.format.model_copy(update={"candidate_order": teacher})
            self.sft = self.sft.model_copy(update={"format": fmt})
        else:
            self.mars = self.mars.model_copy(update={"candidate_order": student})
        return self


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML, so 3 is an int)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


PRESETS_DIR = "presets"  # under starrec/resources: named configs (`star pipeline --preset`)


def preset_names() -> list[str]:
    """The presets shipped with the package (resources/presets/*.yaml)."""
    from importlib import resources

    folder = resources.files("starrec.resources").joinpath(PRESETS_DIR)
    return sorted(p.name.removesuffix(".yaml") for p in folder.iterdir() if p.name.endswith(".yaml"))


def preset_data(name: str) -> dict[str, Any]:
    """The settings of a shipped preset; ValueError naming the presets for an unknown one."""
    from starrec.core.resources import resource_text

    if name not in preset_names():
        raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(preset_names())}")
    return yaml.safe_load(resource_text(f"{PRESETS_DIR}/{name}.yaml")) or {}


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`base` with `over` laid on it, section by section."""
    out = dict(base)
    for key, value in over.items():
        out[key] = (_merged(out[key], value) if isinstance(value, dict)
                    and isinstance(out.get(key), dict) else value)
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                preset: str | None = None) -> StarConfig:
    """The defaults, under a shipped `preset`, under the YAML file `path`, under the
    `section.key=value` `overrides`: each later one wins."""
    data: dict[str, Any] = preset_data(preset) if preset else {}
    if path is not None:
        data = _merged(data, yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {})
    for text in overrides or []:
        keys, value = parse_override(text)
        node = data
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    return StarConfig.model_validate(data)
