"""Datasets by name: `ml-100k`, `agentrecbench:DATA_DIR[,TASK_DIR]`, or a folder holding
`interactions.{csv,parquet,jsonl}` and `items.{csv,parquet,jsonl}`."""

from __future__ import annotations

from pathlib import Path

from starrec.data.errors import DataError
from starrec.data.schema import Dataset

TABLE_SUFFIXES = (".csv", ".parquet", ".jsonl", ".json")


def _find_table(folder: Path, stem: str) -> Path:
    for suffix in TABLE_SUFFIXES:
        if (folder / f"{stem}{suffix}").exists():
            return folder / f"{stem}{suffix}"
    raise DataError(f"no {stem} table: expected {stem}.csv, .parquet or .jsonl", path=folder)


def load_dataset(spec: str, source: str = "auto") -> Dataset:
    if spec == "ml-100k":
        from starrec.data.movielens import load_movielens_100k

        return load_movielens_100k(source)
    if spec.startswith("agentrecbench:"):
        from starrec.data.agentrecbench import load_agentrecbench

        data_dir, _, task_dir = spec.split(":", 1)[1].partition(",")
        return load_agentrecbench(Path(data_dir), Path(task_dir) if task_dir else None)
    folder = Path(spec)
    if folder.is_dir():
        from starrec.data.generic import load_generic

        return load_generic(
            _find_table(folder, "interactions"), _find_table(folder, "items"), name=folder.name
        )
    raise DataError(
        f"unknown dataset {spec!r}: expected ml-100k, agentrecbench:DATA_DIR[,TASK_DIR], or a "
        "folder with interactions and items tables"
    )


def dataset_slug(spec: str) -> str:
    """A folder-safe name for a dataset spec."""
    return spec if spec == "ml-100k" else Path(spec.split(":", 1)[-1].split(",")[0]).name
