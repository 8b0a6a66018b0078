"""RecBole atomic files: `NAME.inter`, `NAME.item` (and `NAME.user`), tab-separated, with a
header whose cells are `field:type` (`item_id:token`, `title:token_seq`, `timestamp:float`).

Two forms exist and both are read here:
- **plain**: `NAME.inter` with one interaction a row (user_id, item_id, optional timestamp
  and rating), possibly split into `NAME.train.inter` / `.valid.inter` / `.test.inter`
  (RecBole's benchmark files, read in that order);
- **sequence** (UniSRec / LLMRank preprocessing): rows of `user_id`, `item_id_list` (the
  history, space-separated, oldest first, often cut to its last N items) and `item_id`
  (the next item), in the split files. A user's sequence is rebuilt from all of their
  rows, so that nothing the files hold is lost and nothing is counted twice.

Many such files carry no timestamps; a user's order is then their position in the file
or sequence, used as the timestamp (0, 1, 2, ...), so ties never occur and the order is
the one the files give. Titles are HTML-unescaped: preprocessed Amazon titles still hold
`&amp;`, `&rsquo;` and `&nbsp;`, which an LLM would read literally.
"""

from __future__ import annotations

import csv
import html
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from starrec.data.errors import DataError
from starrec.data.generic import apply_columns, check_columns
from starrec.data.schema import Dataset, TableSource, build_dataset

log = logging.getLogger(__name__)

SPLIT_PARTS = ("train", "valid", "test")
# RecBole's default field names for our columns (its USER_ID_FIELD, ITEM_ID_FIELD,
# TIME_FIELD, RATING_FIELD); a mapping given by the user replaces any of them
RECBOLE_FIELDS = {"user": "user_id", "item": "item_id", "timestamp": "timestamp",
                  "rating": "rating"}
LIST_SUFFIX = "_list"  # RecBole's LIST_SUFFIX: `item_id_list` holds a history of item_id


@dataclass(frozen=True)
class AtomicFiles:
    """The atomic files of one dataset `name` in `folder`.

    `inter` is `NAME.inter` when present, else the split files present, in train, valid,
    test order (the order in which a user's rows follow each other in time).
    """

    folder: Path
    name: str
    inter: tuple[Path, ...]
    item: Path
    user: Path | None


def _dataset_name(path: Path) -> str | None:
    """NAME of an atomic interactions file (`NAME.inter`, `NAME.test.inter`), else None."""
    if path.suffix != ".inter":
        return None
    stem = path.name[: -len(".inter")]
    for part in SPLIT_PARTS:
        if stem.endswith(f".{part}"):
            return stem[: -len(part) - 1] or None
    return stem or None


def atomic_names(folder: Path) -> list[str]:
    """Dataset names of the atomic interaction files in `folder` (empty if none)."""
    if not folder.is_dir():
        return []
    return sorted({name for path in folder.iterdir() if path.is_file()
                   if (name := _dataset_name(path)) is not None})


def find_atomic_files(path: str | Path) -> AtomicFiles:
    """The atomic files of `path`: a folder holding one dataset's files, or `FOLDER/NAME`
    to choose one dataset of a folder that holds several (or a `NAME...inter` file)."""
    path = Path(path)
    if path.is_dir():
        folder, wanted = path, None
    else:
        folder, wanted = path.parent, _dataset_name(path) or path.name
    if not folder.is_dir():
        raise DataError("folder not found; expected RecBole atomic files (NAME.inter, NAME.item)",
                        path=folder)
    names = atomic_names(folder)
    if wanted is not None:
        names = [n for n in names if n == wanted]
    if not names and wanted is not None:
        raise DataError(f"no such folder, nor atomic files of a dataset {wanted!r} in {folder}",
                        path=path)
    if not names:
        raise DataError(
            "no RecBole atomic interaction file: expected NAME.inter or NAME.train.inter / "
            "NAME.valid.inter / NAME.test.inter beside NAME.item",
            path=path,
        )
    if len(names) > 1:
        raise DataError(f"atomic files of several datasets {names}; choose one with "
                        f"recbole:{folder}/NAME", path=folder)
    name = names[0]
    whole = folder / f"{name}.inter"
    inter = (whole,) if whole.exists() else tuple(
        p for part in SPLIT_PARTS if (p := folder / f"{name}.{part}.inter").exists())
    item = folder / f"{name}.item"
    if not item.exists():
        raise DataError(f"no {name}.item: expected an item file with item ids and a title field "
                        "beside the interactions", path=folder)
    user = folder / f"{name}.user"
    return AtomicFiles(folder, name, inter, item, user if user.exists() else None)


def read_atomic(path: str | Path) -> tuple[pd.DataFrame, TableSource]:
    """One atomic file as text columns named without their `:type`, and where its rows are.

    Read with quoting off: the format is plain tab-separated text, and a title such as
    `Ivan "Ironman" Stewart's` must stay as written. Empty cells are missing values;
    blank lines are dropped with the row -> line map kept exact.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path=path)
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, quoting=csv.QUOTE_NONE,
                            keep_default_na=False, na_values=[""], skip_blank_lines=False,
                            encoding="utf-8")
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    except UnicodeDecodeError as error:
        raise DataError(f"not UTF-8 text ({error.reason} at byte {error.start})",
                        path=path) from None
    except pd.errors.ParserError as error:
        raise DataError(f"not a tab-separated atomic file ({error})", path=path) from None
    names = [str(c).split(":", 1)[0].strip() for c in frame.columns]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"header names field(s) {repeated} twice", path=path, line=1)
    frame.columns = names
    filled = frame.notna().any(axis=1).to_numpy()
    frame = frame[filled].reset_index(drop=True)
    source = TableSource(str(path), lines=np.flatnonzero(filled) + 2)
    if frame.empty:
        raise source.error("the file has no data rows")
    return frame, source


def clean_text(values: pd.Series) -> pd.Series:
    """HTML entities unescaped and whitespace runs (`&nbsp;` included) made one space."""
    return values.map(lambda v: " ".join(html.unescape(v).split()) if isinstance(v, str) else v)


def _title_field(frame: pd.DataFrame, source: TableSource, mapping: dict[str, str]) -> str:
    """The item file's title field: the mapped one, else `title`, else the one field whose
    name ends in `title` (`movie_title`, `book_title` in RecBole's own datasets)."""
    if "title" in mapping:
        return mapping["title"]
    if "title" in frame.columns:
        return "title"
    named = [c for c in frame.columns if c.lower().endswith("title")]
    if len(named) == 1:
        return named[0]
    raise source.error(f"no title field among {list(frame.columns)}; name it with --columns "
                       "title=FIELD (or data.columns in the config)")


def read_items(path: Path, mapping: dict[str, str]) -> tuple[pd.DataFrame, TableSource]:
    """The `.item` file as our items table: `item`, `title`, other fields kept as text, all
    text HTML-unescaped."""
    frame, source = read_atomic(path)
    fields = {"item": mapping.get("item", RECBOLE_FIELDS["item"]),
              "title": _title_field(frame, source, mapping)}
    frame = apply_columns(frame, source, fields, used=("item", "title"), required=("item", "title"))
    for column in frame.columns:
        if column != "item":
            frame[column] = clean_text(frame[column])
    return frame, source


def _known(values: pd.Series, known: set[str], source: TableSource, column: str) -> None:
    """Stop at the first item id not in the item file, naming its line."""
    bad = ~values.str.strip().isin(known).to_numpy() & values.notna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise source.error(f"item id {values.iloc[row].strip()!r} is not in the item file "
                           f"({int(bad.sum())} such row(s))", row=row, column=column)


def _plain_interactions(frames: list[tuple[pd.DataFrame, TableSource]], mapping: dict[str, str],
                        known: set[str]) -> tuple[pd.DataFrame, TableSource]:
    """Interactions of plain-form files, concatenated in split order, with the position
    in the user's rows as the timestamp when the files carry none."""
    tables = []
    for frame, source in frames:
        # RecBole's names where the file has them; the user's mapping always (a mapped
        # field that is missing is an error, a default one is just absent)
        present = {ours: theirs for ours, theirs in RECBOLE_FIELDS.items()
                   if theirs in frame.columns}
        table = apply_columns(frame, source, {**present, **mapping},
                              used=("user", "item", "timestamp", "rating"),
                              required=("user", "item"))
        _known(table["item"], known, source, mapping.get("item", RECBOLE_FIELDS["item"]))
        tables.append(table[[c for c in ("user", "item", "timestamp", "rating") if c in table]])
    with_time = ["timestamp" in t.columns for t in tables]
    if any(with_time) and not all(with_time):
        raise DataError("some interaction files have a timestamp field and others not; expected "
                        "all or none", path=frames[0][1].path)
    table = pd.concat(tables, ignore_index=True)
    if len(frames) == 1:
        source = frames[0][1]
    else:  # rows of several files: errors name the row of the concatenation
        source = TableSource(" + ".join(s.path for _, s in frames), first_line=None)
    if "timestamp" not in table.columns:
        table["timestamp"] = table.groupby(table["user"].str.strip(), sort=False).cumcount()
    return table, source


def _ends_with(sequence: list, tail: list) -> bool:
    return len(tail) <= len(sequence) and sequence[len(sequence) - len(tail):] == tail


def _sequence_interactions(frames: list[tuple[pd.DataFrame, TableSource]],
                           mapping: dict[str, str],
                           known: set[str]) -> tuple[pd.DataFrame, TableSource]:
    """Each user's full sequence rebuilt from their rows (history + next item), in file
    order: a row either continues the sequence so far (its history ends it: the next item
    is appended) or holds a longer history that ends with it (it replaces it, as a test
    row does after a valid row whose history was cut shorter). Anything else means the
    rows are not one user's leave-one-out windows, and is refused with its line.

    With `timestamp_list` + `timestamp` fields the times travel with the items; without,
    the position in the sequence is the timestamp.
    """
    fields = {**RECBOLE_FIELDS, **mapping}
    user_f, item_f, time_f = fields["user"], fields["item"], fields["timestamp"]
    list_f = f"{item_f}{LIST_SUFFIX}"
    times_f = f"{time_f}{LIST_SUFFIX}"
    has_time = [time_f in f.columns and times_f in f.columns for f, _ in frames]
    if any(has_time) and not all(has_time):
        raise DataError(f"some sequence files have {times_f!r} and others not; expected all or "
                        "none", path=frames[0][1].path)
    if "timestamp" in mapping and not all(has_time):
        raise DataError(f"timestamp mapped to {time_f!r}, but the sequence files have no "
                        f"{time_f!r} and {times_f!r} fields", path=frames[0][1].path)
    sequences: dict[str, list] = {}
    for frame, source in frames:
        missing = [f for f in (user_f, list_f, item_f) if f not in frame.columns]
        if missing:
            raise source.error(f"missing field(s) {missing}; found {list(frame.columns)}; "
                               "expected user, history list and next item (map other names with "
                               "--columns user=NAME,item=NAME)")
        users = frame[user_f].fillna("").str.strip().tolist()
        histories = frame[list_f].fillna("").tolist()
        targets = frame[item_f].fillna("").str.strip().tolist()
        if has_time[0]:
            time_lists = frame[times_f].fillna("").tolist()
            target_times = frame[time_f].fillna("").str.strip().tolist()
        for row, (user, history_text, target) in enumerate(zip(users, histories, targets)):
            if not user:
                raise source.error("empty user id", row=row, column=user_f)
            if not target:
                raise source.error("empty item id", row=row, column=item_f)
            history = history_text.split()
            for item in (*history, target):
                if item not in known:
                    column = item_f if item == target and item not in history else list_f
                    raise source.error(f"item id {item!r} is not in the item file", row=row,
                                       column=column)
            window: list = [*history, target]
            if has_time[0]:
                times = time_lists[row].split()
                if len(times) != len(history) or not target_times[row]:
                    raise source.error(f"{len(times)} time(s) for {len(history)} history item(s) "
                                       "and the next item; expected one time per item", row=row,
                                       column=times_f)
                window = list(zip(window, [*times, target_times[row]]))
            sequence = sequences.get(user)
            if sequence is None:
                sequences[user] = window
            elif _ends_with(sequence, window[:-1]):
                sequence.append(window[-1])
            elif _ends_with(window[:-1], sequence):
                sequences[user] = window
            else:
                raise source.error(
                    f"the history of user {user!r} does not continue that user's earlier rows; "
                    "expected each row's history to end with the sequence so far (rows in time "
                    "order, train then valid then test)", row=row, column=list_f)
    lengths = [len(s) for s in sequences.values()]
    flat = [element for s in sequences.values() for element in s]
    table = pd.DataFrame({"user": np.repeat(list(sequences), lengths)})
    if has_time[0]:
        table["item"] = [item for item, _ in flat]
        table["timestamp"] = [time for _, time in flat]
    else:
        table["item"] = flat
        table["timestamp"] = np.concatenate([np.arange(n) for n in lengths]) if lengths else []
    paths = ", ".join(Path(s.path).name for _, s in frames)
    return table, TableSource(f"{frames[0][1].path} (sequences rebuilt from {paths})",
                              first_line=None)


def load_recbole(path: str | Path, columns: dict[str, str] | None = None,
                 name: str | None = None) -> Dataset:
    """A Dataset from RecBole atomic files, plain or sequence form (see the module doc).

    `path` is a folder holding one dataset's files, or `FOLDER/NAME`. `columns` maps our
    names (user, item, timestamp, rating, title) to the files' field names where they
    differ from RecBole's defaults (`user_id`, `item_id`, `timestamp`, `rating`, a title
    field); `name` defaults to the files' NAME.
    """
    files = find_atomic_files(path)
    mapping = check_columns(dict(columns or {}))
    items, items_source = read_items(files.item, mapping)
    known = set(items["item"].dropna().str.strip())
    frames = [read_atomic(p) for p in files.inter]
    list_field = f"{mapping.get('item', RECBOLE_FIELDS['item'])}{LIST_SUFFIX}"
    forms = {list_field in frame.columns for frame, _ in frames}
    if len(forms) > 1:
        raise DataError(f"some interaction files have {list_field!r} (sequence form) and others "
                        "not (plain form); expected one form", path=files.folder)
    if forms == {True}:
        if "rating" in mapping:
            raise DataError("a rating field cannot be mapped for sequence-form files (they hold "
                            "items only)", path=files.folder)
        interactions, source = _sequence_interactions(frames, mapping, known)
    else:
        interactions, source = _plain_interactions(frames, mapping, known)
    users = None
    if files.user is not None:
        user_frame, _ = read_atomic(files.user)
        user_field = mapping.get("user", RECBOLE_FIELDS["user"])
        if user_field in user_frame.columns:
            users = (user_frame.rename(columns={user_field: "user"})
                     .drop_duplicates("user").set_index("user"))
    log.info("%s: RecBole atomic files (%s form) %s", files.folder,
             "sequence" if forms == {True} else "plain", ", ".join(p.name for p in files.inter))
    return build_dataset(name or files.name, interactions, source, items, items_source,
                         users=users)
