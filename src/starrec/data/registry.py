"""Datasets by name or path.

- `ml-100k` (embedded), `agentrecbench:DATA_DIR[,TASK_DIR]`;
- `recbole:PATH`: RecBole atomic files in a folder (or `FOLDER/NAME` to pick one dataset);
- a folder: RecBole atomic files when it holds `*.inter` files, else the two tables
  `interactions.*` (or `ratings.*`) and `items.*` (or `movies.*`) in CSV / Parquet / JSON
  lines;
- a name: a folder of that name (or of its alias, `amazon-games` ->
  `amazon-games-llmrank`) on the dataset search path (`dataset_search_path`), so that
  commands and configs name a shared dataset without a machine's absolute path.

Folders of tables and atomic files take a column mapping (`--columns` / `data.columns`).
"""

from __future__ import annotations

import os
from pathlib import Path

from starrec.data.errors import DataError
from starrec.data.schema import Dataset

TABLE_SUFFIXES = (".csv", ".parquet", ".jsonl", ".json")
# the table names a folder may use, first found wins (ratings/movies: MovieLens' own layout)
TABLE_STEMS = {"interactions": ("interactions", "ratings"), "items": ("items", "movies")}
# short names of datasets known to the project, resolved on the search path
DATASET_ALIASES = {"amazon-games": "amazon-games-llmrank"}
SEARCH_PATH_ENV = "STAR_DATASETS"


def _find_table(folder: Path, kind: str) -> Path:
    stems = TABLE_STEMS[kind]
    for stem in stems:
        for suffix in TABLE_SUFFIXES:
            if (folder / f"{stem}{suffix}").exists():
                return folder / f"{stem}{suffix}"
    raise DataError(f"no {kind} table: expected {' or '.join(stems)} with suffix .csv, "
                    ".parquet or .jsonl", path=folder)


def _has_tables(folder: Path) -> bool:
    return any((folder / f"{stem}{suffix}").exists()
               for stem in TABLE_STEMS["interactions"] for suffix in TABLE_SUFFIXES)


def dataset_search_path() -> list[Path]:
    """Folders where a dataset name is looked up, in order: each folder of
    `$STAR_DATASETS` (separated like PATH), `../shared/datasets` beside the repository
    checkout (the project's shared data), then `$STAR_HOME/datasets`."""
    from starrec.paths import star_home

    folders = [Path(p).expanduser() for p in os.environ.get(SEARCH_PATH_ENV, "").split(os.pathsep)
               if p.strip()]
    repository = Path(__file__).resolve().parents[3]  # src/starrec/data/registry.py
    if (repository / "pyproject.toml").exists():  # a checkout, not an installed wheel
        folders.append(repository.parent / "shared" / "datasets")
    folders.append(star_home() / "datasets")
    return folders


def resolve_dataset_name(name: str) -> Path | None:
    """The folder a dataset name stands for on the search path, or None."""
    if not name or "/" in name or os.sep in name:
        return None
    for base in dataset_search_path():
        for candidate in (DATASET_ALIASES.get(name), name):
            if candidate and (base / candidate).is_dir():
                return base / candidate
    return None


def _no_columns(spec: str, columns: dict[str, str] | None) -> None:
    if columns:
        raise DataError(f"--columns / data.columns apply to folders of tables and RecBole atomic "
                        f"files; {spec!r} has fixed columns (drop the mapping)")


def load_folder(folder: Path, columns: dict[str, str] | None = None,
                name: str | None = None) -> Dataset:
    """A dataset folder, its format detected by file names: tables, else atomic files."""
    from starrec.data.recbole import atomic_names, load_recbole

    if _has_tables(folder):
        from starrec.data.generic import load_generic

        return load_generic(_find_table(folder, "interactions"), _find_table(folder, "items"),
                            name=name or folder.name, columns=columns)
    if atomic_names(folder):
        return load_recbole(folder, columns=columns, name=name)
    raise DataError("no dataset files: expected interactions.* (or ratings.*) and items.* (or "
                    "movies.*) tables, or RecBole atomic files NAME.inter and NAME.item",
                    path=folder)


def load_dataset(spec: str, source: str = "auto", columns: dict[str, str] | None = None) -> Dataset:
    """The dataset a `--dataset` value names (see the module doc). `source` is for
    ml-100k only; `columns` maps our column names to the data's (folders and atomic
    files only: elsewhere a mapping is refused rather than ignored)."""
    if spec == "ml-100k":
        _no_columns(spec, columns)
        from starrec.data.movielens import load_movielens_100k

        return load_movielens_100k(source)
    if spec.startswith("agentrecbench:"):
        _no_columns(spec, columns)
        from starrec.data.agentrecbench import load_agentrecbench

        data_dir, _, task_dir = spec.split(":", 1)[1].partition(",")
        return load_agentrecbench(Path(data_dir), Path(task_dir) if task_dir else None)
    if spec.startswith("recbole:"):
        from starrec.data.recbole import load_recbole

        path = Path(spec.split(":", 1)[1]).expanduser()
        return load_recbole(path, columns=columns)
    folder = Path(spec).expanduser()
    if folder.is_dir():
        return load_folder(folder, columns)
    named = resolve_dataset_name(spec)
    if named is not None:
        return load_folder(named, columns, name=spec)
    searched = ", ".join(str(p) for p in dataset_search_path())
    raise DataError(
        f"unknown dataset {spec!r}: expected ml-100k, agentrecbench:DATA_DIR[,TASK_DIR], "
        "recbole:PATH, a folder with interactions and items tables or RecBole atomic files, "
        f"or a dataset name ({', '.join(DATASET_ALIASES)} or a folder name) found on the search "
        f"path: {searched} (set ${SEARCH_PATH_ENV} to add folders)"
    )


def dataset_slug(spec: str) -> str:
    """A folder-safe name for a dataset spec."""
    return spec if spec == "ml-100k" else Path(spec.split(":", 1)[-1].split(",")[0]).name
