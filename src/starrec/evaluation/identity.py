"""Who answered a records file: the identity a resumed evaluation must match.

A long LLM evaluation resumes from its per-task records file. Resuming on task ids alone
once reported one model's answers under another model's name (same `--out`, another
`--model`), so the file now opens with the identity of the run that wrote it, and a
resume with another identity stops and names the fields that differ. The same hashes
go into every results JSON as its provenance (`starrec.evaluation.provenance`).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Any

from starrec.core import Task
from starrec.core.fingerprint import model_hash

# settings that change where or how fast answers come, not what they are: a resume may
# change them (more threads, a longer timeout); the model itself is identified by its hash.
# `llm` is the LLM section of the system that answers (mars.llm or student.llm), which
# `starrec.experiment.llm_identity_params` puts where the one old `llm` section was
OPERATIONAL_KEYS = ("model", "fit_s", "llm.model", "llm.api_key_env", "llm.timeout_s",
                    "llm.max_retries", "llm.backoff_s", "llm.endpoint_cooldown_s",
                    "llm.concurrency", "llm.threads",
                    # how a store is computed, not what it holds (both engines write the same)
                    "params.engine", "params.duckdb_memory_limit", "params.duckdb_threads")
# settings where only whether they are set decides the answers: a served model or one in
# process. Which servers answer may change on a resume (an endpoint added or replaced)
WHETHER_SET_KEYS = ("llm.base_url",)
# settings added after records files were written: left out of the hash while at their
# default, so that those files still resume
UNHASHED_DEFAULTS: dict[str, Any] = {"llm.served_model": None,
                                     # a SASRec baseline's settings, and the cst store's
                                     "params.negative_sampling": "uniform",
                                     "params.latent_sasrec.negative_sampling": "uniform"}


@dataclass(frozen=True)
class RunIdentity:
    """What decides a run's answers. `model` is the spec as given (for reading);
    `model_hash` identifies it (files or card; the spec itself for a hub id or an
    endpoint); `config_hash` covers the settings that change answers; `tasks_sha256` is
    the task file's sha256; `code_version` the package version and git commit."""

    system: str
    model: str | None = None
    model_hash: str | None = None
    config_hash: str | None = None
    tasks_sha256: str | None = None
    code_version: str = ""

    # fields a resume must match; a new code version is recorded, not refused, so that a
    # three-hour run survives a commit (the records file says where the code changed)
    BINDING = ("system", "model_hash", "config_hash", "tasks_sha256")

    def differences(self, other: RunIdentity) -> list[str]:
        """The binding fields whose values differ, as "field: here -> there"."""
        return [f"{name}: {getattr(self, name)!r} -> {getattr(other, name)!r}"
                for name in self.BINDING if getattr(self, name) != getattr(other, name)]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> RunIdentity:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in known})


def run_identity(system: str, tasks: Sequence[Task], config: Mapping[str, Any] | None = None,
                 model: str | Path | None = None, tasks_path: Path | None = None) -> RunIdentity:
    """The identity of `system` answering `tasks` under `config` with `model`. With
    `tasks_path` the task file's sha256 identifies the tasks, so `--limit 10` and
    `--limit 20` on one file resume each other; without it, the tasks' own lines do."""
    return RunIdentity(
        system=system,
        model=str(model) if model is not None else None,
        model_hash=model_hash(model),
        config_hash=config_hash(config) if config is not None else None,
        tasks_sha256=file_sha256(tasks_path) if tasks_path is not None else tasks_sha256(tasks),
        code_version=code_version(),
    )


def canonical_json(value: Any) -> str:
    """One text per value: sorted keys, pydantic models as their dumps."""
    return json.dumps(value, sort_keys=True, ensure_ascii=False, default=_plain)


def _plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot hash a {type(value).__name__} in a configuration")


def _parent(config: Any, dotted: str) -> tuple[dict | None, str]:
    """The dict holding a dotted key, and the key's last part (None: no such dict)."""
    *heads, last = dotted.split(".")
    for head in heads:
        if not isinstance(config, dict) or head not in config:
            return None, last
        config = config[head]
    return (config, last) if isinstance(config, dict) else (None, last)


def identity_settings(config: Mapping[str, Any] | Any,
                      ignore: Iterable[str] = OPERATIONAL_KEYS) -> Any:
    """The configuration as its hash sees it: plain JSON values, without the (dotted)
    keys in `ignore` or the newer settings still at their default, and with the
    settings of `WHETHER_SET_KEYS` reduced to whether they are set."""
    plain = json.loads(canonical_json(config))
    for key in ignore:
        parent, last = _parent(plain, key)
        if parent is not None:
            parent.pop(last, None)
    for key, default in UNHASHED_DEFAULTS.items():
        parent, last = _parent(plain, key)
        if parent is not None and last in parent and parent[last] == default:
            del parent[last]
    for key in WHETHER_SET_KEYS:
        parent, last = _parent(plain, key)
        if parent is not None and parent.get(last) is not None:
            parent[last] = "set"
    return plain


def config_hash(config: Mapping[str, Any] | Any, ignore: Iterable[str] = OPERATIONAL_KEYS) -> str:
    """16 hex digits of sha256 over the configuration's canonical JSON as
    `identity_settings` gives it: two runs with the same hash answer alike."""
    plain = identity_settings(config, ignore)
    return hashlib.sha256(canonical_json(plain).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tasks_sha256(tasks: Iterable[Task]) -> str:
    """sha256 of the tasks as a task file holds them: equal to the file's sha256 when
    the tasks are a whole file written by `star data prepare`."""
    return hashlib.sha256("".join(t.to_json() + "\n" for t in tasks).encode()).hexdigest()


def _git(folder: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                              timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


@lru_cache(maxsize=1)
def code_version() -> str:
    """The package version, plus `+g<commit>` when the package runs from a git checkout
    of this project (`.dirty` when tracked files differ from that commit)."""
    import starrec

    version = starrec.__version__
    package = Path(starrec.__file__).resolve().parent
    top = _git(package, "rev-parse", "--show-toplevel")
    # a package installed into a venv that happens to sit in some repository is not that
    # repository's code
    if not top or package != (Path(top) / "src" / "starrec").resolve():
        return version
    commit = _git(package, "rev-parse", "HEAD")
    if not commit:
        return version
    dirty = _git(package, "status", "--porcelain", "--untracked-files=no")
    return f"{version}+g{commit[:12]}{'.dirty' if dirty else ''}"
