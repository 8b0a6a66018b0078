"""The in-memory dataset every loader produces, and the checks that make it trustworthy.

Loaders only parse their format into two tables; `build_dataset` validates them in one
place, so every format gets the same errors for the same mistakes.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from starrec.data.errors import DataError

log = logging.getLogger(__name__)

INTERACTION_COLUMNS = ("user", "item", "timestamp")
ITEM_COLUMNS = ("item", "title")


@dataclass(frozen=True)
class TableSource:
    """Where a table came from, so that errors can point at the right line.

    `first_line` is the file line of the first data row (2 for a CSV with a header, 1 for
    JSON lines); None for formats without lines (Parquet), where rows are named instead.
    `lines` maps row positions to file lines when rows were not contiguous.
    """

    path: str
    first_line: int | None = 1
    lines: np.ndarray | None = field(default=None, compare=False)

    def line(self, row: int) -> int | None:
        if self.lines is not None:
            return int(self.lines[row])
        return None if self.first_line is None else self.first_line + row

    def where(self, row: int) -> str:
        line = self.line(row)
        return f"row {row + 1}" if line is None else f"line {line}"

    def error(self, message: str, row: int | None = None, column: str | None = None) -> DataError:
        if row is not None and self.line(row) is None:
            return DataError(f"row {row + 1}: {message}", path=self.path, column=column)
        line = None if row is None else self.line(row)
        return DataError(message, path=self.path, line=line, column=column)


@dataclass
class Dataset:
    """Users' timestamped interactions with items that have text.

    `interactions` has columns user, item (strings), timestamp (seconds, numeric) and
    rating (float, NaN when absent), sorted by timestamp with ties in file order, so a
    user's rows in table order are that user's sequence. `items` is indexed by item id
    and has a `title` column plus any text fields (genres, categories, description).
    """

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    users: pd.DataFrame | None = None

    @property
    def n_users(self) -> int:
        return int(self.interactions["user"].nunique())

    @property
    def n_items(self) -> int:
        return len(self.items)

    def title(self, item: str) -> str:
        return str(self.items.at[item, "title"])

    def fingerprint(self) -> str:
        """Content hash of the interactions and item texts (changes when any data does)."""
        digest = hashlib.sha256()
        for frame in (self.interactions, self.items.reset_index()):
            digest.update(pd.util.hash_pandas_object(frame, index=False).values.tobytes())
            digest.update(",".join(map(str, frame.columns)).encode())
        return digest.hexdigest()[:16]


def _require_columns(frame: pd.DataFrame, required: tuple[str, ...], source: TableSource) -> None:
    if frame.empty:
        raise source.error("the file has no data rows")
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise source.error(
            f"missing column(s) {missing}; found {list(frame.columns)}; expected at least "
            f"{list(required)}"
        )


def _parse_ids(values: pd.Series, column: str, source: TableSource) -> pd.Series:
    as_text = values.astype("string").str.strip()
    bad = as_text.isna() | (as_text == "")
    if bad.any():
        raise source.error("empty id", row=int(np.flatnonzero(bad.to_numpy())[0]), column=column)
    # ids like 1.0 from a float column are the same id as "1"
    if pd.api.types.is_float_dtype(values):
        as_text = as_text.str.replace(r"\.0$", "", regex=True)
    return as_text.astype(object)


def parse_timestamps(values: pd.Series, source: TableSource, column: str = "timestamp") -> pd.Series:
    """Epoch seconds from numbers or date strings; a clear error on anything else.

    A column that mixes numbers and dates is refused: one of the two is almost surely a
    mistake, and guessing would silently reorder sequences.
    """
    missing = (values.isna() | (values.astype("string").str.strip() == "")).to_numpy()
    if missing.any():
        raise source.error(
            f"missing timestamp ({int(missing.sum())} such row(s)); expected every "
            "interaction to have one",
            row=int(np.flatnonzero(missing)[0]),
            column=column,
        )
    if pd.api.types.is_datetime64_any_dtype(values):
        # real datetimes (Parquet): their integer form is in the column's unit, not seconds
        numeric = pd.Series(np.nan, index=values.index)
    else:
        numeric = pd.to_numeric(values, errors="coerce")
    is_number = numeric.notna().to_numpy()
    if is_number.all():
        seconds = numeric.astype("float64")
    else:
        if is_number.any():
            row_num = int(np.flatnonzero(is_number)[0])
            row_date = int(np.flatnonzero(~is_number)[0])
            raise source.error(
                f"timestamps mix numbers ({source.where(row_num)}: {values.iloc[row_num]!r}) "
                f"and other values ({values.iloc[row_date]!r}); expected "
                "one format: epoch seconds or ISO dates",
                row=row_date,
                column=column,
            )
        parsed = pd.to_datetime(values, errors="coerce", utc=True, format="mixed")
        bad = parsed.isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise source.error(
                f"unparsable timestamp {values.iloc[row]!r}; expected epoch seconds or a "
                "date such as 2019-03-01 or 2019-03-01T12:00:00",
                row=row,
                column=column,
            )
        # pandas 3 parses to microseconds, pandas 2 to nanoseconds: divide by a Timedelta
        seconds = ((parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)).astype(
            "float64"
        )
    finite = np.isfinite(seconds.to_numpy())
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        raise source.error(f"non-finite timestamp {values.iloc[row]!r}", row=row, column=column)
    if (seconds.to_numpy() == np.floor(seconds.to_numpy())).all():
        return seconds.astype("int64")
    return seconds


def normalize_items(frame: pd.DataFrame, source: TableSource) -> pd.DataFrame:
    """Validate an items table: unique non-empty ids, a title for every item."""
    _require_columns(frame, ITEM_COLUMNS, source)
    frame = frame.reset_index(drop=True).copy()
    frame["item"] = _parse_ids(frame["item"], "item", source)
    duplicated = frame["item"].duplicated(keep="first").to_numpy()
    if duplicated.any():
        row = int(np.flatnonzero(duplicated)[0])
        item = frame["item"].iloc[row]
        first = int(np.flatnonzero((frame["item"] == item).to_numpy())[0])
        raise source.error(
            f"duplicate item id {item!r} (first defined at {source.where(first)}); "
            "expected each item once",
            row=row,
            column="item",
        )
    titles = frame["title"].astype("string").fillna("").str.strip()
    if (titles == "").any():
        n_empty = int((titles == "").sum())
        log.warning("%s: %d item(s) have no title; their id is used as title", source.path, n_empty)
        titles = titles.mask(titles == "", "item " + frame["item"].astype(str))
    frame["title"] = titles.astype(object)
    return frame.set_index("item", drop=True)


def normalize_interactions(
    frame: pd.DataFrame,
    source: TableSource,
    known_items: pd.Index | None = None,
    *,
    require_time_order: bool = False,
    drop_unknown_items: bool = False,
) -> pd.DataFrame:
    """Validate an interactions table and sort it into per-user sequences.

    - unknown item ids are an error (or, with `drop_unknown_items`, dropped with a count);
    - `require_time_order` is for logs written in time order: a timestamp that goes back
      for a user is then an error naming the line, since it means a corrupt or merged log;
    - repeated (user, item) pairs keep their earliest occurrence, with a count in the log.
    """
    _require_columns(frame, INTERACTION_COLUMNS, source)
    frame = frame.reset_index(drop=True)
    out = pd.DataFrame(
        {
            "user": _parse_ids(frame["user"], "user", source),
            "item": _parse_ids(frame["item"], "item", source),
            "timestamp": parse_timestamps(frame["timestamp"], source),
        }
    )
    if "rating" in frame.columns:
        rating = pd.to_numeric(frame["rating"], errors="coerce")
        bad = rating.isna().to_numpy() & frame["rating"].notna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise source.error(
                f"rating {frame['rating'].iloc[row]!r} is not a number", row=row, column="rating"
            )
        out["rating"] = rating.astype("float64")
    else:
        out["rating"] = np.nan

    if known_items is not None:
        unknown = ~out["item"].isin(known_items).to_numpy()
        if unknown.any():
            row = int(np.flatnonzero(unknown)[0])
            if not drop_unknown_items:
                raise source.error(
                    f"item id {out['item'].iloc[row]!r} is not in the items table "
                    f"({int(unknown.sum())} such row(s)); expected every interaction to "
                    "name a known item",
                    row=row,
                    column="item",
                )
            log.warning(
                "%s: dropped %d interaction(s) with item ids not in the items table",
                source.path,
                int(unknown.sum()),
            )
            out = out[~unknown]

    previous = out.groupby("user", sort=False)["timestamp"].shift()
    backwards = (out["timestamp"] < previous).to_numpy()
    if backwards.any():
        row = int(out.index[np.flatnonzero(backwards)[0]])
        if require_time_order:
            raise source.error(
                f"timestamp {out['timestamp'].loc[row]} of user {out['user'].loc[row]!r} is "
                "earlier than that user's previous row; expected the log in time order",
                row=row,
                column="timestamp",
            )
        log.info(
            "%s: %d user(s) have rows out of time order; sorted by timestamp (ties keep file "
            "order)",
            source.path,
            int(out.loc[backwards, "user"].nunique()),
        )

    out = out.sort_values("timestamp", kind="stable")
    repeated = out.duplicated(["user", "item"], keep="first")
    if repeated.any():
        log.warning(
            "%s: %d repeated (user, item) interaction(s) dropped; the earliest is kept",
            source.path,
            int(repeated.sum()),
        )
        out = out[~repeated]
    return out.reset_index(drop=True)


def build_dataset(
    name: str,
    interactions: pd.DataFrame,
    interactions_source: TableSource,
    items: pd.DataFrame,
    items_source: TableSource,
    users: pd.DataFrame | None = None,
    **interaction_options: bool,
) -> Dataset:
    """Validate both tables and return a Dataset; the one entry point of every loader."""
    item_table = normalize_items(items, items_source)
    table = normalize_interactions(
        interactions, interactions_source, item_table.index, **interaction_options
    )
    log.info(
        "%s: %d interactions, %d users, %d items",
        name,
        len(table),
        table["user"].nunique(),
        len(item_table),
    )
    return Dataset(name=name, interactions=table, items=item_table, users=users)
