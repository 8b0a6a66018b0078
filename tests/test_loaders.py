"""The generic and AgentRecBench loaders, and the validation they share (schema.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest

from starrec.data.agentrecbench import load_agentrecbench, load_agentrecbench_tasks
from starrec.data.errors import DataError
from starrec.data.generic import load_generic, load_table

ITEMS_CSV = "item,title,genres\n1,Alpha,Drama\n2,Beta,Comedy\n3,Gamma,Action\n007,Delta,Drama\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def items_csv(tmp_path: Path) -> Path:
    return write(tmp_path / "items.csv", ITEMS_CSV)


def load_csv(tmp_path: Path, interactions: str, items: str = ITEMS_CSV, **options: bool):
    return load_generic(
        write(tmp_path / "inter.csv", interactions), write(tmp_path / "items.csv", items),
        **options,
    )


# --- generic loader and shared validation --------------------------------------------


def test_csv_loads_sorted_sequences_with_string_ids(tmp_path: Path) -> None:
    data = load_csv(tmp_path, "user,item,timestamp,rating\nu1,2,20,4\nu1,1,10,5\nu2,007,5,\n")
    assert data.name == "inter"
    assert data.interactions["user"].tolist() == ["u2", "u1", "u1"]
    assert data.interactions["item"].tolist() == ["007", "1", "2"]
    assert data.interactions["timestamp"].tolist() == [5, 10, 20]
    assert data.interactions["rating"].iloc[1:].tolist() == [5.0, 4.0]
    assert pd.isna(data.interactions["rating"].iloc[0])
    assert data.title("007") == "Delta"
    assert data.items.at["3", "genres"] == "Action"


def test_missing_column_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"inter\.csv: missing column\(s\) \['timestamp'\]"):
        load_csv(tmp_path, "user,item\nu1,1\n")


def test_columns_mapping_renames_before_validation(tmp_path: Path) -> None:
    inter = write(tmp_path / "inter.csv", "uid,iid,when\nu1,1,10\nu1,2,20\n")
    items = write(tmp_path / "items.csv", "iid,name\n1,Alpha\n2,Beta\n")
    mapping = {"user": "uid", "item": "iid", "timestamp": "when", "title": "name"}
    data = load_generic(inter, items, name="mine", columns=mapping)
    assert data.name == "mine"
    assert data.interactions["item"].tolist() == ["1", "2"]
    assert data.title("2") == "Beta"
    with pytest.raises(ValueError, match="unknown column name"):
        load_generic(inter, items, columns={"when": "timestamp"})


def test_unknown_item_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        load_csv(tmp_path, "user,item,timestamp\nu1,1,10\nu1,99,20\n")
    assert error.value.line == 3
    assert "inter.csv: line 3: column 'item': item id '99' is not in the items table" in str(
        error.value
    )


def test_drop_unknown_items_counts_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        data = load_csv(
            tmp_path, "user,item,timestamp\nu1,1,10\nu1,99,20\nu2,98,30\nu2,2,40\n",
            drop_unknown_items=True,
        )
    assert data.interactions["item"].tolist() == ["1", "2"]
    assert "dropped 2 interaction(s)" in caplog.text


def test_duplicate_item_ids_name_both_lines(tmp_path: Path) -> None:
    items = "item,title\n1,Alpha\n2,Beta\n3,Gamma\n2,Beta again\n"
    with pytest.raises(DataError) as error:
        load_csv(tmp_path, "user,item,timestamp\nu1,1,10\n", items=items)
    message = str(error.value)
    assert "items.csv: line 5" in message
    assert "duplicate item id '2' (first defined at line 3)" in message


def test_unparsable_timestamp_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        load_csv(tmp_path, "user,item,timestamp\nu1,1,2019-03-01\nu1,2,not-a-date\n")
    assert "line 3: column 'timestamp': unparsable timestamp 'not-a-date'" in str(error.value)


def test_mixed_numbers_and_dates_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError) as error:
        load_csv(tmp_path, "user,item,timestamp\nu1,1,100\nu1,2,200\nu1,3,2019-03-01\n")
    message = str(error.value)
    assert "line 4: column 'timestamp': timestamps mix numbers (line 2: '100')" in message
    assert "'2019-03-01'" in message


def test_iso_dates_become_epoch_seconds(tmp_path: Path) -> None:
    data = load_csv(
        tmp_path,
        "user,item,timestamp\nu1,1,2019-03-01\nu1,2,2019-03-02T12:00:00\n"
        "u1,3,2019-03-03T00:00:00+01:00\n",
    )
    assert data.interactions["timestamp"].tolist() == [1551398400, 1551528000, 1551567600]
    assert data.interactions["timestamp"].dtype == "int64"


def test_time_order_required_names_the_line(tmp_path: Path) -> None:
    inter = "user,item,timestamp\nu1,1,10\nu2,1,5\nu1,2,30\nu1,3,20\n"
    with pytest.raises(DataError) as error:
        load_csv(tmp_path, inter, require_time_order=True)
    assert error.value.line == 5
    assert "timestamp 20 of user 'u1' is earlier than that user's previous row" in str(error.value)
    data = load_csv(tmp_path, inter)
    u1 = data.interactions[data.interactions["user"] == "u1"]
    assert u1["item"].tolist() == ["1", "3", "2"]


def test_ties_keep_file_order(tmp_path: Path) -> None:
    data = load_csv(tmp_path, "user,item,timestamp\nu1,3,10\nu1,1,10\nu1,2,10\n")
    assert data.interactions["item"].tolist() == ["3", "1", "2"]


def test_repeated_pair_keeps_earliest(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        data = load_csv(
            tmp_path, "user,item,timestamp,rating\nu1,1,200,1\nu1,2,150,3\nu1,1,100,5\n"
        )
    assert data.interactions[["item", "timestamp", "rating"]].values.tolist() == [
        ["1", 100, 5.0],
        ["2", 150, 3.0],
    ]
    assert "1 repeated (user, item) interaction(s) dropped" in caplog.text


def test_bad_rating_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"line 3: column 'rating': rating 'great' is not a number"):
        load_csv(tmp_path, "user,item,timestamp,rating\nu1,1,10,4\nu1,2,20,great\n")


def test_empty_id_names_the_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"line 3: column 'user': empty id"):
        load_csv(tmp_path, "user,item,timestamp\nu1,1,10\n,2,20\n")


def test_blank_csv_lines_keep_line_numbers_exact(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"inter\.csv: line 5: column 'item'"):
        load_csv(tmp_path, "user,item,timestamp\nu1,1,10\n\n\nu1,99,20\n\n")


@pytest.mark.parametrize(
    ("name", "text"),
    [("empty.csv", ""), ("header.csv", "user,item,timestamp\n"), ("empty.jsonl", "\n\n")],
)
def test_empty_files_are_refused(tmp_path: Path, name: str, text: str) -> None:
    with pytest.raises(DataError, match=rf"{name}: the file has no data rows"):
        load_table(write(tmp_path / name, text))


def test_empty_items_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"items\.csv: the file has no data rows"):
        load_csv(tmp_path, "user,item,timestamp\nu1,1,10\n", items="item,title\n")


def test_unknown_suffix_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="unknown file type '.txt'"):
        load_table(write(tmp_path / "data.txt", "a\n"))
    with pytest.raises(DataError, match="nothere.csv: file not found"):
        load_table(tmp_path / "nothere.csv")


def test_malformed_json_line_is_named(tmp_path: Path) -> None:
    path = write(
        tmp_path / "inter.jsonl", '{"user": "u1", "item": "1", "timestamp": 1}\n\n{"user": \n'
    )
    with pytest.raises(DataError) as error:
        load_table(path)
    assert error.value.line == 3
    assert "inter.jsonl: line 3: not valid JSON" in str(error.value)
    write(path, '{"user": "u1"}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"line 2: a JSON list, expected one JSON object a line"):
        load_table(path)


def test_json_lines_errors_skip_blank_lines(tmp_path: Path, items_csv: Path) -> None:
    inter = write(
        tmp_path / "inter.jsonl",
        '{"user": "u1", "item": 1, "timestamp": 10}\n\n'
        '{"user": "u1", "item": 99, "timestamp": 20}\n',
    )
    with pytest.raises(DataError, match=r"inter\.jsonl: line 3: column 'item': item id '99'"):
        load_generic(inter, items_csv)


ROWS = [
    {"user": "u1", "item": "2", "timestamp": "2019-03-02", "rating": 4.0},
    {"user": "u1", "item": "1", "timestamp": "2019-03-01", "rating": 5.0},
    {"user": "u2", "item": "3", "timestamp": "2019-03-01T08:30:00", "rating": 3.5},
    {"user": "u2", "item": "1", "timestamp": "2019-03-04", "rating": 2.0},
]
ITEM_ROWS = [
    {"item": "1", "title": "Alpha", "genres": "Drama"},
    {"item": "2", "title": "Beta", "genres": "Comedy"},
    {"item": "3", "title": "Gamma", "genres": "Action, Drama"},
]


def test_csv_jsonl_and_parquet_give_the_same_dataset(tmp_path: Path) -> None:
    inter, items = pd.DataFrame(ROWS), pd.DataFrame(ITEM_ROWS)
    inter.to_csv(tmp_path / "inter.csv", index=False)
    items.to_csv(tmp_path / "items.csv", index=False)
    inter.to_parquet(tmp_path / "inter.parquet", index=False)
    items.to_parquet(tmp_path / "items.parquet", index=False)
    write_jsonl(tmp_path / "inter.jsonl", ROWS)
    write_jsonl(tmp_path / "items.jsonl", ITEM_ROWS)
    datasets = [
        load_generic(tmp_path / f"inter.{ext}", tmp_path / f"items.{ext}", name="same")
        for ext in ("csv", "jsonl", "parquet")
    ]
    first = datasets[0]
    assert first.interactions["item"].tolist() == ["1", "3", "2", "1"]
    for other in datasets[1:]:
        pd.testing.assert_frame_equal(first.interactions, other.interactions)
        pd.testing.assert_frame_equal(first.items, other.items)
        assert first.fingerprint() == other.fingerprint()


def test_parquet_datetimes_and_row_numbers(tmp_path: Path) -> None:
    pd.DataFrame(ITEM_ROWS).to_parquet(tmp_path / "items.parquet", index=False)
    inter = pd.DataFrame(
        {"user": ["u1", "u1"], "item": [1, 2],
         "timestamp": pd.to_datetime(["2019-03-01", "2019-03-02T12:00:00"], format="ISO8601")}
    )
    inter.to_parquet(tmp_path / "inter.parquet", index=False)
    data = load_generic(tmp_path / "inter.parquet", tmp_path / "items.parquet")
    assert data.interactions["timestamp"].tolist() == [1551398400, 1551528000]
    assert data.interactions["item"].tolist() == ["1", "2"]
    inter.assign(item=[1, 9]).to_parquet(tmp_path / "inter.parquet", index=False)
    with pytest.raises(DataError, match=r"inter\.parquet: column 'item': row 2: item id '9'"):
        load_generic(tmp_path / "inter.parquet", tmp_path / "items.parquet")


# --- AgentRecBench -------------------------------------------------------------------

N_ITEMS = 25
# user -> [(item number, date)]: file order is deliberately not time order
REVIEWS = {
    "uA": [(1, "2020-01-05"), (2, "2020-01-01"), (3, "2020-02-01"), (4, "2020-03-01"),
           (5, "2020-04-01")],
    "uB": [(6, "2021-05-01 10:00:00"), (7, "2021-05-02 10:00:00"), (8, "2021-05-03 10:00:00"),
           (1, "2021-05-04 10:00:00")],
    "uC": [(9, "2019-01-01"), (10, "2019-01-02"), (11, "2019-01-03")],
}
# task number -> (user, ground-truth item number); numbered so that text order differs
TASKS = {10: ("uA", 5), 2: ("uB", 8)}


def item_id(number: int) -> str:
    return f"B{number:03d}"


def candidates_for(target: int) -> list[str]:
    others = [n for n in range(6, N_ITEMS + 1) if n != target][:19]
    ids = [item_id(n) for n in others]
    ids.insert(7, item_id(target))
    return ids


@pytest.fixture
def arb(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    data.mkdir()
    write_jsonl(
        data / "item.json",
        [
            {"item_id": item_id(n), "title": f"Product {n}",
             "categories": ["Tools", f"Kind {n % 3}"],
             "description": [f"About {n}.", "Sturdy."], "average_rating": 4.5,
             "details": {"Brand": "X"}, "source": "amazon"}
            for n in range(1, N_ITEMS + 1)
        ],
    )
    write_jsonl(data / "user.json", [{"user_id": u, "source": "amazon"} for u in (*REVIEWS, "uD")])
    write_jsonl(
        data / "review.json",
        [
            {"review_id": f"r-{u}-{n}", "user_id": u, "item_id": item_id(n),
             "stars": float(n % 5 + 1),
             "text": "fine", "date": date, "source": "amazon"}
            for u, rows in REVIEWS.items()
            for n, date in rows
        ],
    )
    tasks = tmp_path / "track2"
    (tasks / "tasks").mkdir(parents=True)
    (tasks / "groundtruth").mkdir()
    for number, (user, target) in TASKS.items():
        write(
            tasks / "tasks" / f"task_{number}.json",
            json.dumps({"type": "recommendation", "user_id": user, "candidate_category": "product",
                        "candidate_list": candidates_for(target), "loc": -1, "data type": "real"}),
        )
        write(tasks / "groundtruth" / f"groundtruth_{number}.json",
              json.dumps({"ground truth": item_id(target)}))
    return data, tasks


def pairs(dataset) -> set[tuple[str, str]]:
    return set(zip(dataset.interactions["user"], dataset.interactions["item"]))


def test_agentrecbench_reviews_become_interactions(arb: tuple[Path, Path]) -> None:
    data = load_agentrecbench(arb[0])
    assert len(data.interactions) == sum(len(rows) for rows in REVIEWS.values())
    assert data.n_items == N_ITEMS
    ua = data.interactions[data.interactions["user"] == "uA"]
    assert ua["item"].tolist() == [item_id(n) for n in (2, 1, 3, 4, 5)]
    assert ua["timestamp"].iloc[0] == 1577836800  # 2020-01-01 UTC
    assert ua["rating"].tolist() == [3.0, 2.0, 4.0, 5.0, 1.0]
    assert data.title(item_id(4)) == "Product 4"
    assert data.items.at[item_id(4), "categories"] == "Tools, Kind 1"
    assert data.items.at[item_id(4), "description"] == "About 4., Sturdy."
    assert "details" not in data.items.columns
    assert sorted(data.users.index) == ["uA", "uB", "uC", "uD"]


def test_block_set_removes_exactly_the_ground_truth_reviews(
    arb: tuple[Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    full = load_agentrecbench(arb[0])
    with caplog.at_level(logging.INFO):
        blocked = load_agentrecbench(arb[0], task_dir=arb[1])
    truth = {(user, item_id(target)) for user, target in TASKS.values()}
    assert pairs(full) - pairs(blocked) == truth
    assert pairs(blocked) <= pairs(full)
    assert len(full.interactions) - len(blocked.interactions) == len(truth)
    assert "block set removed 2 ground-truth review(s) of 2 task(s)" in caplog.text


def test_block_set_keeps_review_line_numbers(arb: tuple[Path, Path]) -> None:
    reviews = (arb[0] / "review.json").read_text().splitlines()
    broken = json.loads(reviews[9])  # line 10, after uA's blocked review on line 5
    broken["item_id"] = "NOPE"
    reviews[9] = json.dumps(broken)
    write(arb[0] / "review.json", "\n".join(reviews) + "\n")
    with pytest.raises(DataError, match=r"review\.json: line 10: column 'item': item id 'NOPE'"):
        load_agentrecbench(arb[0], task_dir=arb[1])


def test_review_without_date_is_named(arb: tuple[Path, Path]) -> None:
    reviews = [json.loads(line) for line in (arb[0] / "review.json").read_text().splitlines()]
    del reviews[3]["date"]
    write_jsonl(arb[0] / "review.json", reviews)
    with pytest.raises(DataError) as error:
        load_agentrecbench(arb[0])
    assert error.value.line == 4
    assert "review.json: line 4: review has no date" in str(error.value)


def test_yelp_titles_come_from_name(arb: tuple[Path, Path]) -> None:
    items = [json.loads(line) for line in (arb[0] / "item.json").read_text().splitlines()]
    for item in items:
        item["name"] = item.pop("title").replace("Product", "Place")
        item.update(categories="Restaurants, Pizza", source="yelp")
    write_jsonl(arb[0] / "item.json", items)
    with pytest.raises(DataError, match=r"review\.json: no records of source 'yelp'"):
        load_agentrecbench(arb[0], source="yelp")
    for name in ("review.json", "user.json"):
        records = [json.loads(line) for line in (arb[0] / name).read_text().splitlines()]
        write_jsonl(arb[0] / name, [{**r, "source": "yelp"} for r in records])
    assert load_agentrecbench(arb[0]).title(item_id(3)) == "Place 3"
    data = load_agentrecbench(arb[0], source="yelp")
    assert data.name == "agentrecbench-yelp"
    assert data.title(item_id(3)) == "Place 3"
    assert data.items.at[item_id(3), "categories"] == "Restaurants, Pizza"


def test_source_keeps_only_that_sources_records(arb: tuple[Path, Path]) -> None:
    with open(arb[0] / "item.json", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"item_id": "Y1", "name": "Diner", "source": "yelp"}) + "\n")
    with open(arb[0] / "review.json", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"review_id": "y", "user_id": "uY", "item_id": "Y1",
                                 "date": "2020-01-01", "source": "yelp"}) + "\n")
    assert load_agentrecbench(arb[0]).title("Y1") == "Diner"
    amazon = load_agentrecbench(arb[0], source="amazon")
    assert "Y1" not in amazon.items.index
    assert "uY" not in set(amazon.interactions["user"])
    with pytest.raises(ValueError, match="unknown source"):
        load_agentrecbench(arb[0], source="netflix")


def test_tasks_convert_in_numeric_order(arb: tuple[Path, Path]) -> None:
    data = load_agentrecbench(arb[0], task_dir=arb[1])
    tasks = load_agentrecbench_tasks(arb[1], data, scenario="user_cold")
    assert [t.task_id for t in tasks] == ["arb-2", "arb-10"]
    first, second = tasks
    assert first.user_id == "uB"
    assert first.history == [item_id(n) for n in (6, 7, 1)]
    assert first.candidates == candidates_for(8)
    assert first.target == item_id(8) and first.target_index == 7
    assert (first.split, first.scenario) == ("test", "user_cold")
    assert first.extra == {"candidate_category": "product", "loc": -1, "data type": "real"}
    assert second.history == [item_id(n) for n in (2, 1, 3, 4)]
    assert second.target == item_id(5)


def test_tasks_refuse_an_unblocked_dataset(arb: tuple[Path, Path]) -> None:
    leak = r"task_2\.json: ground truth 'B008' is in the user's history"
    with pytest.raises(DataError, match=leak):
        load_agentrecbench_tasks(arb[1], load_agentrecbench(arb[0]))


def test_user_whose_only_review_is_blocked_has_empty_history(arb: tuple[Path, Path]) -> None:
    write(arb[1] / "tasks" / "task_2.json",
          json.dumps({"user_id": "uD", "candidate_list": candidates_for(8)}))
    reviews = (arb[0] / "review.json").read_text()
    write(arb[0] / "review.json", reviews + json.dumps(
        {"review_id": "d", "user_id": "uD", "item_id": item_id(8), "date": "2022-01-01"}) + "\n")
    data = load_agentrecbench(arb[0], task_dir=arb[1])
    task = load_agentrecbench_tasks(arb[1], data)[0]
    assert (task.user_id, task.history, task.extra) == ("uD", [], {})


def edit_task(arb: tuple[Path, Path], number: int, **fields: object) -> Path:
    path = arb[1] / "tasks" / f"task_{number}.json"
    write(path, json.dumps({**json.loads(path.read_text()), **fields}))
    return path


def test_task_errors_name_the_file(arb: tuple[Path, Path]) -> None:
    data = load_agentrecbench(arb[0], task_dir=arb[1])

    edit_task(arb, 2, user_id="nobody")
    with pytest.raises(DataError, match=r"task_2\.json: column 'user_id': unknown user 'nobody'"):
        load_agentrecbench_tasks(arb[1], data)
    edit_task(arb, 2, user_id="uB")

    edit_task(arb, 10, candidate_list=[item_id(5), item_id(6), item_id(6)])
    duplicate = r"task_10\.json: column 'candidate_list': duplicate candidate\(s\) \['B006'\]"
    with pytest.raises(DataError, match=duplicate):
        load_agentrecbench_tasks(arb[1], data)

    edit_task(arb, 10, candidate_list=[item_id(6), item_id(7)])
    absent = r"groundtruth_10\.json: ground truth 'B005' is not in the candidate list"
    with pytest.raises(DataError, match=absent):
        load_agentrecbench_tasks(arb[1], data)

    edit_task(arb, 10, candidate_list=[item_id(5), "GHOST"])
    ghost = r"task_10\.json: column 'candidate_list': candidate\(s\) \['GHOST'\] not in item\.json"
    with pytest.raises(DataError, match=ghost):
        load_agentrecbench_tasks(arb[1], data)

    (arb[1] / "groundtruth" / "groundtruth_10.json").unlink()
    with pytest.raises(DataError, match=r"groundtruth_10\.json: file not found"):
        load_agentrecbench_tasks(arb[1], data)
    with pytest.raises(DataError, match=r"groundtruth_10\.json: file not found"):
        load_agentrecbench(arb[0], task_dir=arb[1])


def test_ground_truth_without_item_and_bad_task_json(arb: tuple[Path, Path]) -> None:
    data = load_agentrecbench(arb[0], task_dir=arb[1])
    write(arb[1] / "groundtruth" / "groundtruth_2.json", json.dumps({"answer": item_id(8)}))
    with pytest.raises(DataError, match=r"groundtruth_2\.json: no 'ground truth' item"):
        load_agentrecbench_tasks(arb[1], data)
    write(arb[1] / "tasks" / "task_2.json", '{"user_id": "uB",\n "candidate_list": [}')
    with pytest.raises(DataError, match=r"task_2\.json: line 2: not valid JSON"):
        load_agentrecbench_tasks(arb[1], data)


def test_empty_task_folder_and_unknown_scenario(arb: tuple[Path, Path], tmp_path: Path) -> None:
    data = load_agentrecbench(arb[0], task_dir=arb[1])
    with pytest.raises(ValueError, match="unknown scenario"):
        load_agentrecbench_tasks(arb[1], data, scenario="warm")
    (tmp_path / "empty" / "tasks").mkdir(parents=True)
    with pytest.raises(DataError, match=r"empty: no tasks/task_N\.json files"):
        load_agentrecbench_tasks(tmp_path / "empty", data)


def test_agentrecbench_amazon_and_goodreads_date_fields(tmp_path):
    """The challenge's Amazon reviews carry a millisecond `timestamp`, Goodreads `date_added`."""
    from starrec.data.agentrecbench import load_agentrecbench

    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "item.json").write_text(
        '{"item_id": "a", "title": "A"}\n{"item_id": "b", "title": "B"}\n')
    (folder / "review.json").write_text(
        '{"review_id": "r1", "user_id": "u", "item_id": "a", "timestamp": 1551398400000}\n'
        '{"review_id": "r2", "user_id": "u", "item_id": "b", "date_added": "2019-03-02"}\n')
    dataset = load_agentrecbench(folder)
    assert dataset.interactions["timestamp"].tolist() == [1551398400, 1551484800]


def test_missing_timestamp_is_named_as_missing(tmp_path):
    from starrec.data.generic import load_generic

    (tmp_path / "i.csv").write_text("user,item,timestamp\n1,a,10\n1,b,\n")
    (tmp_path / "t.csv").write_text("item,title\na,A\nb,B\n")
    with pytest.raises(DataError, match=r"i.csv: line 3: column 'timestamp': missing timestamp"):
        load_generic(tmp_path / "i.csv", tmp_path / "t.csv")
