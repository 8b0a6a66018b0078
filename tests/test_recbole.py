"""RecBole atomic files (sequence and plain form), dataset names and column mapping, on
small files written here in exactly the atomic format (DESIGN.md 3.1)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from starrec.cli.main import app
from starrec.data.errors import DataError
from starrec.data.generic import parse_columns
from starrec.data.recbole import find_atomic_files, load_recbole
from starrec.data.registry import dataset_search_path, load_dataset, resolve_dataset_name
from starrec.data.splits import SPLITS
from starrec.data.tasks import build_split_tasks, prepare, target_time_ties

runner = CliRunner()
SHARED_GAMES = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "amazon-games-llmrank"

ITEM_FILE = (
    "item_id:token\ttitle:token_seq\n"
    "0\tFire Emblem\n"
    "1\tPhantasy Star Online, Episode I &amp; II\n"
    "2\tMarvel&rsquo;s Spider-Man - PlayStation 4\n"
    '3\tIvan "Ironman" Stewart\'s Super Off Road\n'
    "4\tLEGO&nbsp;Batman&nbsp;2\n"
    "5\tMario Party 8\n"
    "6\tEvery Extend Extra\n"
    "7\tZelda\n"
) + "".join(f"{i}\tGame {i}\n" for i in range(10, 34))
# three more users over the filler items, so that every user of the tests has 19 unseen
# items to draw negatives from
FILLER = tuple((f"f{k}", " ".join(str(i) for i in range(10 + 8 * k, 17 + 8 * k)), str(17 + 8 * k))
               for k in range(3))
SEQ_HEADER = "user_id:token\titem_id_list:token_seq\titem_id:token\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def rows(*records: tuple[str, str, str]) -> str:
    return SEQ_HEADER + "".join("\t".join(r) + "\n" for r in records)


@pytest.fixture
def llmrank(tmp_path: Path) -> Path:
    """The LLMRank layout: item, valid and test files, no train file; user 0's test history
    is the full sequence minus its last item, the valid row is one step earlier."""
    folder = tmp_path / "games"
    write(folder / "Games.item", ITEM_FILE)
    filler_valid = [(u, " ".join(h.split()[:-1]), h.split()[-1]) for u, h, _ in FILLER]
    write(folder / "Games.valid.inter", rows(("0", "0 1 2", "3"), ("1", "5 6 7", "4"),
                                             *filler_valid))
    write(folder / "Games.test.inter", rows(("0", "0 1 2 3", "4"), ("1", "5 6 7 4", "0"),
                                            *FILLER))
    return folder


def sequences(dataset) -> dict[str, list[str]]:
    return dataset.interactions.groupby("user", sort=False)["item"].agg(list).to_dict()


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# --- sequence form ----------------------------------------------------------------------


def test_sequence_form_rebuilds_full_sequences(llmrank: Path) -> None:
    data = load_recbole(llmrank)
    assert data.name == "Games"
    rebuilt = sequences(data)
    assert rebuilt["0"] == ["0", "1", "2", "3", "4"] and rebuilt["1"] == ["5", "6", "7", "4", "0"]
    assert rebuilt["f2"] == [str(i) for i in range(26, 34)]
    # no timestamps: the position in the sequence is the time, so no two targets tie
    user0 = data.interactions[data.interactions["user"] == "0"]
    assert user0["timestamp"].tolist() == [0, 1, 2, 3, 4]
    assert data.interactions["rating"].isna().all()


def test_titles_are_html_unescaped_and_quotes_kept(llmrank: Path) -> None:
    data = load_recbole(llmrank)
    assert data.title("1") == "Phantasy Star Online, Episode I & II"
    assert data.title("2") == "Marvel\u2019s Spider-Man - PlayStation 4"
    assert data.title("3") == 'Ivan "Ironman" Stewart\'s Super Off Road'
    assert data.title("4") == "LEGO Batman 2"


def test_leave_one_out_matches_the_files_split(llmrank: Path) -> None:
    data = load_recbole(llmrank)
    tasks = {split: {t.user_id: t for t in build_split_tasks(data, split, seed=0)}
             for split in SPLITS}
    assert tasks["test"]["0"].target == "4" and tasks["test"]["0"].history == ["0", "1", "2", "3"]
    assert tasks["valid"]["0"].target == "3"
    assert tasks["valid"]["1"].target == "4" and tasks["test"]["1"].target == "0"
    assert target_time_ties(data, tasks["test"].values()) == 0.0


def test_windows_cut_short_are_joined_in_train_valid_test_order(tmp_path: Path) -> None:
    """RecBole's own sequential files: one row per target, histories cut to 2 items; the
    full sequence comes back only by joining every row."""
    folder = tmp_path / "cut"
    write(folder / "shop.item", ITEM_FILE)
    write(folder / "shop.train.inter", rows(("a", "0", "1"), ("b", "7", "6"), ("a", "0 1", "2"),
                                            ("a", "1 2", "3")))
    write(folder / "shop.valid.inter", rows(("a", "2 3", "4"), ("b", "7 6", "5")))
    write(folder / "shop.test.inter", rows(("a", "3 4", "5"), ("b", "6 5", "4")))
    assert sequences(load_recbole(folder)) == {"a": ["0", "1", "2", "3", "4", "5"],
                                               "b": ["7", "6", "5", "4"]}


def test_sequence_times_travel_with_items(tmp_path: Path) -> None:
    folder = tmp_path / "timed"
    write(folder / "t.item", ITEM_FILE)
    write(folder / "t.test.inter",
          "user_id:token\titem_id_list:token_seq\ttimestamp_list:float_seq\titem_id:token\t"
          "timestamp:float\nu\t2 1\t100 200\t0\t300\nv\t3 4\t50 50\t5\t60\n")
    data = load_recbole(folder)
    assert sequences(data) == {"v": ["3", "4", "5"], "u": ["2", "1", "0"]}
    assert data.interactions["timestamp"].tolist() == [50, 50, 60, 100, 200, 300]


def test_a_row_that_breaks_the_sequence_names_its_line(tmp_path: Path) -> None:
    folder = tmp_path / "broken"
    write(folder / "x.item", ITEM_FILE)
    write(folder / "x.valid.inter", rows(("0", "0 1", "2")))
    write(folder / "x.test.inter", rows(("1", "5", "6"), ("0", "0 7", "3")))
    with pytest.raises(DataError, match=r"x\.test\.inter: line 3: column 'item_id_list': the "
                       "history of user '0' does not continue"):
        load_recbole(folder)


def test_unknown_item_in_a_history_names_its_line(tmp_path: Path) -> None:
    folder = tmp_path / "unknown"
    write(folder / "x.item", ITEM_FILE)
    write(folder / "x.test.inter", rows(("0", "0 1", "2"), ("1", "5 99", "6")))
    with pytest.raises(DataError, match=r"x\.test\.inter: line 3: column 'item_id_list': item "
                       "id '99' is not in the item file"):
        load_recbole(folder)


# --- plain form -------------------------------------------------------------------------


def test_plain_form_sorts_by_timestamp_and_finds_a_movie_title(tmp_path: Path) -> None:
    folder = tmp_path / "ml"
    write(folder / "ml.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
          "1\t2\t4\t300\n1\t1\t5\t100\n2\t3\t3\t50\n1\t3\t2\t200\n")
    write(folder / "ml.item", "item_id:token\tmovie_title:token_seq\trelease_year:token\n"
          "1\tToy Story\t1995\n2\tHeat &amp; Dust\t1983\n3\tCasino\t1995\n")
    write(folder / "ml.user", "user_id:token\tage:token\n1\t24\n2\t53\n")
    data = load_recbole(folder)
    assert sequences(data) == {"2": ["3"], "1": ["1", "3", "2"]}
    assert data.interactions["rating"].tolist() == [3.0, 5.0, 2.0, 4.0]
    assert data.title("2") == "Heat & Dust" and data.items.at["3", "release_year"] == "1995"
    assert data.users is not None and data.users.at["2", "age"] == "53"


def test_plain_form_without_time_keeps_each_users_file_order(tmp_path: Path) -> None:
    folder = tmp_path / "notime"
    write(folder / "n.item", ITEM_FILE)
    write(folder / "n.inter", "user_id:token\titem_id:token\nb\t7\na\t3\nb\t1\na\t0\nb\t2\n")
    data = load_recbole(folder)
    assert sequences(data) == {"b": ["7", "1", "2"], "a": ["3", "0"]}
    assert sorted(data.interactions["timestamp"].unique().tolist()) == [0, 1, 2]


def test_plain_split_files_are_read_in_split_order(tmp_path: Path) -> None:
    folder = tmp_path / "bench"
    write(folder / "b.item", ITEM_FILE)
    header = "user_id:token\titem_id:token\n"
    write(folder / "b.test.inter", header + "u\t3\n")
    write(folder / "b.train.inter", header + "u\t0\nu\t1\n")
    write(folder / "b.valid.inter", header + "u\t2\n")
    assert sequences(load_recbole(folder)) == {"u": ["0", "1", "2", "3"]}


def test_plain_unknown_item_names_its_line(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    write(folder / "b.item", ITEM_FILE)
    write(folder / "b.inter", "user_id:token\titem_id:token\nu\t1\nu\t42\n")
    with pytest.raises(DataError, match=r"b\.inter: line 3: column 'item_id': item id '42'"):
        load_recbole(folder)


# --- files, names and mapping -------------------------------------------------------------


def test_missing_files_and_fields_are_named(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    write(folder / "f.test.inter", rows(("0", "1", "2")))
    with pytest.raises(DataError, match=r"no f\.item"):
        load_recbole(folder)
    write(folder / "f.item", "item_id:token\tname:token_seq\n1\tA\n2\tB\n")
    with pytest.raises(DataError, match=r"f\.item: no title field among \['item_id', 'name'\]; "
                       "name it with --columns title=FIELD"):
        load_recbole(folder)
    assert load_recbole(folder, columns={"title": "name"}).title("2") == "B"
    write(folder / "f.test.inter", "uid:token\titem_id_list:token_seq\titem_id:token\n0\t1\t2\n")
    with pytest.raises(DataError, match=r"missing field\(s\) \['user_id'\]"):
        load_recbole(folder, columns={"title": "name"})
    with pytest.raises(DataError, match="no RecBole atomic interaction file"):
        load_recbole(tmp_path)


def test_several_datasets_in_one_folder_are_chosen_by_name(tmp_path: Path) -> None:
    for name in ("a", "b"):
        write(tmp_path / f"{name}.item", ITEM_FILE)
        write(tmp_path / f"{name}.test.inter", rows(("0", "1 2", "3" if name == "a" else "4")))
    with pytest.raises(DataError, match=r"several datasets \['a', 'b'\]"):
        find_atomic_files(tmp_path)
    assert sequences(load_dataset(f"recbole:{tmp_path / 'b'}")) == {"0": ["1", "2", "4"]}


def test_mapped_field_names_reach_the_history_list(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    write(folder / "m.item", "iid:token\tname:token_seq\n1\tA\n2\tB\n3\tC\n")
    write(folder / "m.test.inter", "uid:token\tiid_list:token_seq\tiid:token\nx\t1 2\t3\n")
    data = load_recbole(folder, columns={"user": "uid", "item": "iid", "title": "name"})
    assert sequences(data) == {"x": ["1", "2", "3"]} and data.title("3") == "C"


def test_parse_columns() -> None:
    assert parse_columns("user=userId, item=movieId,") == {"user": "userId", "item": "movieId"}
    for text, message in (("user", "expected OURS=THEIRS"), ("user=a,user=b", "twice"),
                          ("usr=userId", r"unknown column name\(s\) \['usr'\]")):
        with pytest.raises(DataError, match=message):
            parse_columns(text)


def test_folders_are_detected_and_names_resolved(llmrank: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    by_folder = load_dataset(str(llmrank))
    assert by_folder.name == "Games" and len(by_folder.interactions) == 34
    assert load_dataset(f"recbole:{llmrank}").fingerprint() == by_folder.fingerprint()
    shelf = tmp_path / "shelf"
    (shelf / "amazon-games-llmrank").mkdir(parents=True)
    for path in llmrank.iterdir():
        (shelf / "amazon-games-llmrank" / path.name).write_bytes(path.read_bytes())
    monkeypatch.setenv("STAR_DATASETS", str(shelf))
    assert dataset_search_path()[0] == shelf
    assert resolve_dataset_name("amazon-games") == shelf / "amazon-games-llmrank"
    named = load_dataset("amazon-games")
    assert named.name == "amazon-games" and named.fingerprint() == by_folder.fingerprint()
    assert resolve_dataset_name("no-such-data") is None
    with pytest.raises(DataError, match="unknown dataset 'no-such-data'.*STAR_DATASETS"):
        load_dataset("no-such-data")
    with pytest.raises(DataError, match="has fixed columns"):
        load_dataset("ml-100k", columns={"user": "userId"})


# --- column mapping of the generic loader ---------------------------------------------------


@pytest.fixture
def movielens_latest(tmp_path: Path) -> Path:
    """A folder laid out as MovieLens' own CSVs: ratings.csv and movies.csv."""
    folder = tmp_path / "ml-latest"
    write(folder / "ratings.csv", "userId,movieId,rating,timestamp\n"
          + "".join(f"{u},{10 * (5 * u + k - 4)},4.0,{1000 + 10 * (5 - k)}\n"
                    for u in range(1, 7) for k in range(5)))
    write(folder / "movies.csv", "movieId,title,genres\n"
          + "".join(f"{10 * m},Movie {10 * m} (1995),Drama\n" for m in range(1, 32)))
    return folder


def test_columns_map_a_table_with_its_own_names(movielens_latest: Path) -> None:
    with pytest.raises(DataError, match=r"ratings\.csv: missing column\(s\) \['user', 'item'\].*"
                       "--columns user=NAME,item=NAME"):
        load_dataset(str(movielens_latest))
    data = load_dataset(str(movielens_latest), columns=parse_columns(
        "user=userId,item=movieId,timestamp=timestamp,title=title"))
    assert data.n_users == 6 and data.title("10") == "Movie 10 (1995)"
    assert sequences(data)["1"] == ["50", "40", "30", "20", "10"]  # by time, not file order
    with pytest.raises(DataError, match=r"ratings\.csv: mapped column\(s\) \['uid \(for user\)'\] "
                       "not in the file"):
        load_dataset(str(movielens_latest), columns={"user": "uid", "item": "movieId"})


def test_cli_prepare_takes_columns_and_recbole(movielens_latest: Path, llmrank: Path,
                                               tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAR_HOME", str(tmp_path / "home"))
    out = tmp_path / "tasks"
    done = runner.invoke(app, ["data", "prepare", "--dataset", str(movielens_latest), "--columns",
                               "user=userId,item=movieId", "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert json.loads((out / "manifest.json").read_text())["n_users"] == 6
    # the same through the config, or --columns on any command that takes --dataset
    for how in (["--set", "data.columns=user=userId,item=movieId"],
                ["--columns", "user=userId,item=movieId"]):
        scored = runner.invoke(app, ["eval", "--system", "pop", "--dataset", str(movielens_latest),
                                     *how, "--out", str(tmp_path / "pop.json")])
        assert scored.exit_code == 0, scored.output
        assert json.loads((tmp_path / "pop.json").read_text())["n_tasks"] == 6
    unmapped = runner.invoke(app, ["eval", "--system", "pop", "--dataset", str(movielens_latest),
                                   "--out", str(tmp_path / "pop.json")])
    assert unmapped.exit_code == 2
    done = runner.invoke(app, ["data", "prepare", "--dataset", f"recbole:{llmrank}", "--out",
                               str(tmp_path / "games")])
    assert done.exit_code == 0, done.output
    manifest = json.loads((tmp_path / "games" / "manifest.json").read_text())
    assert manifest["n_interactions"] == 34 and manifest["files"]["test.jsonl"]["count"] == 5
    assert set(manifest["target_time_ties"].values()) == {0.0}


def test_cli_bad_mapping_is_one_error_line(movielens_latest: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAR_HOME", str(tmp_path / "home"))
    base = ["data", "prepare", "--dataset", str(movielens_latest), "--out", str(tmp_path / "o")]
    line = one_error_line(runner.invoke(app, [*base, "--columns", "usr=userId"]))
    assert "unknown column name(s) ['usr']" in line
    line = one_error_line(runner.invoke(app, [*base, "--columns", "user=uid,item=movieId"]))
    assert "mapped column(s) ['uid (for user)'] not in the file" in line
    line = one_error_line(runner.invoke(app, [*base, "--set", "data.columns=user"]))
    assert "data.columns" in line and "OURS=THEIRS" in line
    line = one_error_line(runner.invoke(app, ["data", "prepare", "--dataset",
                                              f"recbole:{tmp_path / 'none'}"]))
    assert "no such folder, nor atomic files of a dataset 'none'" in line


# --- the real files, where this checkout has them -----------------------------------------


def test_ml100k_atomic_files_read_as_the_dedicated_loader_reads_them(ml100k) -> None:
    from starrec.data.movielens import recbole_copy

    try:
        folder = recbole_copy()
    except DataError:
        pytest.skip("the recbole wheel with ML-100K is not installed")
    data = load_recbole(folder)
    pd.testing.assert_frame_equal(data.interactions, ml100k.interactions)
    assert data.title("1") == "Toy Story"  # movie_title, found by its name


@pytest.mark.skipif(not SHARED_GAMES.is_dir(), reason="../shared/datasets is not here")
def test_amazon_games_as_provenance_counts_it() -> None:
    data = load_dataset(f"recbole:{SHARED_GAMES}")
    assert (data.n_users, data.n_items, len(data.interactions)) == (50546, 16859, 440264)
    assert not data.items["title"].str.contains("&amp;|&rsquo;|&nbsp;").any()
    assert sequences(data)["0"][-1] == "14"  # the test target of user 0


def test_a_mapped_time_must_exist_in_sequence_files(llmrank: Path) -> None:
    with pytest.raises(DataError, match="timestamp mapped to 'ts'"):
        load_recbole(llmrank, columns={"timestamp": "ts"})
    with pytest.raises(DataError, match="rating field cannot be mapped"):
        load_recbole(llmrank, columns={"rating": "stars"})
