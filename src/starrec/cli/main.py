"""The `star` command line."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from starrec.cli.options import (
    SPLIT_CHOICES,
    ColumnsOption,
    ConcurrencyOption,
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
    llm_section,
)
from starrec.cli.options import config_from as _config
from starrec.cli.options import fail as _fail
from starrec.config import StarConfig

app = typer.Typer(
    help="STAR: reasoning-enhanced LLM recommendation. Prepare data, run baselines and "
    "the teacher, distil a student, evaluate and serve it.\n\nExamples: star pipeline --no-llm; "
    "star eval --system cst --users eval-200 --out r.json; star doctor",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)
data_app = typer.Typer(help="Load a dataset and write its fixed ranking tasks. Example: star "
                       "data prepare --dataset ml-100k", no_args_is_help=True)
app.add_typer(data_app, name="data")
cst_app = typer.Typer(
    help="Collaborative Signal Translation: build the evidence store, inspect a task's "
    "evidence. Example: star cst show --task test-1",
    no_args_is_help=True,
)
app.add_typer(cst_app, name="cst")

def _print_version(value: bool) -> None:
    if value:
        from starrec import __version__

        typer.echo(f"star {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


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

    Examples:
      star data prepare
      star data prepare --dataset recbole:data/ml-1m --seed 1
      star data prepare --dataset shop/ --columns user=userId,item=movieId
    """
    from starrec.data.errors import DataError
    from starrec.experiment import prepare_tasks

    cfg = _config(config, set_, columns)
    if source:
        cfg.data.source = source
    try:
        folder = prepare_tasks(dataset or cfg.data.dataset, cfg, seed=seed, out=out, rewrite=True)
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (DataError, ValueError, OSError) as error:
        raise _fail(error) from None
    typer.echo(f"wrote {folder}")
    for name, entry in manifest["files"].items():
        typer.echo(f"  {name:28s} {entry['count']:6d} tasks  sha256 {entry['sha256'][:16]}")
    ties = ", ".join(f"{split} {share:.0%}" for split, share in manifest["target_time_ties"].items()
                     if share is not None)
    if ties:
        typer.echo(f"  targets tied in time with the interaction before: {ties}")


@app.command("eval")
def evaluate(
    system: Annotated[str, typer.Option(
        help="A baseline (random, presented, pop, itemknn, als, sasrec), cst (the evidence ranker "
        "learned on the split before), cst-manual (the evidence under hand-set weights), mars (the "
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
        "a Jinja file, or a model folder holding one. Sets mars.llm.chat_template or "
        "student.llm.chat_template.")] = None,
    concurrency: ConcurrencyOption = None,
    columns: ColumnsOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Evaluate one system on a task file and write the results JSON (metrics x100) and
    its per-task file beside it (`<out stem>.tasks.jsonl`, for `star report --paired`).

    Long LLM evaluations resume: run the same command again after a crash or Ctrl-C. A
    records file written by another system, model, configuration or task file is refused.

    Examples:
      star eval --system sasrec --users eval-200 --out runs/sasrec.json
      star eval --system cst --split valid --scenario short_term --out runs/cst.json
      star eval --system star --model runs/student --users eval-200 --limit 50 --out r.json
      star eval --system mars --model http://gpu1:8000/v1,http://gpu2:8000/v1 --set mars.llm.model=NAME --concurrency 16 --out r.json
      star eval --system star --model runs/student --set student.llm.base_url=http://gpu:8000/v1 --set student.llm.served_model=student --out r.json
    """
    from starrec.data.errors import DataError
    from starrec.evaluation.runner import write_records
    from starrec.experiment import LLM_SYSTEMS, SYSTEMS
    from starrec.experiment import evaluate as evaluate_system
    from starrec.experiment import load_task_set
    from starrec.llm.base import LLMError, ServerUnavailable

    if system not in SYSTEMS:
        raise typer.BadParameter(f"unknown system {system!r}; expected one of "
                                 f"{', '.join(SYSTEMS)}", param_hint="--system")
    section = llm_section(system)  # the settings of the LLM that answers `system`
    cfg = _config(config, [*(set_ or []),
                           *([f"{section}.llm.concurrency={concurrency}"] if concurrency else [])],
                  columns)
    if chat_template is not None:
        getattr(cfg, section).llm.chat_template = str(chat_template)
    llm = system in LLM_SYSTEMS
    if llm:
        records = records or out.with_suffix(".records.jsonl")
    try:
        task_set = load_task_set(dataset or cfg.data.dataset, cfg, split=split, users=users,
                                 scenario=scenario, limit=limit, tasks=tasks)
        evaluation = evaluate_system(system, task_set, cfg, model=model,
                                     records=records if llm else None, fresh=fresh,
                                     trajectories=trajectories)
    except (DataError, ValueError, LLMError, ServerUnavailable) as error:
        raise _fail(error) from None
    result = evaluation.result
    per_task = evaluation.write(out)
    if records and not llm:
        write_records(evaluation.records, records)
    m = result["metrics"]
    typer.echo(
        f"{system}: n={result['n_tasks']} AvgHR={m['AvgHR']:.2f} HR@1={m['HR@1']:.2f} "
        f"NDCG@10={m['NDCG@10']:.2f} valid={m['valid_rate']:.1f} "
        f"well-formed={m['well_formed_rate']:.1f} -> {out} (+ {per_task.name})"
    )
    for warning in result["warnings"]:
        typer.secho(f"warning: {warning}", fg=typer.colors.RED, err=True)


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
        ("memory", "duckdb", "spark"), "memory: sparse matrices in RAM; duckdb: SQL over "
        "Parquet, out of core (the scale extra); spark: the same SQL on Spark, "
        "cst.spark_master or local (the spark extra and Java). Same store every way. "
        "Default: cst.engine.")] = None,
    columns: ColumnsOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
) -> None:
    """Precompute the CF signals into one SQLite file, from the interactions the tasks may
    use (each task user only up to the task's cutoff): neighbours, transitions, popularity,
    content, and the latent models (SASRec, ALS; off with --set cst.latent=false). With
    cst.ranker=learned, the store of the split before is built too and the cst ranker is
    fitted on its tasks (a test store's on the valid tasks). Reused when inputs are
    unchanged.

    Examples:
      star cst build
      star cst build --split train --engine duckdb
      star cst build --engine spark --set cst.spark_master=spark://head:7077
    """
    from starrec.cst.learned import ranker_lines, read_ranker
    from starrec.cst.store import EvidenceStore

    cfg = _config(config, [*(set_ or []), *([f"cst.engine={engine}"] if engine else [])], columns)
    from starrec.experiment import evidence_store_path, load_task_set

    try:
        task_set = load_task_set(dataset or cfg.data.dataset, cfg, split=split, tasks=tasks)
        path = evidence_store_path(task_set, cfg, out=out)
    except (*CST_ERRORS, ImportError) as error:  # DataError and LeakError are ValueErrors
        raise _fail(error) from None
    store = EvidenceStore(path)
    meta = store.meta
    typer.echo(f"{path}\n  version {meta['version']}  {meta['n_interactions']} interactions, "
               f"{meta['n_items']} items, built in {meta['build_s']} s "
               f"by the {meta['config'].get('engine', 'memory')} engine")
    typer.echo("  stages: " + ", ".join(f"{k} {v:g} s" for k, v in meta["timings_s"].items()))
    ranker = read_ranker(store) if cfg.cst.ranker == "learned" else None
    for line in ranker_lines(ranker, cfg.cst, meta.get("split", "")):
        typer.echo(f"  {line}")


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
    evidence, and the answers of the main tools.

    Examples:
      star cst show --task test-1
      star cst show --task test-short_term-1 --dataset amazon-games
    """
    from starrec.cst.learned import ranker_lines, read_ranker
    from starrec.cst.ranker import present
    from starrec.cst.tools import ToolExecutor
    from starrec.experiment import evidence_store, load_task_set, open_dataset, prepare_tasks

    cfg = _config(config, set_, columns)
    dataset = dataset or cfg.data.dataset
    try:
        loaded, _ = open_dataset(dataset, cfg)
        if tasks is None:
            _, names = _task_files_for(task)
            folder = prepare_tasks(loaded, cfg, spec=dataset)
            candidates = [folder / name for name in names if (folder / name).exists()]
        else:
            candidates = [tasks]
        chosen = task_set = None
        for path in candidates:
            task_set = load_task_set(loaded, cfg, tasks=path, spec=dataset)
            chosen = next((t for t in task_set if t.task_id == task), None)
            if chosen is not None:
                break
        if chosen is None or task_set is None:
            raise ValueError(f"no task {task!r} in {', '.join(map(str, candidates))}")
        store = evidence_store(task_set, cfg)
    except CST_ERRORS as error:
        raise _fail(error) from None
    chosen = present(chosen, store, cfg.mars.candidate_order)  # numbered as the teacher sees them
    tools = ToolExecutor(store, chosen)
    recent = [store.title(i) for i in chosen.history[-10:]]
    typer.echo(f"task {chosen.task_id}  user {chosen.user_id}  scenario {chosen.scenario}  "
               f"history {len(chosen.history)} items; the last {len(recent)}:")
    typer.echo("  " + "; ".join(recent))
    ranker = read_ranker(store) if cfg.cst.ranker == "learned" else None
    for line in ranker_lines(ranker, cfg.cst, store.meta.get("split", "")):
        typer.echo(line)
    calls = [("candidate_evidence", {})]
    if chosen.history:
        calls += [("item_neighbours", {"item_id": chosen.history[-1]}),
                  ("next_items", {"item_id": chosen.history[-1]})]
    calls += [("sequence_candidates", {}), ("similar_users", {"user_id": chosen.user_id}),
              ("popularity", {"item_ids": chosen.candidates[:5]})]
    if store.latent_states:
        calls += [("sequence_model", {"k": 5}), ("factor_model", {"k": 5})]
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
    over the teacher (mars). With --paired A B: A against B on their shared tasks.

    Examples:
      star report runs/*.json --out runs/report.md
      star report --paired runs/star.json runs/mars.json
    """
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
    from starrec.cli import admin, distill, pipeline, teach, view
    from starrec.cli import serve as serving

    app.command("teach")(teach.teach)
    app.command("pipeline")(pipeline.pipeline)
    app.add_typer(distill.app, name="distill")
    app.command("serve")(serving.serve)
    app.command("recommend")(serving.recommend)
    app.command("view")(view.view)
    app.command("doctor")(admin.doctor)
    app.add_typer(admin.app, name="config")


_register_subcommands()

def run() -> None:
    """The `star` console command: the Typer app, with an import of a package whose extra
    is not installed turned into one `error:` line naming the extra (exit 2)."""
    from starrec.core.extras import missing_extra

    try:
        app()
    except ImportError as error:
        hint = missing_extra(error)
        if hint is None:
            raise
        typer.secho(f"error: {hint}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    run()
