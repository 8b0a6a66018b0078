"""Shared fixtures: tiny datasets built through the real validation path, and a tiny LM."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from starrec.data.schema import Dataset, TableSource, build_dataset


def make_dataset(n_users: int = 12, n_items: int = 40, per_user: int = 8, seed: int = 0) -> Dataset:
    """Random users with distinct items each, timestamps increasing per user."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        items = rng.choice(n_items, size=per_user, replace=False)
        start = int(rng.integers(0, 1000))
        rows += [(f"u{u}", f"i{i}", start + 10 * k, 4.0) for k, i in enumerate(items)]
    inter = pd.DataFrame(rows, columns=["user", "item", "timestamp", "rating"])
    items = pd.DataFrame({"item": [f"i{i}" for i in range(n_items)],
                          "title": [f"Item {i}" for i in range(n_items)]})
    return build_dataset("tiny", inter, TableSource("inter.csv", 2), items, TableSource("items.csv", 2))


def write_dataset_folder(folder: Path, **sizes: int) -> Dataset:
    """`make_dataset(**sizes)` written as the folder of tables `--dataset DIR` reads."""
    dataset = make_dataset(**sizes)
    folder.mkdir(parents=True)
    dataset.interactions.to_csv(folder / "interactions.csv", index=False)
    dataset.items.reset_index().to_csv(folder / "items.csv", index=False)
    return dataset


@pytest.fixture
def tiny() -> Dataset:
    return make_dataset()


@pytest.fixture(scope="session")
def ml100k() -> Dataset:
    from starrec.data.movielens import load_movielens_100k

    return load_movielens_100k("recbole")


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama + BPE tokenizer folder (tests/tiny_lm.py), built once per run."""
    from tiny_lm import make_tiny_lm

    return make_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A tiny dataset's test tasks and the CST store serving them (no content signals)."""
    from starrec.config import CSTConfig
    from starrec.cst.store import EvidenceStore, build_store
    from starrec.data.splits import task_interactions
    from starrec.data.tasks import build_split_tasks

    dataset = make_dataset()
    tasks = build_split_tasks(dataset, "test")
    allowed = task_interactions(dataset, tasks, "test")
    path = build_store(allowed, dataset.items, tmp_path_factory.mktemp("cst") / "s.sqlite",
                       CSTConfig(content=False), progress=False)
    return EvidenceStore(path), tasks


def run_together(calls: Sequence[Callable[[], object]], timeout: float | None = 60) -> None:
    """Start every call in a thread of its own, then wait for all of them: what a test of
    concurrent callers needs (each call reports its own result or error)."""
    threads = [threading.Thread(target=call) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
