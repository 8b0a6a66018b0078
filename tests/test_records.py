"""Records files with an identity: a resume must be the same run (system, model, config,
task file), else it stops and names what differs (issue 12, finding 2)."""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

from starrec.data.tasks import build_split_tasks, write_tasks
from starrec.core import fingerprint as fingerprint_module
from starrec.evaluation.identity import (
    RunIdentity,
    code_version,
    config_hash,
    model_hash,
    run_identity,
    tasks_sha256,
)
from starrec.evaluation.runner import (
    Recommendation,
    read_identity,
    read_records,
    read_records_file,
    run_tasks,
)
from tests.conftest import write_dataset_folder


class Reverse:
    """Ranks the candidates in reverse presented order; counts its calls."""

    name = "reverse"

    def __init__(self):
        self.calls: list[str] = []

    def recommend(self, task):
        self.calls.append(task.task_id)
        return Recommendation(list(reversed(task.candidates)), llm_calls=1)


def identity_of(tasks, model="model-a", **config):
    return run_identity("reverse", tasks, {"params": {"k": 1, **config}}, model=model)


def test_records_open_with_their_identity_and_the_same_identity_resumes(tiny, tmp_path):
    tasks = build_split_tasks(tiny, "test")[:4]
    checkpoint = tmp_path / "r.jsonl"
    first = identity_of(tasks)
    run_tasks(Reverse(), tasks[:2], progress=False, checkpoint=checkpoint, identity=first)
    header = json.loads(checkpoint.read_text().splitlines()[0])
    assert header["records_identity"]["system"] == "reverse"
    assert header["records_identity"]["model"] == "model-a"
    assert read_identity(checkpoint) == first
    assert set(read_records(checkpoint)) == {t.task_id for t in tasks[:2]}

    again = Reverse()
    records = run_tasks(again, tasks, progress=False, checkpoint=checkpoint,
                        identity=identity_of(tasks))
    assert again.calls == [t.task_id for t in tasks[2:]]
    assert [r.task_id for r in records] == [t.task_id for t in tasks]


@pytest.mark.parametrize("changed, field", [
    ({"model": "model-b"}, "model_hash"),
    ({"k": 2}, "config_hash"),
])
def test_a_resume_with_another_identity_stops_and_names_what_differs(tiny, tmp_path, changed, field):
    tasks = build_split_tasks(tiny, "test")[:3]
    checkpoint = tmp_path / "r.jsonl"
    run_tasks(Reverse(), tasks, progress=False, checkpoint=checkpoint, identity=identity_of(tasks))
    other = identity_of(tasks, **changed)
    system = Reverse()
    with pytest.raises(ValueError, match=field) as error:
        run_tasks(system, tasks, progress=False, checkpoint=checkpoint, identity=other)
    assert "--fresh" in str(error.value) and system.calls == []
    assert len(read_records(checkpoint)) == 3  # the file is left as it was


def test_another_task_file_or_system_is_refused(tiny, tmp_path):
    tasks = build_split_tasks(tiny, "test")[:3]
    checkpoint = tmp_path / "r.jsonl"
    file_a, file_b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_tasks(tasks, file_a)
    write_tasks(tasks[::-1], file_b)
    params = {"params": {}}
    run_tasks(Reverse(), tasks, progress=False, checkpoint=checkpoint,
              identity=run_identity("reverse", tasks, params, tasks_path=file_a))
    with pytest.raises(ValueError, match="tasks_sha256"):
        run_tasks(Reverse(), tasks, progress=False, checkpoint=checkpoint,
                  identity=run_identity("reverse", tasks, params, tasks_path=file_b))
    with pytest.raises(ValueError, match="system"):
        run_tasks(Reverse(), tasks, progress=False, checkpoint=checkpoint,
                  identity=run_identity("other", tasks, params, tasks_path=file_a))


def test_records_without_an_identity_line_are_not_resumed(tiny, tmp_path):
    tasks = build_split_tasks(tiny, "test")[:2]
    checkpoint = tmp_path / "r.jsonl"
    run_tasks(Reverse(), tasks, progress=False, checkpoint=checkpoint)
    lines = checkpoint.read_text().splitlines()
    checkpoint.write_text("\n".join(lines[1:]) + "\n")  # as records were written before
    assert read_identity(checkpoint) is None and len(read_records(checkpoint)) == 2
    with pytest.raises(ValueError, match="--fresh"):
        run_tasks(Reverse(), tasks, progress=False, checkpoint=checkpoint)


def test_an_empty_or_cut_file_starts_afresh(tiny, tmp_path):
    tasks = build_split_tasks(tiny, "test")[:2]
    checkpoint = tmp_path / "r.jsonl"
    checkpoint.write_text('{"records_ident')  # a crash while the identity was written
    system = Reverse()
    run_tasks(system, tasks, progress=False, checkpoint=checkpoint)
    assert system.calls == [t.task_id for t in tasks] and read_identity(checkpoint) is not None


def test_a_record_after_a_cut_line_is_not_lost(tiny, tmp_path):
    tasks = build_split_tasks(tiny, "test")[:3]
    checkpoint = tmp_path / "r.jsonl"
    same = identity_of(tasks)
    run_tasks(Reverse(), tasks[:1], progress=False, checkpoint=checkpoint, identity=same)
    with checkpoint.open("a") as handle:
        handle.write('{"task_id": "' + tasks[1].task_id + '", "tar')  # killed mid-write
    run_tasks(Reverse(), tasks, progress=False, checkpoint=checkpoint, identity=same)
    # before, the next record joined the cut line and both were lost to the next resume
    assert set(read_records(checkpoint)) == {t.task_id for t in tasks}
    third = Reverse()
    run_tasks(third, tasks, progress=False, checkpoint=checkpoint, identity=same)
    assert third.calls == []


def test_a_new_code_version_resumes_and_is_marked(tiny, tmp_path, monkeypatch):
    tasks = build_split_tasks(tiny, "test")[:3]
    checkpoint = tmp_path / "r.jsonl"
    old = identity_of(tasks)
    run_tasks(Reverse(), tasks[:1], progress=False, checkpoint=checkpoint,
              identity=RunIdentity(**{**old.to_dict(), "code_version": "0.0.1"}))
    run_tasks(Reverse(), tasks, progress=False, checkpoint=checkpoint,
              identity=RunIdentity(**{**old.to_dict(), "code_version": "0.0.2"}))
    versions = [i.code_version for i in read_records_file(checkpoint).identities]
    assert versions == ["0.0.1", "0.0.2"] and len(read_records(checkpoint)) == 3


def test_identity_hashes(tiny, tmp_path):
    tasks = build_split_tasks(tiny, "test")[:3]
    path = tmp_path / "t.jsonl"
    _, digest = write_tasks(tasks, path)
    # the tasks' own hash equals the sha256 of the file they make
    assert tasks_sha256(tasks) == digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert run_identity("x", tasks, tasks_path=path).tasks_sha256 == digest

    # settings that change answers change the hash; where and how fast they come do not
    base = {"params": {"temperature": 0.0}, "llm": {"threads": 2, "n_ctx": 8192, "model": "a"}}
    assert config_hash(base) == config_hash({**base, "llm": {**base["llm"], "threads": 8}})
    assert config_hash(base) == config_hash({**base, "model": "other spelling"})
    assert config_hash(base) != config_hash({**base, "params": {"temperature": 0.7}})
    assert config_hash(base) != config_hash({**base, "llm": {**base["llm"], "n_ctx": 4096}})

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "star_model.json").write_text('{"stage": "sft"}')
    (folder / "weights.bin").write_bytes(b"\0" * 1000)
    first = model_hash(folder)
    assert model_hash(str(folder)) == first and len(first) == 16
    (folder / "weights.bin").write_bytes(b"\1" * 1000)
    assert model_hash(folder) != first
    assert model_hash("org/some-model") != model_hash("org/other-model")
    assert model_hash(None) is None


def test_model_hash_of_a_large_file_reads_its_edges(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint_module, "WHOLE_FILE_BYTES", 64)
    monkeypatch.setattr(fingerprint_module, "EDGE_BYTES", 16)
    path = tmp_path / "m.gguf"
    path.write_bytes(bytes(range(200)))
    first = model_hash(path)
    path.write_bytes(bytes(range(199)) + b"\0")  # the tail changed
    assert model_hash(path) != first


def test_code_version_is_the_package_version_and_its_commit():
    import starrec

    version = code_version()
    assert version.startswith(starrec.__version__)


# --- the reproduction through the CLI -------------------------------------------------

def test_rerun_with_another_model_and_same_out_is_refused_not_reported(tmp_path, monkeypatch):
    """Before: the second model's run resumed the first model's records and reported its
    answers as the second's."""
    from starrec.cli.main import app
    from starrec.llm import models
    from tests.fakes import ScriptedModel, permutation

    monkeypatch.setenv("STAR_HOME", str(tmp_path / "home"))
    data = tmp_path / "shop"
    write_dataset_folder(data, n_users=12, n_items=40)
    loaded = []

    def load(spec, cfg):
        first = {"fake-a": [3], "fake-b": [5]}[spec]
        model = ScriptedModel({"planner": "recent: x", "recent": "Fine.", "reflector": "ACCEPT",
                               "ranker": permutation(20, first)}, name=spec)
        loaded.append(model)
        return model

    monkeypatch.setattr(models, "load_chat_model", load)
    out = tmp_path / "mars.json"
    base = ["eval", "--system", "mars", "--dataset", str(data), "--limit", "2", "--out", str(out),
            "--set", "cst.content=false", "--set", "eval.bootstrap_resamples=20"]
    runner = CliRunner()
    result = runner.invoke(app, [*base, "--model", "fake-a"])
    assert result.exit_code == 0, result.output
    first = [json.loads(line) for line in out.with_suffix(".tasks.jsonl").read_text().splitlines()]

    result = runner.invoke(app, [*base, "--model", "fake-b"])
    assert result.exit_code == 2, result.output
    assert "model_hash" in result.output and "--fresh" in result.output
    assert "Traceback" not in result.output
    assert json.loads(out.read_text())["provenance"]["model_hash"] == model_hash("fake-a")

    result = runner.invoke(app, [*base, "--model", "fake-b", "--fresh"])
    assert result.exit_code == 0, result.output
    second = [json.loads(line) for line in out.with_suffix(".tasks.jsonl").read_text().splitlines()]
    assert [r["ranking"][0] for r in first] != [r["ranking"][0] for r in second]
    assert json.loads(out.read_text())["provenance"]["model_hash"] == model_hash("fake-b")

    # the same run again resumes: no new generation
    result = runner.invoke(app, [*base, "--model", "fake-b"])
    assert result.exit_code == 0, result.output
    assert loaded[-1].calls == []
