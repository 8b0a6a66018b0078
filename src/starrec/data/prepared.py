"""Prepared task sets, found by the data and protocol they were made from.

A folder of task files is only valid for the exact data and protocol (seed, candidate
count, eval-200 seed) it was written from: reused for anything else, its test targets can
sit inside the data a model is fit on, and every number looks better than it is. So the
default folder is named by the dataset's fingerprint and the protocol, and a folder is
reused only after its manifest, its task format and its files' hashes are checked.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from starrec.data.errors import DataError
from starrec.data.schema import Dataset
from starrec.data.tasks import (
    EVAL_SEED,
    N_CANDIDATES,
    TASK_FORMAT,
    Task,
    load_tasks,
    manifest_beside,
    prepare,
    validate_tasks,
)

log = logging.getLogger(__name__)


def protocol(seed: int) -> dict[str, int]:
    """What, beside the data, decides a task set's content."""
    return {"task_format": TASK_FORMAT, "seed": seed, "n_candidates": N_CANDIDATES,
            "eval_seed": EVAL_SEED}


def default_folder(spec: str, fingerprint: str, seed: int) -> Path:
    """`$STAR_HOME/data/<dataset>/<fingerprint>-seed<S>-n<N>-eval<E>`: a changed dataset
    or protocol gets a folder of its own, and the old one stays valid for the old data."""
    from starrec.data.registry import dataset_slug
    from starrec.paths import prepared_dir

    key = f"{fingerprint}-seed{seed}-n{N_CANDIDATES}-eval{EVAL_SEED}-v{TASK_FORMAT}"
    return prepared_dir(dataset_slug(spec)) / key


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_differences(folder: Path, fingerprint: str, seed: int) -> list[str]:
    """Why `folder` is not the task set of this data and protocol ([] if it is)."""
    manifest = manifest_beside(folder / "manifest.json")
    if manifest is None:
        return ["it has no manifest.json"]
    differences = []
    recorded = manifest.get("data_fingerprint")
    if recorded != fingerprint:
        differences.append(f"data_fingerprint {recorded} (the data now: {fingerprint})")
    for key, value in protocol(seed).items():
        if manifest.get(key) != value:
            differences.append(f"{key} {manifest.get(key)} (wanted: {value})")
    for name, entry in (manifest.get("files") or {}).items():
        path = folder / name
        if not path.exists():
            differences.append(f"{name} is missing")
        elif _sha256(path) != entry.get("sha256"):
            differences.append(f"{name} was changed after it was written (sha256 differs)")
    if not manifest.get("files"):
        differences.append("its manifest lists no files")
    return differences


def prepared_tasks(spec: str, source: str = "auto", seed: int = 0, out: Path | None = None, *,
                   dataset: Dataset | None = None) -> Path:
    """The folder with the task files of dataset `spec` under the protocol of `seed`.

    Without `out`: the default folder of the data's fingerprint, written now unless it
    already holds exactly these tasks (a folder that differs, e.g. edited files, is
    written again). With `out`: that folder, written if it has no manifest; one written
    for other data or another protocol stops with a DataError naming what differs (an
    explicit folder is never overwritten behind the user's back). `dataset` is `spec`
    already loaded, to avoid reading it twice.
    """
    if dataset is None:
        from starrec.data.registry import load_dataset

        dataset = load_dataset(spec, source)
    fingerprint = dataset.fingerprint()
    folder = out if out is not None else default_folder(spec, fingerprint, seed)
    if (folder / "manifest.json").exists():
        differences = folder_differences(folder, fingerprint, seed)
        if not differences:
            return folder
        if out is not None:
            raise DataError(
                "this task folder was not prepared from this data and protocol: "
                + "; ".join(differences)
                + ". Run `star data prepare --out` on it to rewrite it, or choose another folder",
                path=folder,
            )
        log.warning("%s: prepared again: %s", folder, "; ".join(differences))
    log.info("%s: preparing the task files", folder)
    prepare(dataset, folder, seed=seed)
    return folder


def load_task_set(path: str | Path, dataset: Dataset | None = None,
                  limit: int | None = None) -> list[Task]:
    """The tasks of a file, each record checked (`starrec.data.tasks.parse_task`), and,
    given the dataset they will be scored on, checked against it (`validate_tasks`)."""
    tasks = load_tasks(path, limit)
    if dataset is not None:
        validate_tasks(tasks, dataset, path)
    return tasks
