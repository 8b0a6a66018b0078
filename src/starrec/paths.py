"""Where STAR keeps converted models, prepared data and runs."""

from __future__ import annotations

import os
from pathlib import Path


def star_home() -> Path:
    """`$STAR_HOME`, default `~/.cache/star` (DESIGN.md section 7)."""
    return Path(os.environ.get("STAR_HOME", Path.home() / ".cache" / "star")).expanduser()


def prepared_dir(dataset: str) -> Path:
    """Default folder of a dataset's prepared task files."""
    return star_home() / "data" / dataset.replace("/", "_").replace(":", "_")
