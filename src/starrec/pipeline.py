"""The main job, end to end on one dataset (`star pipeline` is this module's `run`).

1. the task files;
2. every baseline and the `cst` ranker on the test tasks, all users and eval-200;
3. the teacher on the train tasks of `pipeline.teacher_tasks` users;
4. the student fine-tuned on the teacher's successful train runs (SFT);
5. GRPO of that student on train tasks (`pipeline.grpo`, the `grpo` section);
6. the students and the teacher on the first `pipeline.llm_eval_tasks` of eval-200, the
   SFT student also with `student.constrain` off (`pipeline.unconstrained`);
7. one table of every result (written also when a later stage failed).

Every stage keeps its output under `out` and is skipped or resumed when that output
exists, so after a stop the same call goes on where it stopped. Each stage's wall time
is kept in `out/stages.json` (the latest run of each stage) and shown under the table.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starrec.config import StarConfig

if TYPE_CHECKING:
    from starrec.core import Task
    from starrec.data.schema import Dataset

STAGES_FILE = "stages.json"


@dataclass
class StageTime:
    stage: str
    seconds: float
    status: str  # ran | resumed (its output existed) | skipped: why | failed: why


@dataclass
class PipelineRun:
    """What a pipeline call produced: every results dict (the report's rows) and the
    stages with their wall times."""

    results: list[dict[str, Any]] = field(default_factory=list)
    stages: list[StageTime] = field(default_factory=list)

    def stage_table(self) -> str:
        lines = ["| stage | wall time | status |", "|---|---|---|"]
        lines += [f"| {s.stage} | {_clock(s.seconds)} | {s.status} |" for s in self.stages]
        total = sum(s.seconds for s in self.stages)
        return "\n".join(lines + [f"| all | {_clock(total)} | |"])


def _clock(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} m {rest:02d} s" if minutes else f"{rest} s"


class Pipeline:
    """The stages of the main job over one dataset, writing under `out`. `echo` receives
    one line per event (the CLI prints them)."""

    def __init__(self, dataset: str, config: StarConfig, out: str | Path, *,
                 model: str | None = None, echo: Callable[[str], None] = print) -> None:
        self.spec = dataset
        self.cfg = config
        self.out = Path(out)
        self.model = model
        self.echo = echo
        self.run_state = PipelineRun()
        self._loaded: Dataset | None = None
        self._folder: Path | None = None

    # --- bookkeeping -------------------------------------------------------------------

    @property
    def slug(self) -> str:
        from starrec.data.registry import dataset_slug

        return dataset_slug(self.spec)

    @contextmanager
    def stage(self, name: str) -> Iterator[StageTime]:
        """Time a stage; its status may be set by the body. A failure is recorded, then
        raised."""
        record = StageTime(name, 0.0, "ran")
        started = time.perf_counter()
        try:
            yield record
        except BaseException as error:
            record.status = f"failed: {type(error).__name__}"
            raise
        finally:
            record.seconds = time.perf_counter() - started
            self.run_state.stages.append(record)
            self._write_stages()

    def _write_stages(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / STAGES_FILE
        kept = json.loads(path.read_text()) if path.exists() else {}
        for record in self.run_state.stages:
            kept[record.stage] = asdict(record)
        path.write_text(json.dumps(kept, indent=1) + "\n", encoding="utf-8")

    # --- stages ------------------------------------------------------------------------

    def run(self) -> PipelineRun:
        """Every stage in order (the LLM ones with `pipeline.llm`); what finished stays in
        `run_state` when a later stage raises."""
        with self.stage("tasks"):
            self.tasks_folder()
        with self.stage("baselines and cst"):
            self.baselines()
        if self.cfg.pipeline.llm:
            self.llm_stages()
        return self.run_state

    def dataset(self) -> Dataset:
        if self._loaded is None:
            from starrec.data.registry import load_dataset

            self._loaded = load_dataset(self.spec, self.cfg.data.source, self.cfg.data.columns)
        return self._loaded

    def tasks_folder(self) -> Path:
        if self._folder is None:
            from starrec.experiment import prepare_tasks

            self._folder = prepare_tasks(self.dataset(), self.cfg, spec=self.spec)
        return self._folder

    def baselines(self) -> None:
        """Each system fitted once, evaluated on all test users and on eval-200; a system
        whose two results files exist is read back, not refitted."""
        from starrec.data.tasks import load_tasks
        from starrec.evaluation.report import load_results
        from starrec.experiment import TaskSet, evaluate_with_subset

        folder = self.tasks_folder()
        # the cst rankers need the task set (their store, and the split before it to learn on)
        everyone = TaskSet(self.dataset(), load_tasks(folder / "test.jsonl"), self.spec,
                           folder / "test.jsonl")
        eval_200 = TaskSet(everyone.dataset, load_tasks(folder / "eval-200.jsonl"), self.spec,
                           folder / "eval-200.jsonl", users="eval-200")
        for name in self.cfg.pipeline.systems:
            paths = [self.out / f"{self.slug}-{name}-test-{users}.json"
                     for users in ("all", "eval-200")]
            if all(p.exists() for p in paths):
                self.run_state.results += load_results(paths)
                continue
            for evaluation, path in zip(evaluate_with_subset(name, everyone, eval_200, self.cfg),
                                        paths):
                evaluation.write(path)  # with its per-task file beside it
                self.run_state.results.append(evaluation.result)

    def llm_stages(self) -> None:
        """Teacher runs on train tasks, SFT, GRPO, then the students and the teacher
        evaluated; each result is kept as soon as it exists."""
        from starrec.data.tasks import load_tasks

        settings = self.cfg.pipeline
        folder = self.tasks_folder()
        train_all = load_tasks(folder / "train.jsonl")
        train = teacher_sample(train_all, settings.teacher_tasks, self.cfg.data.seed)
        trajectories = self.out / "teacher" / "train.jsonl"
        with self.stage("teacher (train tasks)"):
            self.teach(train, trajectories)
        student = self.out / "student"
        with self.stage("sft") as record:
            record.status = self.train_student(trajectories, student, {t.task_id for t in train})
        students = [("sft", student)]
        if settings.grpo:
            tuned = self.out / "student-grpo"
            with self.stage("grpo") as record:
                record.status = self.train_grpo(student, tuned, train_all)
            students.append(("grpo", tuned))
        eval_tasks = load_tasks(folder / "eval-200.jsonl", settings.llm_eval_tasks)
        users = ("eval-200" if settings.llm_eval_tasks is None
                 else f"eval-200-first{len(eval_tasks)}")
        # the students first: one pass per task, so their rows come long before the teacher's
        for variant, folder_ in students:
            with self.stage(f"eval star ({variant})"):
                self.run_state.results.append(self.evaluate(
                    "star", str(folder_), users, eval_tasks, variant=variant))
        if settings.unconstrained:
            free = self.cfg.model_copy(deep=True)
            free.student.constrain = False
            with self.stage("eval star (sft, unconstrained)"):
                self.run_state.results.append(self.evaluate(
                    "star", str(student), users, eval_tasks, variant="sft, unconstrained",
                    config=free))
        with self.stage("eval mars (teacher)"):
            self.run_state.results.append(self.evaluate("mars", self.model, users, eval_tasks))

    def teach(self, tasks: list[Task], out: Path) -> None:
        from starrec.experiment import TaskSet, teach

        self.echo(f"teacher: {len(tasks)} train tasks -> {out}")
        summary = teach(TaskSet(self.dataset(), tasks, self.spec), self.cfg, out=out,
                        model=self.model)
        self.echo(f"teach {summary.model}: {summary.written} run(s) written, "
                  f"{summary.done_before} already done, {summary.errors} error(s), "
                  f"{summary.fallbacks} fallback ranking(s) in {summary.seconds:.1f} s")
        if summary.interrupted:
            raise KeyboardInterrupt

    def train_student(self, trajectories: Path, student: Path, task_ids: set[str]) -> str:
        """SFT on the runs of `task_ids` into `student`, resumed from its last checkpoint;
        done once it is a model folder (delete it to train again)."""
        from starrec.llm.card import CARD_FILE
        from starrec.training.pipeline import sft_from_trajectories

        if (student / CARD_FILE).exists():
            self.echo(f"sft: {student} is trained; delete it to train again")
            return "resumed"
        result, kept = sft_from_trajectories([trajectories], student, self.cfg, self.dataset(),
                                             resume=True, task_ids=task_ids)
        self.echo(kept.table())
        self.echo(f"sft: {result.global_step} steps in {result.seconds:.0f} s -> {student}")
        return "ran"

    def train_grpo(self, student: Path, out: Path, train: list[Task]) -> str:
        """GRPO of `student` on train tasks into `out` (the `grpo` section; its base
        model is the SFT student), resumed from its last checkpoint; done once `out` is
        a model folder."""
        from starrec.data.tasks import load_tasks
        from starrec.llm.card import CARD_FILE
        from starrec.training.grpo import train_grpo_on_dataset

        if (out / CARD_FILE).exists():
            self.echo(f"grpo: {out} is trained; delete it to train again")
            return "resumed"
        cfg = self.cfg.model_copy(deep=True)
        cfg.grpo.base_model = str(student)
        valid = load_tasks(self.tasks_folder() / "valid-200.jsonl")
        result = train_grpo_on_dataset(self.dataset(), train, out, cfg, valid_tasks=valid,
                                       name=self.spec, resume=True)
        self.echo(f"grpo: {result.global_step} steps in {result.seconds:.0f} s -> {out}")
        return "ran"

    def evaluate(self, system: str, spec: str | None, users: str, tasks: list[Task], *,
                 variant: str | None = None, config: StarConfig | None = None) -> dict[str, Any]:
        """The teacher or a student on `tasks` (under `config`, default the pipeline's),
        resumed from a records file named after what answers (model and settings), so a
        changed model starts afresh, not mixed in. The teacher's full runs are kept
        beside, under `teacher/`."""
        from starrec.experiment import TaskSet, evaluate

        cfg = config or self.cfg
        slug = re.sub(r"[^a-z0-9]+", "-", variant).strip("-") if variant else None
        name = f"{system}-{slug}" if slug and slug != "sft" else system
        path = self.out / f"{self.slug}-{name}-test-{users}.json"
        self.echo(f"eval {name}: {len(tasks)} tasks -> {path}")
        key = answerer_key(system, spec, cfg)
        records = path.with_suffix(f".{key}.records.jsonl")
        runs = self.out / "teacher" / f"test-{users}.{key}.jsonl" if system == "mars" else None
        evaluation = evaluate(system, TaskSet(self.dataset(), tasks, self.spec), cfg,
                              model=spec, records=records, trajectories=runs)
        result = evaluation.result
        result["config"].update(tasks="eval-200.jsonl", users=users, scenario="classic",
                                preset=self.cfg.pipeline.preset)
        if variant:
            result["config"]["variant"] = variant
        evaluation.write(path)
        return result


def answerer_key(system: str, spec: str | None, cfg: StarConfig) -> str:
    """A short hash of what decides a system's answers: its model (a student's card:
    when it was trained and what inference reads from it, so a retrained or re-carded
    student differs) and its settings, without those that change only where or how fast
    answers come (`--concurrency`, endpoints, timeouts: `identity_settings`). Code changes
    are not in it: a records file kept across one that changes answers must be moved
    aside by hand."""
    from starrec.evaluation.identity import identity_settings
    from starrec.llm.card import read_model_card

    if system == "star":
        card = read_model_card(spec) if spec else None
        read = {"created", "format", "plan_choices", "max_reflection_tokens"}
        identity: Any = {"card": card.model_dump(mode="json", include=read) if card else None,
                         "student": cfg.student.model_dump(exclude={"llm"})}
        llm = cfg.student.llm
    else:
        identity = {"model": spec or cfg.mars.llm.model,
                    "mars": cfg.mars.model_dump(exclude={"llm"})}
        llm = cfg.mars.llm
    # the answering system's LLM where the one old `llm` section was: unchanged keys
    identity["llm"] = identity_settings({"llm": llm.model_dump()})["llm"]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]


def teacher_sample(tasks: list[Task], n: int, seed: int) -> list[Task]:
    """The tasks of `n` users drawn with `seed`, in file order. Draws are nested: a larger
    `n` keeps every user of a smaller one, so raising it extends the teacher's runs."""
    import numpy as np

    from starrec.data.splits import sorted_ids

    users = sorted_ids({task.user_id for task in tasks})
    order = np.random.default_rng(seed).permutation(len(users))
    chosen = {users[i] for i in order[:n]}
    return [task for task in tasks if task.user_id in chosen]


def run_pipeline(dataset: str, config: StarConfig, out: str | Path, *, model: str | None = None,
                 echo: Callable[[str], None] = print) -> PipelineRun:
    """`Pipeline(...).run()`: the main job on `dataset` under `out`."""
    return Pipeline(dataset, config, out, model=model, echo=echo).run()
