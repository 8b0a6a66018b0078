"""The `star` command line."""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from starrec.cli.options import (
    ConfigOption,
    DatasetOption,
    LimitOption,
    ModelOption,
    ScenarioOption,
    SetOption,
    TasksOption,
    UsersOption,
)
from starrec.cli.options import config_from as _config
from starrec.cli.options import fail as _fail
from starrec.config import StarConfig

if TYPE_CHECKING:
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


def _prepared(dataset: str, source: str, seed: int, out: Path | None) -> Path:
    """Folder with the dataset's task files, prepared now if missing or stale."""
    from starrec.data.registry import dataset_slug, load_dataset
    from starrec.data.tasks import prepare
    from starrec.paths import prepared_dir

    folder = out or prepared_dir(dataset_slug(dataset))
    manifest = folder / "manifest.json"
    if manifest.exists():
        if json.loads(manifest.read_text()).get("seed") == seed:
            return folder
    prepare(load_dataset(dataset, source), folder, seed=seed)
    return folder


@data_app.command("prepare")
def data_prepare(
    dataset: DatasetOption = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the negative sampling.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder for the task files.")] = None,
    source: Annotated[
        Optional[str], typer.Option(help="ml-100k only: auto, recbole (local wheel) or grouplens.")
    ] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Write train/valid/test/eval-200 task files (+ scenario variants) and a manifest.

    Same data and seed give byte-identical files; the manifest records their hashes.
    """
    from starrec.data.errors import DataError
    from starrec.data.registry import dataset_slug, load_dataset
    from starrec.data.tasks import prepare
    from starrec.paths import prepared_dir

    cfg = _config(config, set_)
    dataset = dataset or cfg.data.dataset
    try:
        loaded = load_dataset(dataset, source or cfg.data.source)
        folder = out or prepared_dir(dataset_slug(dataset))
        manifest = prepare(loaded, folder, seed=cfg.data.seed if seed is None else seed)
    except DataError as error:
        raise _fail(error) from None
    typer.echo(f"wrote {folder}")
    for name, entry in manifest["files"].items():
        typer.echo(f"  {name:28s} {entry['count']:6d} tasks  sha256 {entry['sha256'][:16]}")


def _task_list(tasks: Path | None, dataset: str, split: str, users: str, scenario: str,
               limit: int | None, cfg: StarConfig):
    """The task file given, or the prepared file of split / users / scenario."""
    from starrec.data.tasks import load_tasks

    if tasks is None:
        if users not in ("all", "eval-200"):
            raise typer.BadParameter("expected all or eval-200", param_hint="--users")
        if users == "eval-200" and split != "test":
            raise typer.BadParameter("eval-200 is a set of test users; use --split test",
                                     param_hint="--users")
        stem = "eval-200" if users == "eval-200" else split
        if scenario != "classic":
            stem = f"{stem}-{scenario}"
        tasks = _prepared(dataset, cfg.data.source, cfg.data.seed, None) / f"{stem}.jsonl"
    return load_tasks(tasks, limit)


LLM_SYSTEMS = ("mars", "star")


def _llm_system(name: str, model: str | None, store_path: Path, cfg: StarConfig,
                writer: TrajectoryWriter | None):
    """The teacher or a student as an evaluation System, bound to the task set's store;
    the teacher also appends its full runs to `writer`, opened by the caller."""
    from starrec.cst.store import EvidenceStore
    from starrec.llm.models import load_chat_model

    store = EvidenceStore(store_path)
    if name == "star":
        from starrec.inference.system import load_star_system

        if model is None:
            raise typer.BadParameter("--system star needs --model DIR (a distilled student)",
                                     param_hint="--model")
        return load_star_system(model, store, cfg)
    from starrec.agents.mars import MarsTeacher
    from starrec.agents.system import MarsSystem

    return MarsSystem(MarsTeacher(load_chat_model(model, cfg.llm), store, cfg.mars), writer)


@app.command("eval")
def evaluate(
    system: Annotated[str, typer.Option(
        help="A baseline (random, pop, itemknn, als, sasrec), cst (evidence ranker), mars (the "
        "multi-agent teacher) or star (a distilled student, with --model).")],
    out: Annotated[Path, typer.Option(help="Where to write the results JSON.")],
    tasks: TasksOption = None,
    dataset: DatasetOption = None,
    split: Annotated[str, typer.Option(help="train, valid or test (when --tasks is not given).")] = "test",
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
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Evaluate one system on a task file and write the results JSON (metrics x100).

    Long LLM evaluations resume: run the same command again after a crash or Ctrl-C."""
    from starrec.baselines.registry import RANKERS
    from starrec.data.errors import DataError
    from starrec.data.registry import load_dataset
    from starrec.evaluation.runner import evaluate_baseline, write_json, write_records
    from starrec.llm.base import LLMError

    if system not in (*RANKERS, *LLM_SYSTEMS):
        raise typer.BadParameter(f"unknown system {system!r}; expected one of "
                                 f"{', '.join((*RANKERS, *LLM_SYSTEMS))}", param_hint="--system")
    cfg = _config(config, set_)
    dataset = dataset or cfg.data.dataset
    try:
        task_list = _task_list(tasks, dataset, split, users, scenario, limit, cfg)
        loaded = load_dataset(dataset, cfg.data.source)
        if system in LLM_SYSTEMS:
            records = records or out.with_suffix(".records.jsonl")
            if fresh:
                records.unlink(missing_ok=True)
            result, task_records = evaluate_llm(system, model, loaded, dataset, task_list, cfg,
                                                records, trajectories)
        else:
            result, task_records = evaluate_baseline(system, loaded, task_list, cfg)
    except (DataError, ValueError, LLMError) as error:
        raise _fail(error) from None
    result["config"].update(tasks=tasks.name if tasks else f"{users}:{split}", users=users,
                            scenario=scenario)
    write_json(result, out)
    if records and system not in LLM_SYSTEMS:
        write_records(task_records, records)
    m = result["metrics"]
    typer.echo(
        f"{system}: n={result['n_tasks']} AvgHR={m['AvgHR']:.2f} HR@1={m['HR@1']:.2f} "
        f"NDCG@10={m['NDCG@10']:.2f} valid={m['valid_rate']:.1f} -> {out}"
    )


def evaluate_llm(system: str, model: str | None, loaded, dataset: str, task_list, cfg: StarConfig,
                 records: Path, trajectories: Path | None = None):
    """(results, task records) of the teacher or a student, resumed from `records`."""
    from starrec.evaluation.runner import evaluate_system

    from starrec.trajectories.recorder import TrajectoryWriter

    store_path = _store_for(loaded, task_list, cfg, dataset)
    section = cfg.mars if system == "mars" else cfg.student
    params = {"params": section.model_dump(), "model": model or cfg.llm.model,
              "llm": cfg.llm.model_dump(), "cst_store": store_path.name}
    with ExitStack() as stack:  # the trajectories' lock is released however this ends
        writer = (stack.enter_context(TrajectoryWriter(trajectories))
                  if trajectories is not None and system == "mars" else None)
        llm_system = _llm_system(system, model, store_path, cfg, writer)
        return evaluate_system(llm_system, loaded.name, task_list, cfg, params, checkpoint=records)


def _store_for(loaded, task_list, cfg: StarConfig, dataset: str, out: Path | None = None) -> Path:
    """The evidence store serving exactly this task set (DESIGN.md 3.3), built if needed."""
    from starrec.cst.store import ensure_store
    from starrec.data.registry import dataset_slug
    from starrec.data.splits import task_interactions

    split = task_list[0].split
    allowed = task_interactions(loaded, task_list, split)
    return ensure_store(allowed, loaded.items, cfg.cst, dataset=dataset_slug(dataset), split=split,
                        path=out)


def _evidence_store(dataset: str, split: str, tasks: Path | None, cfg: StarConfig, out: Path | None = None):
    """The store serving a task set, built if needed: (store path, dataset, tasks)."""
    from starrec.data.registry import load_dataset

    task_list = _task_list(tasks, dataset, split, "all", "classic", None, cfg)
    loaded = load_dataset(dataset, cfg.data.source)
    return _store_for(loaded, task_list, cfg, dataset, out), loaded, task_list


@cst_app.command("build")
def cst_build(
    dataset: DatasetOption = None,
    split: Annotated[str, typer.Option(help="Whose tasks the store serves: train, valid or test.")] = "test",
    tasks: Annotated[
        Optional[Path], typer.Option(help="Task file the store serves (default: the split's file).")
    ] = None,
    out: Annotated[Optional[Path], typer.Option(help="Store file (default: under $STAR_HOME/cst).")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Precompute the CF signals into one SQLite file, from the interactions the tasks may
    use (each task user only up to the task's history). Reused when inputs are unchanged."""
    from starrec.cst.store import EvidenceStore
    from starrec.data.errors import DataError

    cfg = _config(config, set_)
    try:
        path, _, _ = _evidence_store(dataset or cfg.data.dataset, split, tasks, cfg, out)
    except DataError as error:
        raise _fail(error) from None
    meta = EvidenceStore(path).meta
    typer.echo(f"{path}\n  version {meta['version']}  {meta['n_interactions']} interactions, "
               f"{meta['n_items']} items, built in {meta['build_s']} s")


@cst_app.command("show")
def cst_show(
    task: Annotated[str, typer.Option("--task", help="Task id, e.g. test-1 or test-short_term-1.")],
    dataset: DatasetOption = None,
    tasks: Annotated[Optional[Path], typer.Option(help="Task file holding the task.")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Print what an agent would see for one task: history, candidates with their
    evidence, and the answers of the main tools."""
    from starrec.cst.ranker import present
    from starrec.cst.store import EvidenceStore
    from starrec.cst.tools import ToolExecutor
    from starrec.data.errors import DataError

    cfg = _config(config, set_)
    dataset = dataset or cfg.data.dataset
    split, _, rest = task.partition("-")
    scenario = rest.rpartition("-")[0]
    if tasks is None:
        folder = _prepared(dataset, cfg.data.source, cfg.data.seed, None)
        tasks = folder / (f"{split}-{scenario}.jsonl" if scenario else f"{split}.jsonl")
    try:
        path, _, task_list = _evidence_store(dataset, split, tasks, cfg)
    except (DataError, FileNotFoundError) as error:
        raise _fail(error) from None
    chosen = next((t for t in task_list if t.task_id == task), None)
    if chosen is None:
        raise _fail(ValueError(f"no task {task!r} in {tasks}"))
    store = EvidenceStore(path)
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
) -> None:
    """Print a markdown table of results JSON files, and one of the LLM systems' cost per
    task with each one's speed-up over the teacher (mars)."""
    from starrec.evaluation.report import full_report, load_results

    table = full_report(load_results(results))
    typer.echo(table)
    if out:
        out.write_text(table + "\n", encoding="utf-8")


def _register_subcommands() -> None:
    """Commands whose modules import this one for the shared helpers above."""
    from starrec.cli import distill, pipeline, teach

    app.command("teach")(teach.teach)
    app.command("pipeline")(pipeline.pipeline)
    app.add_typer(distill.app, name="distill")


_register_subcommands()

if __name__ == "__main__":
    app()
