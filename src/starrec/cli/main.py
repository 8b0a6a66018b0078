"""The `star` command line."""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from starrec.cli.options import (
    SPLIT_CHOICES,
    ColumnsOption,
    ConfigOption,
    DatasetOption,
    LimitOption,
    ModelOption,
    ScenarioOption,
    SetOption,
    SplitOption,
    TasksOption,
    UsersOption,
    choice_option,
)
from starrec.cli.options import config_from as _config
from starrec.cli.options import fail as _fail
from starrec.config import StarConfig

if TYPE_CHECKING:
    from starrec.data.schema import Dataset
    from starrec.data.tasks import Task
    from starrec.trajectories.recorder import TrajectoryWriter

app = typer.Typer(
    help="STAR: reasoning-enhanced LLM recommendation. Prepare data, run baselines and "
    "the teacher, distil a student, evaluate and serve it.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(help="Load a dataset and write its fixed ranking tasks.", no_args_is_help=True)
app.add_typer(data_app, name="data")
cst_app = typer.Typer(
    help="Collaborative Signal Translation: build the evidence store, inspect a task's evidence.",
    no_args_is_help=True,
)
app.add_typer(cst_app, name="cst")

@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def _prepared(dataset: str, source: str, seed: int, out: Path | None,
              loaded: Dataset | None = None) -> Path:
    """Folder with the dataset's task files for this data and seed, prepared now if
    missing or made from other data (`starrec.data.prepared.prepared_tasks`)."""
    from starrec.data.prepared import prepared_tasks

    return prepared_tasks(dataset, source, seed, out, dataset=loaded)


@data_app.command("prepare")
def data_prepare(
    dataset: DatasetOption = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the negative sampling.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        help="Folder for the task files (default: under $STAR_HOME/data, named by the data's "
        "fingerprint and the protocol).")] = None,
    source: Annotated[
        Optional[str], typer.Option(help="ml-100k only: auto, recbole (local wheel) or grouplens.")
    ] = None,
    columns: ColumnsOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Write train/valid/test, eval-200 and valid-200 task files (+ scenario variants) and
    a manifest.

    Same data and seed give byte-identical files; the manifest records their hashes, the
    data's fingerprint and the protocol, so a folder is only reused for the same data.
    """
    from starrec.data.errors import DataError
    from starrec.data.prepared import default_folder
    from starrec.data.registry import load_dataset
    from starrec.data.tasks import prepare

    cfg = _config(config, set_, columns)
    dataset = dataset or cfg.data.dataset
    seed = cfg.data.seed if seed is None else seed
    try:
        loaded = load_dataset(dataset, source or cfg.data.source, cfg.data.columns)
        folder = out or default_folder(dataset, loaded.fingerprint(), seed)
        manifest = prepare(loaded, folder, seed=seed)
    except (DataError, ValueError, OSError) as error:
        raise _fail(error) from None
    typer.echo(f"wrote {folder}")
    for name, entry in manifest["files"].items():
        typer.echo(f"  {name:28s} {entry['count']:6d} tasks  sha256 {entry['sha256'][:16]}")
    ties = ", ".join(f"{split} {share:.0%}" for split, share in manifest["target_time_ties"].items()
                     if share is not None)
    if ties:
        typer.echo(f"  targets tied in time with the interaction before: {ties}")


# the split each set of users is drawn from (DESIGN.md 3.2)
USER_SET_SPLIT = {"eval-200": "test", "valid-200": "valid"}


def _task_split(users: str, split: str | None, default: str) -> str:
    """The split of a prepared task set: the one --users implies, else --split, else
    `default`; ValueError (one line for the user) when --users and --split disagree."""
    implied = USER_SET_SPLIT.get(users)
    if implied is None:
        return split or default
    if split is not None and split != implied:
        raise ValueError(f"--users {users} is a set of {implied} tasks; it contradicts "
                         f"--split {split}")
    return implied


def _task_file(tasks: Path | None, dataset: str, split: str | None, users: str, scenario: str,
               cfg: StarConfig, *, loaded: Dataset | None = None,
               default_split: str = "test") -> Path:
    """The task file given, or the prepared file of split / users / scenario (prepared
    now for this data if needed). `split` None means: the one --users implies, else
    `default_split`; ValueError when --users and --split disagree. `loaded` is the
    dataset `dataset` names, if the caller has it already (else it is read here)."""
    if tasks is not None:
        return tasks
    chosen = _task_split(users, split, default_split)
    stem = users if users in USER_SET_SPLIT else chosen
    if scenario != "classic":
        stem = f"{stem}-{scenario}"
    return _prepared(dataset, cfg.data.source, cfg.data.seed, None, loaded) / f"{stem}.jsonl"


def _task_list(tasks: Path | None, dataset: str, split: str | None, users: str, scenario: str,
               limit: int | None, cfg: StarConfig, *, loaded: Dataset | None = None,
               default_split: str = "test") -> list[Task]:
    """The tasks of `_task_file(...)`, checked against the data they will be scored on
    (unknown ids, a target that is not where its split puts it: DataError)."""
    from starrec.data.prepared import load_task_set
    from starrec.data.registry import load_dataset

    if tasks is None:
        _task_split(users, split, default_split)  # a contradiction stops before data is read
    if loaded is None:
        loaded = load_dataset(dataset, cfg.data.source, cfg.data.columns)
    path = _task_file(tasks, dataset, split, users, scenario, cfg, loaded=loaded,
                      default_split=default_split)
    return load_task_set(path, loaded, limit)


LLM_SYSTEMS = ("mars", "star")


def _llm_system(name: str, model: str | None, store_path: Path, cfg: StarConfig,
                writer: TrajectoryWriter | None):
    """The teacher or a student as an evaluation System, bound to the task set's store;
    the teacher also appends its full runs to `writer`, opened by the caller. Its model is
    preflighted as it loads (`starrec.llm.models.load_chat_model`, `cfg.llm.chat_template`
    applied): a model that cannot answer raises LLMError here, before the first task,
    which `evaluate` reports as one line and exit code 2 instead of scoring the fallback
    ranking task after task."""
    from starrec.cst.store import EvidenceStore
    from starrec.llm.models import load_chat_model

    if name == "star":
        from starrec.inference.system import load_star_system

        if model is None:
            raise typer.BadParameter("--system star needs --model DIR (a distilled student)",
                                     param_hint="--model")
        return load_star_system(model, EvidenceStore(store_path), cfg)
    from starrec.agents.mars import MarsTeacher
    from starrec.agents.system import MarsSystem

    chat_model = load_chat_model(model, cfg.llm)
    return MarsSystem(MarsTeacher(chat_model, EvidenceStore(store_path), cfg.mars), writer)


@app.command("eval")
def evaluate(
    system: Annotated[str, typer.Option(
        help="A baseline (random, pop, itemknn, als, sasrec), cst (evidence ranker), mars (the "
        "multi-agent teacher) or star (a distilled student, with --model).")],
    out: Annotated[Path, typer.Option(help="Where to write the results JSON.")],
    tasks: TasksOption = None,
    dataset: DatasetOption = None,
    split: SplitOption = None,
    users: UsersOption = "all",
    scenario: ScenarioOption = "classic",
    limit: LimitOption = None,
    model: ModelOption = None,
    records: Annotated[Optional[Path], typer.Option(
        help="One JSON line per task (ranking, rank, time, tokens). For mars / star it is "
        "written as tasks finish and a rerun skips the tasks already in it (default: next to "
        "--out).")] = None,
    fresh: Annotated[bool, typer.Option(
        help="mars / star: ignore and replace an existing --records file.")] = False,
    trajectories: Annotated[Optional[Path], typer.Option(
        help="mars: also append every full teacher run to this JSON lines file.")] = None,
    chat_template: Annotated[Optional[Path], typer.Option(
        help="mars / star: a chat template for a model without one (or to replace its own): "
        "a Jinja file, or a model folder holding one. Sets llm.chat_template.")] = None,
    columns: ColumnsOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Evaluate one system on a task file and write the results JSON (metrics x100) and
    its per-task file beside it (`<out stem>.tasks.jsonl`, for `star report --paired`).

    Long LLM evaluations resume: run the same command again after a crash or Ctrl-C. A
    records file written by another system, model, configuration or task file is refused."""
    from starrec.baselines.registry import RANKERS
    from starrec.data.errors import DataError
    from starrec.data.registry import load_dataset
    from starrec.evaluation.runner import evaluate_baseline, write_records, write_results
    from starrec.llm.base import LLMError

    if system not in (*RANKERS, *LLM_SYSTEMS):
        raise typer.BadParameter(f"unknown system {system!r}; expected one of "
                                 f"{', '.join((*RANKERS, *LLM_SYSTEMS))}", param_hint="--system")
    cfg = _config(config, set_, columns)
    if chat_template is not None:
        cfg.llm.chat_template = str(chat_template)
    dataset = dataset or cfg.data.dataset
    try:
        loaded = load_dataset(dataset, cfg.data.source, cfg.data.columns)
        task_list = _task_list(tasks, dataset, split, users, scenario, limit, cfg, loaded=loaded)
        # the file `_task_list` read: its sha256 is provenance
        task_file = _task_file(tasks, dataset, split, users, scenario, cfg, loaded=loaded)
        if system in LLM_SYSTEMS:
            records = records or out.with_suffix(".records.jsonl")
            if fresh:
                records.unlink(missing_ok=True)
            result, task_records = evaluate_llm(system, model, loaded, dataset, task_list, cfg,
                                                records, trajectories, task_file=task_file)
        else:
            result, task_records = evaluate_baseline(system, loaded, task_list, cfg,
                                                     tasks_path=task_file)
    except (DataError, ValueError, LLMError) as error:
        raise _fail(error) from None
    result["config"].update(tasks=tasks.name if tasks else f"{users}:{task_list[0].split}",
                            users=users, scenario=scenario)
    per_task = write_results(result, task_records, out)
    if records and system not in LLM_SYSTEMS:
        write_records(task_records, records)
    m = result["metrics"]
    typer.echo(
        f"{system}: n={result['n_tasks']} AvgHR={m['AvgHR']:.2f} HR@1={m['HR@1']:.2f} "
        f"NDCG@10={m['NDCG@10']:.2f} valid={m['valid_rate']:.1f} "
        f"well-formed={m['well_formed_rate']:.1f} -> {out} (+ {per_task.name})"
    )
    for warning in result["warnings"]:
        typer.secho(f"warning: {warning}", fg=typer.colors.RED, err=True)


def evaluate_llm(system: str, model: str | None, loaded, dataset: str, task_list, cfg: StarConfig,
                 records: Path, trajectories: Path | None = None, task_file: Path | None = None):
    """(results, task records) of the teacher or a student, resumed from `records` when
    that file was written by the same system, model, configuration and task file."""
    from starrec.evaluation.identity import run_identity
    from starrec.evaluation.runner import evaluate_system
    from starrec.trajectories.recorder import TrajectoryWriter

    store_path = _store_for(loaded, task_list, cfg, dataset)
    section = cfg.mars if system == "mars" else cfg.student
    spec = model or cfg.llm.model
    params = {"params": section.model_dump(), "model": spec,
              "llm": cfg.llm.model_dump(), "cst_store": store_path.name}
    if system == "mars":  # what the teacher is shown (DESIGN.md 3.7), for every table
        params["candidate_order"] = cfg.mars.candidate_order
    with ExitStack() as stack:  # the trajectories' lock is released however this ends
        writer = (stack.enter_context(TrajectoryWriter(trajectories))
                  if trajectories is not None and system == "mars" else None)
        llm_system = _llm_system(system, model, store_path, cfg, writer)
        student = getattr(llm_system, "student", None)
        if student is not None:  # a student is shown the candidates as its card's format says
            params["candidate_order"] = student.fmt.candidate_order
            params["format"] = student.fmt.model_dump()
        identity = run_identity(system, task_list, params, model=spec, tasks_path=task_file)
        return evaluate_system(llm_system, loaded.name, task_list, cfg, params, checkpoint=records,
                               identity=identity, dataset_fingerprint=loaded.fingerprint())


def _store_for(loaded: Dataset, task_list: list[Task], cfg: StarConfig, dataset: str,
               out: Path | None = None) -> Path:
    """The evidence store serving exactly this task set (DESIGN.md 3.3), built if needed,
    after checking that its interactions hold no task's target nor anything after it."""
    from starrec.cst.store import ensure_store
    from starrec.data.registry import dataset_slug
    from starrec.data.splits import check_no_leak, task_interactions

    splits = sorted({t.split for t in task_list})
    if len(splits) != 1:
        raise ValueError(f"tasks mix splits {splits}; a store serves one split at a time")
    split = splits[0]
    allowed = task_interactions(loaded, task_list, split)
    check_no_leak(task_list, allowed, where=f"evidence store of the {split} tasks")
    return ensure_store(allowed, loaded.items, cfg.cst, dataset=dataset_slug(dataset), split=split,
                        path=out)


def _evidence_store(dataset: str, split: str | None, tasks: Path | None, cfg: StarConfig,
                    out: Path | None = None) -> tuple[Path, Dataset, list[Task]]:
    """The store serving a task set, built if needed: (store path, dataset, tasks)."""
    from starrec.data.registry import load_dataset

    loaded = load_dataset(dataset, cfg.data.source, cfg.data.columns)
    task_list = _task_list(tasks, dataset, split, "all", "classic", None, cfg, loaded=loaded)
    return _store_for(loaded, task_list, cfg, dataset, out), loaded, task_list


# what `star cst build` / `show` turn into one `error:` line and exit code 2
CST_ERRORS = (ValueError, FileNotFoundError, OSError)


@cst_app.command("build")
def cst_build(
    dataset: DatasetOption = None,
    split: Annotated[Optional[str], choice_option(
        SPLIT_CHOICES, "Whose tasks the store serves: train, valid or test (default test).")] = None,
    tasks: Annotated[
        Optional[Path], typer.Option(help="Task file the store serves (default: the split's file).")
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Store file (default: under $STAR_HOME/cst).")] = None,
    engine: Annotated[Optional[str], choice_option(
        ("memory", "duckdb"), "memory: sparse matrices in RAM; duckdb: SQL over Parquet, out of "
        "core (extra [scale]). Same store either way. Default: cst.engine.")] = None,
    columns: ColumnsOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Precompute the CF signals into one SQLite file, from the interactions the tasks may
    use (each task user only up to the task's cutoff). Reused when inputs are unchanged."""
    from starrec.cst.store import EvidenceStore

    cfg = _config(config, [*(set_ or []), *([f"cst.engine={engine}"] if engine else [])], columns)
    try:
        path, _, _ = _evidence_store(dataset or cfg.data.dataset, split, tasks, cfg, out)
    except (*CST_ERRORS, ImportError) as error:  # DataError and LeakError are ValueErrors
        raise _fail(error) from None
    meta = EvidenceStore(path).meta
    typer.echo(f"{path}\n  version {meta['version']}  {meta['n_interactions']} interactions, "
               f"{meta['n_items']} items, built in {meta['build_s']} s "
               f"by the {meta['config'].get('engine', 'memory')} engine")


def _task_files_for(task_id: str) -> tuple[str, list[str]]:
    """(split, prepared task files that may hold it, most specific first) of a task id
    `SPLIT-[SCENARIO-]USER`. User ids may contain '-', so the scenario is read from the
    known scenario names, never by splitting at the last '-'."""
    from starrec.data.splits import SPLITS
    from starrec.data.tasks import SCENARIOS

    split, sep, rest = task_id.partition("-")
    if not sep or not rest or split not in SPLITS:
        raise ValueError(f"task id {task_id!r}: expected SPLIT-USER or SPLIT-SCENARIO-USER with "
                         f"SPLIT one of {', '.join(SPLITS)}")
    files = [f"{split}-{s}.jsonl" for s in SCENARIOS if s != "classic" and rest.startswith(f"{s}-")]
    return split, [*files, f"{split}.jsonl"]


@cst_app.command("show")
def cst_show(
    task: Annotated[str, typer.Option("--task", help="Task id, e.g. test-1 or test-short_term-1.")],
    dataset: DatasetOption = None,
    tasks: Annotated[Optional[Path], typer.Option(help="Task file holding the task.")] = None,
    columns: ColumnsOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Print what an agent would see for one task: history, candidates with their
    evidence, and the answers of the main tools."""
    from starrec.cst.ranker import present
    from starrec.cst.store import EvidenceStore
    from starrec.cst.tools import ToolExecutor
    from starrec.data.registry import load_dataset

    cfg = _config(config, set_, columns)
    dataset = dataset or cfg.data.dataset
    try:
        loaded = load_dataset(dataset, cfg.data.source, cfg.data.columns)
        if tasks is None:
            _, names = _task_files_for(task)
            folder = _prepared(dataset, cfg.data.source, cfg.data.seed, None, loaded)
            candidates = [folder / name for name in names if (folder / name).exists()]
        else:
            candidates = [tasks]
        chosen = task_list = None
        for path in candidates:
            task_list = _task_list(path, dataset, None, "all", "classic", None, cfg, loaded=loaded)
            chosen = next((t for t in task_list if t.task_id == task), None)
            if chosen is not None:
                break
        if chosen is None or task_list is None:
            raise ValueError(f"no task {task!r} in {', '.join(map(str, candidates))}")
        store = EvidenceStore(_store_for(loaded, task_list, cfg, dataset))
    except CST_ERRORS as error:
        raise _fail(error) from None
    chosen = present(chosen, store, cfg.mars.candidate_order)  # numbered as the teacher sees them
    tools = ToolExecutor(store, chosen)
    recent = [store.title(i) for i in chosen.history[-10:]]
    typer.echo(f"task {chosen.task_id}  user {chosen.user_id}  scenario {chosen.scenario}  "
               f"history {len(chosen.history)} items; the last {len(recent)}:")
    typer.echo("  " + "; ".join(recent))
    calls = [("candidate_evidence", {})]
    if chosen.history:
        calls += [("item_neighbours", {"item_id": chosen.history[-1]}),
                  ("next_items", {"item_id": chosen.history[-1]})]
    calls += [("sequence_candidates", {}), ("similar_users", {"user_id": chosen.user_id}),
              ("popularity", {"item_ids": chosen.candidates[:5]})]
    for name, arguments in calls:
        typer.echo(f"\n<tool_call>{{\"name\": \"{name}\", \"arguments\": {json.dumps(arguments)}}}</tool_call>")
        typer.echo(tools.call(name, arguments).text)


@app.command("report")
def report(
    results: Annotated[list[Path], typer.Argument(help="Results JSON files.")],
    out: Annotated[Optional[Path], typer.Option(help="Also write the table to this file.")] = None,
    paired: Annotated[bool, typer.Option(
        "--paired", help="Compare two results files task by task on their shared tasks: mean "
        "difference with a paired bootstrap 95% interval, wins / ties / losses.")] = False,
) -> None:
    """Print a markdown table of results JSON files: quality, what each LLM system adds to
    the order it was shown, and the LLM systems' cost per task with each one's speed-up
    over the teacher (mars). With --paired A B: A against B on their shared tasks."""
    from starrec.evaluation.paired import paired_comparison, paired_markdown
    from starrec.evaluation.report import full_report, load_results

    try:
        if paired:
            if len(results) != 2:
                raise ValueError(f"--paired compares two results files; {len(results)} given")
            table = paired_markdown(paired_comparison(results[0], results[1]))
        else:
            table = full_report(load_results(results))
    except ValueError as error:
        raise _fail(error) from None
    typer.echo(table)
    if out:
        out.write_text(table + "\n", encoding="utf-8")


def _register_subcommands() -> None:
    """Commands whose modules import this one for the shared helpers above."""
    from starrec.cli import distill, pipeline, teach
    from starrec.cli import serve as serving

    app.command("teach")(teach.teach)
    app.command("pipeline")(pipeline.pipeline)
    app.add_typer(distill.app, name="distill")
    app.command("serve")(serving.serve)
    app.command("recommend")(serving.recommend)


_register_subcommands()

if __name__ == "__main__":
    app()
