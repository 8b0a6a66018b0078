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


def parse_columns(text: str) -> dict[str, str]:
    """`user=userId,item=movieId` -> {"user": "userId", "item": "movieId"}.

    The form of `--columns` and of a string `data.columns`: one flag maps a foreign table
    onto ours, so nobody has to rewrite a file (and its line numbers) by hand.
    """
    mapping: dict[str, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        ours, sep, theirs = part.partition("=")
        ours, theirs = ours.strip(), theirs.strip()
        if not sep or not ours or not theirs:
            raise DataError(f"column mapping {part.strip()!r}: expected OURS=THEIRS, e.g. "
                            "user=userId,item=movieId")
        if ours in mapping:
            raise DataError(f"column mapping names {ours!r} twice")
        mapping[ours] = theirs
    check_columns(mapping)
    return mapping


def check_columns(mapping: dict[str, str]) -> dict[str, str]:
    """`mapping` itself, after refusing keys that are not our column names: a misspelt key
    would otherwise be ignored and the load fail later on a column it did not mention."""
    unknown = sorted(set(mapping) - set(OUR_COLUMNS))
    if unknown:
        raise DataError(f"unknown column name(s) {unknown} in the column mapping; expected "
                        f"some of {list(OUR_COLUMNS)} (ours=theirs)")
    return mapping


def apply_columns(
    frame: pd.DataFrame,
    source: TableSource,
    mapping: dict[str, str],
    used: tuple[str, ...],
    required: tuple[str, ...] = (),
) -> pd.DataFrame:
    """`frame` with the data's column names replaced by ours, for the names this table
    uses (`used`).

    A mapped column missing from the file is an error naming it (a mapping the user wrote
    is never silently ignored); an unmapped `required` column missing is an error that
    says how to map it. Where the file has both `user` and the mapped column, the mapped
    one is meant and the other is dropped.
    """
    chosen = {ours: theirs for ours, theirs in mapping.items() if ours in used}
    missing = [f"{theirs} (for {ours})" for ours, theirs in chosen.items()
               if theirs not in frame.columns]
    if missing:
        raise source.error(f"mapped column(s) {missing} not in the file; found "
                           f"{list(frame.columns)}")
    shadowed = [ours for ours, theirs in chosen.items() if ours != theirs and ours in frame.columns]
    frame = frame.drop(columns=shadowed).rename(
        columns={theirs: ours for ours, theirs in chosen.items()})
    absent = [name for name in required if name not in frame.columns]
    if absent:
        hint = ",".join(f"{name}=NAME" for name in absent)
        raise source.error(
            f"missing column(s) {absent}; found {list(frame.columns)}; map the file's own "
            f"names with --columns {hint} (or data.columns in the config)"
        )
    return frame


def load_generic(
    interactions_path: str | Path,
    items_path: str | Path,
    name: str | None = None,
    columns: dict[str, str] | None = None,
    **options: bool,
) -> Dataset:
    """A Dataset from an interactions table and an items table.

    `columns` maps our names (user, item, timestamp, rating, title) to the files' column
    names (`--columns` / `data.columns`), applied to both files (`item` names the id
    column in each), so a table with its own names loads as it is. `options` go to
    `build_dataset` (require_time_order, drop_unknown_items).
    """
    mapping = check_columns(dict(columns or {}))
    interactions, interactions_source = load_table(interactions_path)
    items, items_source = load_table(items_path)
    interactions = apply_columns(interactions, interactions_source, mapping,
                                 used=("user", "item", "timestamp", "rating"),
                                 required=("user", "item", "timestamp"))
    items = apply_columns(items, items_source, mapping, used=("item", "title"),
                          required=("item", "title"))
    return build_dataset(
        name or Path(interactions_path).stem,
        interactions,
        interactions_source,
        items,
        items_source,
        **options,
    )
