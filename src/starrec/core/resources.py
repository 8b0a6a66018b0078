"""The files shipped in `starrec.resources`: prompts, tool schemas, evidence templates.

One loader for every layer that reads them (the CST's tool schemas and sentence
templates, the LLM's repair prompt, the teacher's and the student's prompts), so that
no package reaches into another's module only to read a file.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import yaml

# The version of the student's prompt: the student files of `resources/prompts/` as
# `starrec.trajectories.serialize` renders them. Bump when either changes: a model folder
# records the version it was trained with (`starrec.llm.card`), and inference warns on a
# mismatch.
PROMPT_VERSION = "student-v4"  # v4: the latent-model tools (sequence_model, factor_model)


@lru_cache(maxsize=None)
def resource_text(path: str) -> str:
    """A file of `starrec/resources/`, e.g. "cst/tools.yaml"."""
    return resources.files("starrec.resources").joinpath(path).read_text("utf-8")


def prompt_text(name: str) -> str:
    """A file of `resources/prompts/`, e.g. "repair.md"."""
    return resource_text(f"prompts/{name}")


@lru_cache(maxsize=1)
def scenarios() -> dict[str, str]:
    """The sentence that introduces each scenario: the teacher and the student read the
    same one, so both see the same task."""
    return yaml.safe_load(prompt_text("scenarios.yaml"))
