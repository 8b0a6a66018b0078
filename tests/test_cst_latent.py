"""CST v2: latent models (SASRec, ALS) as evidence, and the `cst` ranker learned on the
split before the store's (issue 16). Tiny data; every store here is built once."""

from __future__ import annotations

import dataclasses
import json
import sqlite3

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from starrec.cli.main import app
from starrec.config import CSTConfig, StarConfig
from starrec.core import FitData
from starrec.cst.evidence import CandidateEvidence, candidate_evidence
from starrec.cst.features import FEATURE_NAMES, FEATURES, task_features
from starrec.cst.latent import FACTORS, SEQUENCE, latent_scores
from starrec.cst.learned import (
    check_fit_tasks,
    ensure_learned_ranker,
    fit_ranker,
    ranker_lines,
    read_ranker,
)
from starrec.cst.ranker import CSTRanker, ManualCSTRanker
from starrec.cst.store import EvidenceStore, build_store, inputs_hash
from starrec.cst.tools import ToolExecutor, task_tool_calls, tool_specs
from starrec.cst.verbalize import candidate_line, ordinal
from starrec.data.schema import Dataset
from starrec.data.splits import target_mask, task_interactions
from starrec.data.tasks import build_split_tasks
from starrec.latent.als import ALS
from starrec.latent.sasrec import SASRec
from tests.conftest import make_dataset, write_dataset_folder

# small models: what is tested is where they are fitted and how they are read, not how well
CONFIG = CSTConfig(content=False, latent_sasrec={"epochs": 3, "hidden": 16},
                   latent_als={"factors": 8, "iterations": 3}, ranker_trees=40)


@pytest.fixture(scope="module")
def data() -> Dataset:
    return make_dataset(n_users=30, n_items=50, per_user=10)


def store_of(dataset: Dataset, tasks, folder, name: str, config: CSTConfig = CONFIG) -> EvidenceStore:
    split = tasks[0].split
    allowed = task_interactions(dataset, tasks, split)
    return EvidenceStore(build_store(allowed, dataset.items, folder / name, config, split=split,
                                     progress=False))


@pytest.fixture(scope="module")
def stores(data, tmp_path_factory):
    """Tasks and stores of the test and valid splits."""
    folder = tmp_path_factory.mktemp("latent")
    out = {}
    for split in ("test", "valid"):
        tasks = build_split_tasks(data, split)
        out[split] = (tasks, store_of(data, tasks, folder, f"{split}.sqlite"))
    return out


def pairs(frame: pd.DataFrame) -> list[tuple[str, str]]:
    return list(zip(frame["user"].astype(str), frame["item"].astype(str)))


# --- latent models: fitted on exactly what the store may see --------------------------


@pytest.mark.parametrize("split", ["test", "train"])
def test_latent_models_are_fitted_on_the_store_rows_only(data, tmp_path, monkeypatch, split):
    """The test store's models never saw a test target; a train store's, nothing of a
    task user at or after the train target (DESIGN.md 3.3)."""
    seen: dict[str, pd.DataFrame] = {}
    for cls in (SASRec, ALS):
        real = cls.fit
        monkeypatch.setattr(cls, "fit", lambda self, fit, real=real, name=cls.name:
                            (seen.__setitem__(name, fit.interactions.copy()), real(self, fit))[1])
    tasks = build_split_tasks(data, split)
    store = store_of(data, tasks, tmp_path, "s.sqlite")
    assert set(seen) == {"sasrec", "als"} and set(store.latent_states) == {SEQUENCE, FACTORS}
    allowed = task_interactions(data, tasks, split)
    test_rows = set(pairs(data.interactions[target_mask(data, "test")]))
    for name, frame in seen.items():
        assert pairs(frame) == pairs(allowed), name  # the store's rows, in its order
        assert not set(pairs(frame)) & test_rows, name
        for task in tasks:
            rows = frame[frame["user"] == task.user_id]["item"].tolist()
            assert rows == task.history, (name, task.task_id)  # nothing at or after the target


@pytest.mark.parametrize("split", ["test", "train"])
def test_latent_signals_do_not_change_without_the_targets_in_the_raw_data(data, tmp_path, split):
    tasks = build_split_tasks(data, split)
    drop = target_mask(data, "test") | target_mask(data, split)
    without = Dataset("tiny", data.interactions[~drop].reset_index(drop=True), data.items)
    full = store_of(data, tasks, tmp_path, "full.sqlite")
    cut = store_of(without, tasks, tmp_path, "cut.sqlite")
    blobs = [sqlite3.connect(s.path).execute("SELECT * FROM latent ORDER BY model").fetchall()
             for s in (full, cut)]
    assert blobs[0] == blobs[1] and len(blobs[0]) == 2
    fields = ("sequence_rank", "sequence_score", "sequence_share", "factor_rank", "factor_score")
    for task in tasks[:5]:
        a, b = (candidate_evidence(s, task) for s in (full, cut))
        assert [[getattr(e, f) for f in fields] for e in a] == [[getattr(e, f) for f in fields] for e in b]
        assert any(e.sequence_rank for e in a)
        tools = [ToolExecutor(s, task).call("sequence_model").text for s in (full, cut)]
        assert tools[0] == tools[1]


def test_stored_models_score_as_the_fitted_ones(data, stores):
    tasks, store = stores["test"]
    allowed = FitData(task_interactions(data, tasks, "test"), pd.DataFrame(index=store.item_ids),
                      "test")
    fitted = {SEQUENCE: SASRec(**CONFIG.latent_sasrec.model_dump(), progress=False).fit(allowed),
              FACTORS: ALS(**CONFIG.latent_als.model_dump()).fit(allowed)}
    for kind, model in store.latent_models.items():
        for task in tasks[:4]:
            np.testing.assert_allclose(model.score(task), fitted[kind].score(task), rtol=1e-5,
                                       atol=1e-6)


def test_batched_scores_are_each_tasks_own(stores):
    """score_many (one forward pass, one solver call for the batch) gives every task the
    scores it gets alone, also a task with no known history item and unknown candidates."""
    tasks, store = stores["test"]
    odd = [dataclasses.replace(tasks[0], history=[]),
           dataclasses.replace(tasks[1], history=["nowhere", *tasks[1].history[-2:]],
                               candidates=["unseen", *tasks[1].candidates[1:]])]
    batch = [*tasks[:8], *odd]
    for kind, model in store.latent_models.items():
        many = model.score_many(batch)
        assert len(many) == len(batch)
        for task, scores in zip(batch, many):
            np.testing.assert_allclose(scores, model.score(task), rtol=1e-5, atol=1e-6)
        assert not many[-2].any()  # no known history item: no evidence
        assert many[-1][0] <= -1e8  # an unknown candidate scores lowest


def test_latent_scores_rank_among_the_scored_candidates(stores):
    tasks, store = stores["test"]
    task = tasks[0]
    model = store.latent_models[SEQUENCE]
    scores = latent_scores(model, task)
    assert sorted(scores.ranks.tolist()) == list(range(1, 21))
    assert scores.shares.sum() == pytest.approx(1.0)
    best = int(np.argmax(scores.scores))
    assert scores.ranks[best] == 1
    # an unknown candidate is not ranked; a history the model does not know ranks nothing
    odd = dataclasses.replace(task, candidates=[*task.candidates[:19], "nobody-knows"])
    assert latent_scores(model, odd).ranks[-1] == 0 and latent_scores(model, odd).n_scored == 19
    cold = dataclasses.replace(task, history=["nobody-knows"])
    assert latent_scores(model, cold).n_scored == 0


def test_the_latent_switch_and_settings_change_the_store_version(data, stores, tmp_path):
    tasks, _ = stores["test"]
    allowed = task_interactions(data, tasks, "test")
    off = CONFIG.model_copy(update={"latent": False})
    assert inputs_hash(allowed, data.items, off) != inputs_hash(allowed, data.items, CONFIG)
    more = CONFIG.model_copy(update={"latent_sasrec": CONFIG.latent_sasrec.model_copy(update={"epochs": 4})})
    assert inputs_hash(allowed, data.items, more) != inputs_hash(allowed, data.items, CONFIG)
    # the ranker's settings are not the store's: it is fitted on it afterwards
    other = CONFIG.model_copy(update={"ranker": "manual", "ranker_trees": 7})
    assert inputs_hash(allowed, data.items, other) == inputs_hash(allowed, data.items, CONFIG)
    store = store_of(data, tasks, tmp_path, "off.sqlite", off)
    assert store.latent_states == {} and "latent: sasrec" not in store.meta["timings_s"]
    evidence = candidate_evidence(store, tasks[0])
    assert all(e.sequence_rank is None and e.factor_rank is None for e in evidence)
    assert not [c for c in task_tool_calls(tool_specs(), tasks[0], store, 5)
                if c.name in ("sequence_model", "factor_model")]
    result = ToolExecutor(store, tasks[0]).call("sequence_model")
    assert not result.ok and "without latent models" in result.text


# --- verbalised and callable ------------------------------------------------------------


def test_templates_render_the_latent_evidence():
    assert [ordinal(n) for n in (1, 2, 3, 4, 11, 12, 13, 21, 22, 103)] == [
        "1st", "2nd", "3rd", "4th", "11th", "12th", "13th", "21st", "22nd", "103rd"]
    base = {f.name: None for f in dataclasses.fields(CandidateEvidence)}
    evidence = CandidateEvidence(**{**base, "item": "50", "title": "Star Wars", "known": True,
                                    "cooc_score": 0.0, "cooc_linked": 0, "cooc_best_count": 0,
                                    "cooc_best_base": 0, "transition_count": 0,
                                    "transition_best_count": 0, "transition_best_total": 0,
                                    "user_votes": 0, "similar_users": 0, "pop": 10,
                                    "pop_pct": 80.0, "recent_pct": 0.0, "sequence_rank": 2,
                                    "sequence_score": 3.1, "sequence_share": 0.31,
                                    "sequence_of": 20, "factor_rank": 5, "factor_score": 0.42,
                                    "factor_of": 20})
    line = candidate_line("B", evidence, 7, str)
    assert ("a sequence model of all users' histories ranks it 2nd of the 20 for what this user "
            "does next (31% of its probability)") in line
    assert "a latent-factor model of who consumed what ranks it 5th of the 20" in line


def test_latent_tools_are_callable_and_offered(stores):
    tasks, store = stores["test"]
    task = tasks[1]
    tools = ToolExecutor(store, task)
    sequence = tools.call("sequence_model", {"k": 3})
    assert sequence.ok and sequence.text.startswith("A sequence model (SASRec)")
    lines = sequence.text.splitlines()
    assert len(lines) == 4 and lines[1].startswith("1. [") and "of its probability" in lines[1]
    factors = tools.call("factor_model", {})
    assert factors.ok and len(factors.text.splitlines()) == 11  # the header and the top 10
    assert not tools.call("factor_model", {"k": 0}).ok
    assert not ToolExecutor(store).call("sequence_model").ok  # needs a task
    offered = {c.name for c in task_tool_calls(tool_specs(), task, store, 5)}
    assert {"sequence_model", "factor_model"} <= offered
    # what the LLM reads per candidate carries both models
    text = ToolExecutor(store, task, budget=10_000).call("candidate_evidence").text
    assert text.count("a sequence model of all users' histories ranks it") == 20
    assert text.count("a latent-factor model of who consumed what ranks it") == 20


# --- the learned ranker -----------------------------------------------------------------


def test_features_come_from_the_evidence(stores):
    tasks, store = stores["test"]
    x = task_features(store, tasks[0])
    assert x.shape == (20, len(FEATURES)) and len(set(FEATURE_NAMES)) == len(FEATURES)
    column = dict(zip(FEATURE_NAMES, x.T))
    evidence = candidate_evidence(store, tasks[0])
    assert column["sequence_rank"].tolist() == [e.sequence_rank for e in evidence]
    assert np.nanmax(column["sequence_margin"]) == 0.0
    assert np.isnan(column["content_similarity"]).all()  # no content vectors: missing, not 0


def test_the_ranker_is_fitted_on_valid_tasks_only_and_not_moved_by_test_targets(data, stores,
                                                                                 tmp_path):
    valid, valid_store = stores["valid"]
    test, test_store = stores["test"]
    text, meta = fit_ranker(valid_store, valid, CONFIG)
    assert meta["fit_split"] == ["valid"] and meta["fit_tasks"] == len(valid)
    assert meta["held_out_tasks"] == 6 and 1 <= meta["trees"] <= CONFIG.ranker_trees
    assert sum(meta["importance_by_group"].values()) == pytest.approx(1.0, abs=1e-3)
    # every test target moved to another item the user never had: the valid store, and
    # so the fitted model, cannot tell
    frame = data.interactions.copy()
    rows = np.flatnonzero(target_mask(data, "test"))
    for n, row in enumerate(rows):
        user = frame.at[row, "user"]
        unseen = sorted(set(data.items.index) - set(frame.loc[frame["user"] == user, "item"]))
        frame.at[row, "item"] = unseen[n % len(unseen)]
    moved = Dataset("tiny", frame, data.items)
    moved_store = store_of(moved, valid, tmp_path, "moved.sqlite")
    moved_text, moved_meta = fit_ranker(moved_store, valid, CONFIG)
    assert moved_text == text
    assert {k: v for k, v in moved_meta.items() if k != "fit_s"} == \
        {k: v for k, v in meta.items() if k != "fit_s"}
    # while other valid targets do move it: the check above has power
    other = [dataclasses.replace(t, target=t.candidates[0] if t.candidates[0] != t.target
                                 else t.candidates[1]) for t in valid]
    assert fit_ranker(valid_store, other, CONFIG)[0] != text
    # test tasks, or features from a store that is not the valid one, are refused
    with pytest.raises(ValueError, match="fitted on valid tasks only"):
        check_fit_tasks(test_store, test_store, test)
    with pytest.raises(ValueError, match="must come from the store serving them"):
        check_fit_tasks(test_store, test_store, valid)
    train = build_split_tasks(data, "train")
    train_store = store_of(data, train, tmp_path, "train.sqlite",
                           CONFIG.model_copy(update={"latent": False}))
    with pytest.raises(ValueError, match="no split before it"):
        check_fit_tasks(train_store, valid_store, valid)


def test_the_learned_ranker_is_kept_with_the_store_and_reused(stores, tmp_path):
    import shutil

    valid, valid_store = stores["valid"]
    test, test_store = stores["test"]
    path = tmp_path / "test.sqlite"
    shutil.copy(test_store.path, path)
    first = ensure_learned_ranker(path, valid_store, valid, CONFIG)
    again = ensure_learned_ranker(path, valid_store, valid, CONFIG)
    assert again.key == first.key and again.meta["fit_s"] == first.meta["fit_s"]  # not refitted
    refit = ensure_learned_ranker(path, valid_store, valid, CONFIG.model_copy(update={"ranker_leaves": 4}))
    assert refit.key != first.key
    store = EvidenceStore(path)
    assert read_ranker(store).key == refit.key  # one ranker per store, the latest
    learned = CSTRanker.on_store(store, CONFIG)
    manual = CSTRanker.on_store(store, CONFIG.model_copy(update={"ranker": "manual"}))
    assert learned.kind == "learned" and manual.kind == "manual"
    assert ManualCSTRanker.on_store(store, CONFIG).kind == "manual"
    task = test[0]
    np.testing.assert_allclose(learned.score(task), refit.score(task_features(store, task)))
    lines = ranker_lines(read_ranker(store), CONFIG, "test")
    assert lines[0].startswith(f"ranker: learned (lightgbm-lambdarank, ") and "valid tasks" in lines[0]
    assert "sequence" in lines[1]
    assert "hand-set weights" in ranker_lines(None, CONFIG, "train")[0]


def test_cst_manual_equals_the_hand_set_ranker(stores):
    tasks, store = stores["test"]
    c = CONFIG

    def old_score(task):  # the cst ranker before issue 16, as it was written
        evidence = candidate_evidence(store, task)
        feature = lambda name: np.array([getattr(e, name) or 0.0 for e in evidence], dtype=float)  # noqa: E731
        scaled = lambda v: v / v.max() if v.max() > 0 else v  # noqa: E731
        return (c.weight_cooccurrence * scaled(feature("cooc_score"))
                + c.weight_transition * scaled(feature("transition_count"))
                + c.weight_similar_users * scaled(feature("user_votes"))
                + c.weight_popularity * feature("pop_pct") / 100
                + c.weight_content * feature("content_similarity"))

    manual = ManualCSTRanker.on_store(store, c)
    assert manual.name == "cst-manual"
    for task in tasks:
        assert manual.score(task).tolist() == old_score(task).tolist()
    with pytest.raises(ValueError, match="make_system"):  # learned needs the split before
        CSTRanker(c).fit(FitData(pd.DataFrame(), pd.DataFrame(), "test"))


# --- the library and the command line ---------------------------------------------------


def test_cst_build_show_and_eval_learn_on_valid(tmp_path, monkeypatch):
    monkeypatch.setenv("STAR_HOME", str(tmp_path / "home"))
    data = tmp_path / "shop"
    write_dataset_folder(data, n_users=30, n_items=50, per_user=10)
    settings = ["--set", "cst.content=false", "--set", "cst.latent_sasrec.epochs=3",
                "--set", "cst.latent_sasrec.hidden=16", "--set", "cst.ranker_trees=40"]
    runner = CliRunner()
    built = runner.invoke(app, ["cst", "build", "--dataset", str(data), *settings])
    assert built.exit_code == 0, built.output
    assert "latent: sasrec" in built.output and "ranker: learned" in built.output
    stores = sorted(p.name.split("-")[1] for p in (tmp_path / "home" / "cst").glob("*.sqlite"))
    assert stores == ["test", "valid"]  # the valid store gives the test store's ranker its features
    (test_path,) = (tmp_path / "home" / "cst").glob("*-test-*.sqlite")
    meta = read_ranker(EvidenceStore(test_path)).meta
    assert meta["fit_split"] == ["valid"] and meta["fit_tasks"] == 30
    shown = runner.invoke(app, ["cst", "show", "--task", "test-u3", "--dataset", str(data), *settings])
    assert shown.exit_code == 0, shown.output
    assert "ranker: learned (lightgbm-lambdarank" in shown.output
    assert "weight by signal group" in shown.output and "by feature: " in shown.output
    assert '"name": "sequence_model"' in shown.output and "A sequence model (SASRec)" in shown.output
    manual = runner.invoke(app, ["cst", "show", "--task", "test-u3", "--dataset", str(data),
                                 *settings, "--set", "cst.ranker=manual"])
    assert "ranker: hand-set weights (cst.ranker=manual): cooccurrence 1" in manual.output
    results = {}
    for system in ("cst", "cst-manual"):
        out = tmp_path / f"{system}.json"
        done = runner.invoke(app, ["eval", "--system", system, "--dataset", str(data),
                                   "--out", str(out), *settings])
        assert done.exit_code == 0, done.output
        results[system] = json.loads(out.read_text())
    assert results["cst"]["system"] == "cst" and results["cst"]["config"]["ranker"] == "learned"
    assert results["cst-manual"]["system"] == "cst-manual"
    assert results["cst-manual"]["config"]["ranker"] == "manual"
    assert results["cst"]["config"]["ranker_key"] == read_ranker(EvidenceStore(test_path)).key
    # the valid store's own ranker is learned on the train tasks, never on valid ones
    valid = runner.invoke(app, ["eval", "--system", "cst", "--dataset", str(data), "--split",
                                "valid", "--out", str(tmp_path / "v.json"), *settings])
    assert valid.exit_code == 0, valid.output
    (valid_path,) = (tmp_path / "home" / "cst").glob("*-valid-*.sqlite")
    assert read_ranker(EvidenceStore(valid_path)).meta["fit_split"] == ["train"]
    bad = runner.invoke(app, ["eval", "--system", "cst-auto", "--dataset", str(data),
                              "--out", str(tmp_path / "x.json")])
    assert bad.exit_code == 2 and "cst-manual" in bad.output
