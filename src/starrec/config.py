"""Typed configuration, loadable from YAML, with dotted command-line overrides.

`configs/default.yaml` holds the defaults a user sees; the pydantic models below are the
single source of truth for types and fallbacks, so a missing YAML key is never an error
and a misspelt one always is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(Strict):
    dataset: str = "ml-100k"
    seed: int = 0
    source: str = "auto"


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
    epochs: int = 200
    seed: int = 0


class BaselinesConfig(Strict):
    random: RandomConfig = RandomConfig()
    pop: Strict = Strict()
    itemknn: ItemKNNConfig = ItemKNNConfig()
    als: ALSConfig = ALSConfig()
    sasrec: SASRecConfig = SASRecConfig()


class CSTConfig(Strict):
    neighbours: int = 20  # precomputed neighbours per item (co-consumption, next, content)
    recent_fraction: float = 0.1  # "recent" popularity: last 10% of the data's time span
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


class EvalConfig(Strict):
    bootstrap_resamples: int = 1000
    bootstrap_seed: int = 0


class StarConfig(Strict):
    data: DataConfig = DataConfig()
    baselines: BaselinesConfig = BaselinesConfig()
    cst: CSTConfig = CSTConfig()
    eval: EvalConfig = EvalConfig()


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
