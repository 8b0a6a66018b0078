"""The library under the `star` command line: task sets, evidence stores, systems by
name, and their evaluation.

Everything the CLI does is a call here, so a notebook or a script gets the same
guarantees as `star eval`:

- a task set is prepared from the data it will be scored on and checked against it
  (`prepare_tasks`, `load_task_set`: the folder is keyed by the data's fingerprint);
- an evidence store is built from a task set, never from raw interactions, after the
  leak guard (`evidence_store`): building one from `dataset.interactions` would put the
  test targets into the evidence;
- a system is made by name, bound to a task set (`make_system`), the one way the CLI,
  the pipeline and the HTTP service make them;
- an evaluation of an LLM system opens its records file with the run's identity, so a
  resume never mixes two systems' answers (`evaluate`).

    import starrec
    tasks = starrec.load_task_set("ml-100k", users="eval-200")
    print(starrec.evaluate("pop", tasks).metrics["AvgHR"])
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starrec.config import StarConfig

if TYPE_CHECKING:
    from starrec.core import System, Task
    from starrec.cst.store import EvidenceStore
    from starrec.data.schema import Dataset
    from starrec.evaluation.runner import TaskRecord
    from starrec.llm.base import ChatModel
    from starrec.trajectories.recorder import TeachSummary, TrajectoryWriter

# one list of the score-based systems: the registry's (imported lazily elsewhere would cost
# nothing here: the registry module imports no model code)
from starrec.baselines.registry import BASELINES as BASELINE_SYSTEMS  # noqa: E402
from starrec.baselines.registry import RANKERS as RANKER_SYSTEMS  # noqa: E402
from starrec.baselines.registry import CST_RANKERS as CST_SYSTEMS  # noqa: E402

LLM_SYSTEMS = ("mars", "star")
SYSTEMS = (*RANKER_SYSTEMS, *LLM_SYSTEMS)
USER_SETS = ("all", "eval-200", "valid-200")
# the split each set of users is drawn from (DESIGN.md 3.2)
USER_SET_SPLIT = {"eval-200": "test", "valid-200": "valid"}


@dataclass
class TaskSet:
    """Tasks of one split checked against the dataset they are scored on, with the spec
    the dataset was named by (it names the store's folder) and the file they came from
    (its sha256 is provenance; None for tasks built in memory)."""

    dataset: Dataset
    tasks: list[Task]
    spec: str
    path: Path | None = None
    users: str = "all"
    scenario: str = "classic"

    @property
    def split(self) -> str:
        """The one split of the tasks (ValueError when they mix splits: a store and a fit
        serve one split at a time)."""
        from starrec.evaluation.runner import split_of

        return split_of(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)


@dataclass
class Evaluation:
    """A system's results JSON (DESIGN.md 7, metrics x100) and its per-task records."""

    result: dict[str, Any]
    records: list[TaskRecord] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, Any]:
        return self.result["metrics"]

    def write(self, path: str | Path) -> Path:
        """The results JSON at `path` and its per-task file beside it (for `star report
        --paired`); returns the per-task file's path."""
        from starrec.evaluation.runner import write_results

        return write_results(self.result, self.records, Path(path))


def _config(config: StarConfig | None) -> StarConfig:
    return config if config is not None else StarConfig()


def open_dataset(dataset: str | Dataset, config: StarConfig | None = None,
                 spec: str | None = None) -> tuple[Dataset, str]:
    """(the dataset, its spec): a spec is loaded with the config's source and columns; a
    loaded dataset goes by `spec` (the spec it was loaded from, which names its task and
    store folders), else by its name."""
    if isinstance(dataset, str):
        from starrec.data.registry import load_dataset

        cfg = _config(config)
        return load_dataset(dataset, cfg.data.source, cfg.data.columns), dataset
    return dataset, spec or dataset.name


def prepare_tasks(dataset: str | Dataset = "ml-100k", config: StarConfig | None = None, *,
                  seed: int | None = None, out: str | Path | None = None,
                  rewrite: bool = False, spec: str | None = None) -> Path:
    """The folder of the dataset's task files (train / valid / test, eval-200, valid-200
    and the scenario variants, with a manifest).

    Without `out` it is the default folder keyed by the data's fingerprint and the
    protocol, written only when missing or different, so changed data gets new tasks.
    An explicit `out` prepared from other data is refused (DataError) unless `rewrite`,
    which writes it again (`star data prepare`). `spec` names a loaded `dataset`
    (`open_dataset`)."""
    cfg = _config(config)
    seed = cfg.data.seed if seed is None else seed
    loaded, spec = open_dataset(dataset, cfg, spec)
    if rewrite:
        from starrec.data.prepared import default_folder
        from starrec.data.tasks import prepare

        folder = Path(out) if out is not None else default_folder(spec, loaded.fingerprint(), seed)
        prepare(loaded, folder, seed=seed)
        return folder
    from starrec.data.prepared import prepared_tasks

    return prepared_tasks(spec, cfg.data.source, seed, Path(out) if out else None, dataset=loaded)


def task_split(users: str, split: str | None, default: str = "test") -> str:
    """The split of a prepared task set: the one `users` implies, else `split`, else
    `default`; ValueError when `users` and `split` disagree."""
    if users not in USER_SETS:
        raise ValueError(f"users {users!r}: expected one of {', '.join(USER_SETS)}")
    implied = USER_SET_SPLIT.get(users)
    if implied is None:
        return split or default
    if split is not None and split != implied:
        raise ValueError(f"--users {users} is a set of {implied} tasks; it contradicts "
                         f"--split {split}")
    return implied


def task_file(dataset: str | Dataset = "ml-100k", config: StarConfig | None = None, *,
              split: str | None = None, users: str = "all", scenario: str = "classic",
              default_split: str = "test", spec: str | None = None) -> Path:
    """The prepared task file of split / users / scenario (prepared now for this data if
    needed)."""
    chosen = task_split(users, split, default_split)
    stem = users if users in USER_SET_SPLIT else chosen
    if scenario != "classic":
        stem = f"{stem}-{scenario}"
    return prepare_tasks(dataset, config, spec=spec) / f"{stem}.jsonl"


def load_task_set(dataset: str | Dataset = "ml-100k", config: StarConfig | None = None, *,
                  split: str | None = None, users: str = "all", scenario: str = "classic",
                  limit: int | None = None, tasks: str | Path | None = None,
                  default_split: str = "test", spec: str | None = None) -> TaskSet:
    """A task set checked against the data it will be scored on (unknown ids, a target
    not where its split puts it: DataError): the file `tasks`, or the prepared file of
    split / users / scenario. `split` None means: the one `users` implies, else
    `default_split`; ValueError when `users` and `split` disagree. `spec` names a loaded
    `dataset` (`open_dataset`)."""
    from starrec.data.prepared import load_task_set as read_task_set

    cfg = _config(config)
    if tasks is None:
        task_split(users, split, default_split)  # a contradiction stops before data is read
    loaded, spec = open_dataset(dataset, cfg, spec)
    if tasks is not None:
        path = Path(tasks)
    else:
        path = task_file(loaded, cfg, split=split, users=users, scenario=scenario,
                         default_split=default_split, spec=spec)
    task_list = read_task_set(path, loaded, limit)
    if not task_list:
        raise ValueError(f"{path}: no tasks")
    return TaskSet(loaded, task_list, spec, path, users, scenario)


def evidence_store_path(task_set: TaskSet, config: StarConfig | None = None, *,
                        out: str | Path | None = None, progress: bool = True,
                        fit_ranker: bool = True) -> Path:
    """The evidence store serving exactly this task set (DESIGN.md 3.3), built if needed:
    each task user's interactions only up to the task's cutoff, checked to hold no task's
    target nor anything after it before anything is built (LeakError). With
    `cst.ranker: learned` (and `fit_ranker`), the store also gets its learned ranker
    (`_fit_learned_ranker`)."""
    from starrec.cst.store import ensure_store
    from starrec.data.registry import dataset_slug
    from starrec.data.splits import check_no_leak, task_interactions

    cfg = _config(config)
    splits = sorted({t.split for t in task_set.tasks})
    if len(splits) != 1:
        raise ValueError(f"tasks mix splits {splits}; a store serves one split at a time")
    split = splits[0]
    allowed = task_interactions(task_set.dataset, task_set.tasks, split)
    check_no_leak(task_set.tasks, allowed, where=f"evidence store of the {split} tasks")
    path = ensure_store(allowed, task_set.dataset.items, cfg.cst,
                        dataset=dataset_slug(task_set.spec), split=split,
                        path=Path(out) if out is not None else None, progress=progress)
    if fit_ranker and cfg.cst.ranker == "learned":
        _fit_learned_ranker(task_set, cfg, path, progress)
    return path


def _fit_learned_ranker(task_set: TaskSet, cfg: StarConfig, path: Path, progress: bool) -> None:
    """The learned cst ranker of the store at `path` (`starrec.cst.learned`), fitted once
    on every task of the split before the store's (valid for a test store, train for a
    valid store; never test tasks), each with its features from the store serving that
    split, which never saw its targets. A train store has no split before it."""
    from starrec.cst.learned import RANKER_FIT_SPLIT, ensure_learned_ranker

    fit_split = RANKER_FIT_SPLIT.get(task_set.split)
    if fit_split is None:
        return
    fit_set = load_task_set(task_set.dataset, cfg, split=fit_split, spec=task_set.spec)
    fit_store = evidence_store(fit_set, cfg, progress=progress, fit_ranker=False)
    try:
        ensure_learned_ranker(path, fit_store, fit_set.tasks, cfg.cst, progress=progress)
    finally:
        fit_store.close()


def evidence_store(task_set: TaskSet, config: StarConfig | None = None, *,
                   out: str | Path | None = None, progress: bool = True,
                   fit_ranker: bool = True) -> EvidenceStore:
    """The evidence store of `task_set`, opened (`evidence_store_path` builds it)."""
    from starrec.cst.store import EvidenceStore

    return EvidenceStore(evidence_store_path(task_set, config, out=out, progress=progress,
                                             fit_ranker=fit_ranker))


def make_system(name: str, task_set: TaskSet, config: StarConfig | None = None,
                model: str | Path | None = None, *, store: EvidenceStore | None = None,
                chat_model: ChatModel | None = None,
                writer: TrajectoryWriter | None = None) -> System:
    """System `name` bound to `task_set`: a baseline fitted on what the set's split
    allows (leak-checked against its tasks); `cst` (the store's learned ranker) or
    `cst-manual` (the hand-set weights) over the set's evidence store; the
    `mars` teacher or a `star` student (`model`: a student folder, whose card gives the
    format it was trained on) reading that store.

    `store` is the set's store if the caller has it open; `chat_model` replaces loading
    one (a server client, a scripted model); `writer` receives the teacher's full runs.
    An LLM's model is preflighted as it loads: one that cannot answer raises LLMError
    here, before the first task."""
    cfg = _config(config)
    if name not in SYSTEMS:
        raise ValueError(f"unknown system {name!r}; expected one of {', '.join(SYSTEMS)}")
    if name in BASELINE_SYSTEMS:
        from starrec.baselines.registry import make_recommender
        from starrec.evaluation.runner import RecommenderSystem, fit_recommender

        recommender = make_recommender(name, cfg, task_set.dataset.name)
        fit_recommender(recommender, task_set.dataset, task_set.split, task_set.tasks)
        return RecommenderSystem(recommender)
    store = store if store is not None else evidence_store(task_set, cfg)
    if name in CST_SYSTEMS:
        from starrec.cst.ranker import CSTRanker, ManualCSTRanker
        from starrec.evaluation.runner import RecommenderSystem

        ranker = CSTRanker if name == "cst" else ManualCSTRanker
        return RecommenderSystem(ranker.on_store(store, cfg.cst))
    if name == "star":
        if chat_model is not None:
            return _student_on(chat_model, model, store, cfg)
        from starrec.inference.system import load_star_system

        if model is None:
            raise ValueError("--system star needs --model DIR (a distilled student)")
        return load_star_system(model, store, cfg)
    from starrec.agents.mars import MarsTeacher
    from starrec.agents.system import MarsSystem

    if chat_model is None:
        from starrec.llm.models import load_chat_model

        chat_model = load_chat_model(str(model) if model is not None else None, cfg.mars.llm)
    return MarsSystem(MarsTeacher(chat_model, store, cfg.mars), writer)


def _student_on(chat_model: ChatModel, model: str | Path | None, store: EvidenceStore,
                cfg: StarConfig) -> System:
    """A student answering through `chat_model`, in the format of the card of `model`
    when that is a student folder (the format it was trained on), else the full one."""
    from starrec.config import StudentFormatConfig
    from starrec.inference.student import Student
    from starrec.inference.system import StarSystem
    from starrec.llm.card import read_model_card

    card = read_model_card(model) if model is not None and Path(model).is_dir() else None
    return StarSystem(Student(
        chat_model, store, card.format if card else StudentFormatConfig(), cfg.student,
        plan_choices=card.plan_choices if card else [],
        reflection_cap=card.max_reflection_tokens if card else None))


def evaluate(system: str | System, task_set: TaskSet, config: StarConfig | None = None, *,
             model: str | Path | None = None, records: str | Path | None = None,
             fresh: bool = False, trajectories: str | Path | None = None,
             chat_model: ChatModel | None = None) -> Evaluation:
    """Evaluate a system on a task set: results (metrics x100, provenance) and one record
    per task.

    `system` is a name (made by `make_system`) or a System already made. A baseline named
    here is fitted and timed as `star eval` fits it. An LLM system (`mars`, `star`) is
    resumed from `records` when that file was written by the same system, model,
    configuration and task file (another identity is refused; `fresh` starts it over);
    the teacher also appends its full runs to `trajectories`. A served model answers
    `mars.llm.concurrency` (`student.llm.concurrency`) tasks at once (records written as
    they finish, results in task order); an in-process one answers them one by one. The
    results' config names the task file, its users and its scenario."""
    evaluation = _evaluate(system, task_set, _config(config), model, records, fresh,
                           trajectories, chat_model)
    evaluation.result["config"].update(
        tasks=task_set.path.name if task_set.path else None, users=task_set.users,
        scenario=task_set.scenario)
    return evaluation


def _evaluate(system: str | System, task_set: TaskSet, cfg: StarConfig,
              model: str | Path | None, records: str | Path | None, fresh: bool,
              trajectories: str | Path | None, chat_model: ChatModel | None) -> Evaluation:
    loaded = task_set.dataset
    if not isinstance(system, str):
        from starrec.evaluation.runner import evaluate_system

        result, rows = evaluate_system(system, loaded.name, task_set.tasks, cfg, {},
                                       checkpoint=Path(records) if records else None,
                                       dataset_fingerprint=loaded.fingerprint())
        return Evaluation(result, rows)
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}; expected one of {', '.join(SYSTEMS)}")
    if system in CST_SYSTEMS:
        return _evaluate_cst(system, task_set, cfg)
    if system in RANKER_SYSTEMS:
        from starrec.evaluation.runner import evaluate_baseline

        result, rows = evaluate_baseline(system, loaded, task_set.tasks, cfg,
                                         tasks_path=task_set.path)
        return Evaluation(result, rows)
    if system == "star" and model is None and chat_model is None:
        raise ValueError("--system star needs --model DIR (a distilled student)")
    if records is not None and fresh:
        Path(records).unlink(missing_ok=True)
    return _evaluate_llm(system, task_set, cfg, model, Path(records) if records else None,
                         Path(trajectories) if trajectories else None, chat_model)


def evaluate_with_subset(system: str, task_set: TaskSet, subset: TaskSet,
                         config: StarConfig | None = None, *,
                         model: str | Path | None = None, records: str | Path | None = None,
                         chat_model: ChatModel | None = None) -> tuple[Evaluation, Evaluation]:
    """A system fitted (a ranker) or loaded (an LLM system) and run once on `task_set`
    (all test users), and the same run restricted to the tasks of `subset` (eval-200): one
    fit and one pass serve both numbers, so they cannot disagree about the model. `model`,
    `records` and `chat_model` are `evaluate`'s, for an LLM system (its records resume the
    whole run). The subset's results carry its own task file in their provenance."""
    from starrec.evaluation.identity import file_sha256
    from starrec.evaluation.runner import subset_result

    cfg = _config(config)
    ids = {t.task_id for t in subset.tasks}
    by_id = {t.task_id: t for t in task_set.tasks}
    missing = [t.task_id for t in subset.tasks if by_id.get(t.task_id) != t]
    if missing:
        raise ValueError(f"{len(missing)} task(s) of the subset are not tasks of the set, "
                         f"e.g. {missing[0]}")
    everyone = evaluate(system, task_set, cfg, model=model, records=records,
                        chat_model=chat_model)
    result = subset_result(everyone.result, everyone.records, ids, cfg,
                           tasks_sha256=file_sha256(subset.path) if subset.path else None)
    result["config"].update(tasks=subset.path.name if subset.path else None, users=subset.users)
    return everyone, Evaluation(result, [r for r in everyone.records if r.task_id in ids])


def _evaluate_cst(system: str, task_set: TaskSet, cfg: StarConfig) -> Evaluation:
    """A cst ranker over the task set's store, as `make_system` makes it (the learned one
    needs the split before, which a baseline's fit data does not carry), evaluated with
    what it ranked with in its identity: the store, and the learned ranker's key."""
    import time

    from starrec.evaluation.identity import run_identity
    from starrec.evaluation.runner import evaluate_system

    start = time.perf_counter()
    made = make_system(system, task_set, cfg)
    ranker = made.recommender  # type: ignore[attr-defined]
    fitted = {"ranker": ranker.kind, "ranker_key": ranker.model.key if ranker.model else None,
              "cst_store": ranker.store.path.name}
    params = {"params": cfg.cst.model_dump(), **fitted,
              "fit_s": round(time.perf_counter() - start, 3)}
    identity = run_identity(system, task_set.tasks,
                            {"system": system, "params": params["params"], **fitted},
                            tasks_path=task_set.path)
    result, rows = evaluate_system(made, task_set.dataset.name, task_set.tasks, cfg, params,
                                   identity=identity,
                                   dataset_fingerprint=task_set.dataset.fingerprint())
    return Evaluation(result, rows)


def _evaluate_llm(system: str, task_set: TaskSet, cfg: StarConfig, model: str | Path | None,
                  records: Path | None, trajectories: Path | None,
                  chat_model: ChatModel | None) -> Evaluation:
    """The teacher or a student with a records identity: the system, its settings, the
    model and the task file, so a resume continues only the same run."""
    from starrec.evaluation.identity import run_identity
    from starrec.evaluation.runner import evaluate_system
    from starrec.llm.concurrency import task_concurrency
    from starrec.trajectories.recorder import TrajectoryWriter

    store_path = evidence_store_path(task_set, cfg)
    llm = (cfg.mars if system == "mars" else cfg.student).llm
    params = llm_identity_params(system, cfg, model, store_path.name)
    spec = params["model"]
    with ExitStack() as stack:  # the trajectories' lock is released however this ends
        writer = (stack.enter_context(TrajectoryWriter(trajectories))
                  if trajectories is not None and system == "mars" else None)
        from starrec.cst.store import EvidenceStore

        llm_system = make_system(system, task_set, cfg, model, store=EvidenceStore(store_path),
                                 chat_model=chat_model, writer=writer)
        student = getattr(llm_system, "student", None)
        if student is not None:  # a student is shown the candidates as its card's format says
            params["candidate_order"] = student.fmt.candidate_order
            params["format"] = student.fmt.model_dump()
        identity = run_identity(system, task_set.tasks, params, model=spec,
                                tasks_path=task_set.path)
        # a served model answers `llm.concurrency` tasks at once, each thread with a
        # system of its own (its store connection) around the one loaded model
        served = _chat_model_of(llm_system)
        concurrency = task_concurrency(served if served is not None else llm_system,
                                       llm.concurrency)

        def another_system() -> System:
            return make_system(system, task_set, cfg, model, store=EvidenceStore(store_path),
                               chat_model=served, writer=writer)

        result, rows = evaluate_system(llm_system, task_set.dataset.name, task_set.tasks, cfg,
                                       params, checkpoint=records, identity=identity,
                                       dataset_fingerprint=task_set.dataset.fingerprint(),
                                       concurrency=concurrency, make_system=another_system)
    return Evaluation(result, rows)


def llm_identity_params(system: str, cfg: StarConfig, model: str | Path | None,
                        store_name: str) -> dict[str, Any]:
    """The settings a teacher (`mars`) or student (`star`) run's records identity hashes,
    before a student's card adds its format: the system's section without its LLM,
    the model spec, the LLM's settings under "llm" and the evidence store's name. The
    LLM's settings stay out of "params" and go under "llm" as in the records written
    before the teacher and the student had an `llm` each, so that an unchanged teacher
    setup hashes as it did (`starrec.evaluation.identity` leaves out what changes only
    where or how fast answers come)."""
    section = cfg.mars if system == "mars" else cfg.student
    params: dict[str, Any] = {
        "params": section.model_dump(exclude={"llm"}),
        "model": str(model) if model is not None else section.llm.model,
        "llm": section.llm.model_dump(), "cst_store": store_name}
    if system == "mars":  # what the teacher is shown (DESIGN.md 3.7), for every table
        params["candidate_order"] = cfg.mars.candidate_order
    return params


def _chat_model_of(llm_system: System) -> ChatModel | None:
    """The chat model a teacher or a generating student answers with; None for a system
    that reads a ranking head's logits in process."""
    from starrec.agents.system import MarsSystem
    from starrec.inference.system import StarSystem

    if isinstance(llm_system, MarsSystem):
        return llm_system.teacher.model
    if isinstance(llm_system, StarSystem):
        return llm_system.student.model
    return None


def teach(task_set: TaskSet, config: StarConfig | None = None, *, out: str | Path,
          model: str | None = None, samples: int = 1, retry_errors: bool = False,
          chat_model: ChatModel | None = None) -> TeachSummary:
    """Teacher runs of a task set appended to `out` (resumed where it exists), each run
    reading the evidence store built from exactly what these tasks may see;
    `mars.llm.concurrency` runs at once when the model is served. The model is loaded and
    preflighted first, so one that cannot answer stops before the store is built or any
    task is run."""
    from dataclasses import replace

    from starrec.agents.mars import MarsTeacher
    from starrec.cst.store import EvidenceStore
    from starrec.evaluation.runner import split_of
    from starrec.llm import models
    from starrec.llm.concurrency import task_concurrency
    from starrec.trajectories.recorder import run_teacher

    cfg = _config(config)
    split_of(task_set.tasks)  # one split, before the model loads
    if chat_model is None:
        chat_model = models.load_chat_model(model, cfg.mars.llm)
    store = evidence_store_path(task_set, cfg)

    def teacher() -> MarsTeacher:
        return MarsTeacher(chat_model, EvidenceStore(store), cfg.mars)  # a connection per thread

    summary = run_teacher(teacher, task_set.tasks, Path(out), samples=samples,
                          concurrency=task_concurrency(chat_model, cfg.mars.llm.concurrency),
                          retry_errors=retry_errors)
    return replace(summary, model=chat_model.name)
