"""Any dataset given as two tables (interactions, items) in CSV, Parquet or JSON lines.

The readers only turn a file into a table plus a `TableSource` that maps rows back to file
lines; all checking happens in `build_dataset`, as for every other format.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from starrec.data.errors import DataError
from starrec.data.schema import Dataset, TableSource, build_dataset

CSV_SUFFIXES = (".csv",)
PARQUET_SUFFIXES = (".parquet", ".pq")
JSON_LINES_SUFFIXES = (".jsonl", ".json")
OUR_COLUMNS = ("user", "item", "timestamp", "rating", "title")


def read_json_lines(path: str | Path) -> tuple[list[dict], np.ndarray]:
    """Objects of a JSON lines file and the file line of each (blank lines are skipped).

    Parsed line by line rather than with `pd.read_json`, so that a broken line is named
    and values keep their JSON types (no date or dtype guessing).
    """
    records: list[dict] = []
    lines: list[int] = []
    with open(path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"not valid JSON ({error.msg}); expected one JSON object a line",
                    path=path,
                    line=number,
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"a JSON {type(record).__name__}, expected one JSON object a line",
                    path=path,
                    line=number,
                )
            records.append(record)
            lines.append(number)
    return records, np.asarray(lines, dtype=np.int64)


def load_table(path: str | Path) -> tuple[pd.DataFrame, TableSource]:
    """Read one table by its suffix; the TableSource lets errors name the file line."""
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path=path)
    suffix = path.suffix.lower()
    if suffix in CSV_SUFFIXES:
        try:
            # every cell as text (ids like 007 stay ids); only empty cells are missing, and
            # blank lines are kept as rows, then dropped, so row -> line stays exact
            frame = pd.read_csv(
                path, dtype=str, keep_default_na=False, na_values=[""], skip_blank_lines=False
            )
        except pd.errors.EmptyDataError:
            frame = pd.DataFrame()
        filled = frame.notna().any(axis=1).to_numpy()
        frame = frame[filled].reset_index(drop=True)
        source = TableSource(str(path), lines=np.flatnonzero(filled) + 2)
    elif suffix in PARQUET_SUFFIXES:
        frame = pd.read_parquet(path)
        source = TableSource(str(path), first_line=None)
    elif suffix in JSON_LINES_SUFFIXES:
        records, lines = read_json_lines(path)
        frame = pd.DataFrame.from_records(records)
        source = TableSource(str(path), lines=lines)
    else:
        raise DataError(
            f"unknown file type {suffix!r}; expected one of "
            f"{list(CSV_SUFFIXES + PARQUET_SUFFIXES + JSON_LINES_SUFFIXES)}",
            path=path,
        )
    if frame.empty:
        raise source.error("the file has no data rows")
    return frame, source


def load_generic(
    interactions_path: str | Path,
    items_path: str | Path,
    name: str | None = None,
    columns: dict[str, str] | None = None,
    **options: bool,
) -> Dataset:
    """A Dataset from an interactions table and an items table.

    `columns` maps our names (user, item, timestamp, rating, title) to the files' column
    names, applied to both files (`item` names the id column in each). `options` go to
    `build_dataset` (require_time_order, drop_unknown_items).
    """
    columns = columns or {}
    unknown = sorted(set(columns) - set(OUR_COLUMNS))
    if unknown:
        raise ValueError(f"unknown column name(s) {unknown}; expected some of {list(OUR_COLUMNS)}")
    renames = {theirs: ours for ours, theirs in columns.items()}
    interactions, interactions_source = load_table(interactions_path)
    items, items_source = load_table(items_path)
    return build_dataset(
        name or Path(interactions_path).stem,
        interactions.rename(columns=renames),
        interactions_source,
        items.rename(columns=renames),
        items_source,
        **options,
    )
