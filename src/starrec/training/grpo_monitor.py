"""What a long GRPO run shows and leaves behind: a progress bar, the valid curve, curves.

Three `transformers.TrainerCallback`s for `starrec.training.grpo`:

- `ProgressCallback`: one bar over the optimizer steps with the mean reward and the
  seconds per step (TRL's own bar is off);
- `ValidCallback`: AvgHR, HR@1, the format rate and the shown-order identity of greedy
  student passes on a fixed subset of valid-200 (the first `grpo.valid_tasks`) with the
  live weights, at step 0 and every `grpo.eval_steps` steps, with each task's target
  rank, so every point is also compared with step 0 task by task (mean difference, its
  paired bootstrap interval, wins / ties / losses): on a few dozen tasks two AvgHR
  values apart by less than their intervals' width say nothing, their paired difference
  may. Its points go into the trainer state's log history, so a checkpoint keeps them
  and a resumed run goes on from them. The step-0 point, which comes before the first
  checkpoint, is also written to `valid-start.json` with what it measured (the starting
  weights, the tasks, the decoding), so a run stopped before its first checkpoint does
  not measure it again; while it is measured, each task's result goes into
  `valid-start.partial.jsonl`, so a run stopped in the middle of it (a CPU measures it
  for many minutes) goes on from the tasks it had done;
- `CurveCallback`: `curves.json` and `curves.png` in the output folder after every
  checkpoint and at the end, read from that log history: mean and spread of the reward,
  the outcome and the format rate, the share of groups whose passes all got one reward
  (no advantage, so no learning signal), the KL to the starting model, the valid AvgHR
  against its step-0 value.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import TrainerCallback

from starrec.config import StudentConfig, StudentFormatConfig
from starrec.core import Task
from starrec.core.files import write_text_atomic
from starrec.cst.store import EvidenceStore
from starrec.progress import progress, progress_bar
from starrec.training.reward import compare_to_start, outcome_reward
from starrec.training.rollout import Rollout, Sampler, live_sampler, run_passes

log = logging.getLogger(__name__)

VALID = "valid/"  # prefix of the valid metrics in the log history
VALID_START = "valid-start.json"
VALID_START_PARTIAL = "valid-start.partial.jsonl"
CURVES_JSON = "curves.json"
CURVES_PNG = "curves.png"


def task_result(rollout: Rollout) -> dict[str, Any]:
    """What a valid point keeps of one pass: the target's rank, whether the pass was well
    formed as written, whether it returned the shown order."""
    return {"task_id": rollout.task.task_id, "rank": int(rollout.rank),
            "well_formed": bool(rollout.verdict.well_formed),
            "shown": rollout.answer.completed.ranking == list(rollout.task.candidates)}


def metrics_of(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """AvgHR and HR@1 (x100, DESIGN.md 3.4) of `task_result`s, the share well formed as
    written (the format reward's verdict), the share that returned the shown order, and
    each pass's target rank (`ranks`, in task order: what the paired comparison reads)."""
    ranks = [int(r["rank"]) for r in results]
    return {"AvgHR": 100 * float(np.mean([outcome_reward(k) for k in ranks])),
            "HR@1": 100 * float(np.mean([k == 1 for k in ranks])),
            "format_rate": 100 * float(np.mean([r["well_formed"] for r in results])),
            "shown_order_identity": 100 * float(np.mean([r["shown"] for r in results])),
            "n_tasks": len(results), "ranks": ranks}


def valid_metrics(rollouts: Sequence[Rollout]) -> dict[str, Any]:
    """`metrics_of` the passes."""
    return metrics_of([task_result(r) for r in rollouts])


def evaluate_valid(sampler: Sampler, tasks: Sequence[Task], store: EvidenceStore,
                   fmt: StudentFormatConfig, student: StudentConfig, *,
                   plan_choices: Sequence[str] = (), reflection_cap: int | None = None,
                   show_progress: bool = True,
                   done: Mapping[str, Mapping[str, Any]] | None = None,
                   on_task: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """`metrics_of` one pass per task, decoded as `student` says (greedy by default, as
    `star eval` does). `done`: `task_result`s measured before, by task id, whose tasks
    are not run again; `on_task` is given each new result as soon as it exists. Passes
    decoded one after another show a bar: a valid point on a CPU is minutes of passes
    between two steps."""
    results: dict[str, Mapping[str, Any]] = {
        t.task_id: done[t.task_id] for t in tasks if done and t.task_id in done}
    jobs = [(task, student.seed or 0) for task in tasks if task.task_id not in results]

    def run(batch: Sequence[tuple[Task, int]], concurrent: bool) -> None:
        for rollout in run_passes(sampler, batch, store, fmt, student, concurrent=concurrent,
                                  plan_choices=plan_choices, reflection_cap=reflection_cap):
            result = task_result(rollout)
            results[result["task_id"]] = result
            if on_task is not None:
                on_task(result)

    if getattr(sampler, "concurrent", False):
        if jobs:
            run(jobs, True)
    else:
        for job in progress(jobs, "grpo valid", total=len(tasks), unit="task",
                            enabled=show_progress, initial=len(results)):
            run([job], False)
    return metrics_of([results[t.task_id] for t in tasks])


class ValidCallback(TrainerCallback):
    """The valid curve (module docstring). `trainer` is set once the trainer exists."""

    def __init__(self, tasks: Sequence[Task], store: EvidenceStore, fmt: StudentFormatConfig,
                 student: StudentConfig, every: int, *, plan_choices: Sequence[str] = (),
                 reflection_cap: int | None = None, show_progress: bool = True,
                 start_file: Path | None = None, start_key: dict[str, Any] | None = None
                 ) -> None:
        self.tasks = list(tasks)
        self.store = store
        self.fmt = fmt
        self.student = student
        self.every = every
        self.plan_choices = plan_choices
        self.reflection_cap = reflection_cap
        self.show_progress = show_progress
        self.start_file = start_file
        # what the step-0 point measured: a stored point counts only for the same
        self.start_key = {**(start_key or {}), "tasks": [t.task_id for t in self.tasks],
                          "student": student.model_dump(mode="json"),
                          "format": fmt.model_dump(mode="json"),
                          "plan_choices": list(plan_choices), "reflection_cap": reflection_cap}
        self.trainer: Any = None

    def _stored_start(self) -> dict[str, Any] | None:
        if self.start_file is None or not self.start_file.is_file():
            return None
        try:
            stored = json.loads(self.start_file.read_text())
        except (OSError, ValueError):
            return None
        return stored.get("entry") if stored.get("key") == self.start_key else None

    def _partial_start(self) -> tuple[dict[str, dict[str, Any]],
                                      Callable[[dict[str, Any]], None]]:
        """The step-0 results kept by a run stopped while measuring them (for the same
        `start_key` only), and the writer that keeps each new one. A line cut by the
        stop, and any after it, are dropped: the file is written back clean first."""
        assert self.start_file is not None
        path = self.start_file.with_name(VALID_START_PARTIAL)
        head = json.dumps({"key": self.start_key}, sort_keys=True)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError:
            lines = []
        done: dict[str, dict[str, Any]] = {}
        if lines and lines[0] == head:
            wanted = {t.task_id for t in self.tasks}
            for line in lines[1:]:
                try:
                    result = json.loads(line)
                except ValueError:
                    break
                if result.get("task_id") in wanted:
                    done[result["task_id"]] = result
        write_text_atomic(path, "".join(json.dumps(x, sort_keys=True) + "\n"
                                        for x in [{"key": self.start_key}, *done.values()]))
        if done:
            log.info("grpo: step-0 valid point goes on from %d of %d tasks measured before (%s)",
                     len(done), len(self.tasks), path)

        def keep(result: dict[str, Any]) -> None:
            with path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(result, sort_keys=True) + "\n")

        return done, keep

    def _evaluate(self, state: Any) -> None:
        trainer = self.trainer
        started = time.perf_counter()
        if getattr(trainer, "use_vllm", False):  # the engine holds the weights of the last rollout
            trainer.vllm_generation.sync_weights()
            trainer._last_loaded_step = state.global_step
        at_start = state.global_step == 0 and self.start_file is not None
        done, on_task = self._partial_start() if at_start else ({}, None)
        with live_sampler(trainer) as sampler:
            metrics = evaluate_valid(sampler, self.tasks, self.store, self.fmt, self.student,
                                     plan_choices=self.plan_choices,
                                     reflection_cap=self.reflection_cap,
                                     show_progress=self.show_progress,
                                     done=done, on_task=on_task)
        entry = {"step": state.global_step, **{VALID + k: v for k, v in metrics.items()},
                 VALID + "seconds": round(time.perf_counter() - started, 1)}
        state.log_history.append(entry)
        if at_start:
            assert self.start_file is not None
            write_text_atomic(self.start_file, json.dumps({"key": self.start_key, "entry": entry}))
            self.start_file.with_name(VALID_START_PARTIAL).unlink(missing_ok=True)
        log.info("grpo: step %d, valid AvgHR %.1f, format rate %.0f%% (%d tasks, %.0f s)",
                 state.global_step, metrics["AvgHR"], metrics["format_rate"],
                 metrics["n_tasks"], entry[VALID + "seconds"])

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        done = any(VALID + "AvgHR" in e and e["step"] == 0 for e in state.log_history)
        if self.every and self.tasks and state.global_step == 0 and not done:
            stored = self._stored_start()
            if stored is not None:
                state.log_history.append(stored)
                log.info("grpo: step 0, valid AvgHR %.1f (measured before, %s)",
                         stored[VALID + "AvgHR"], self.start_file)
            else:
                self._evaluate(state)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step
        if self.every and self.tasks and (step % self.every == 0 or step == state.max_steps):
            self._evaluate(state)


class ProgressCallback(TrainerCallback):
    """One bar over the optimizer steps: mean reward and seconds per step."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Any = None
        self.last = 0.0
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.bar = progress_bar("grpo", total=state.max_steps, unit="step",
                                enabled=self.enabled, initial=state.global_step)
        self.last = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        now = time.perf_counter()
        self.postfix["s/step"] = f"{now - self.last:.0f}"
        self.last = now
        self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(1)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               **kwargs: Any) -> None:
        if logs and logs.get("reward") is not None:
            self.postfix["reward"] = f"{logs['reward']:.2f}"
            if logs.get("rewards/format/mean") is not None:
                self.postfix["format"] = f"{(logs['rewards/format/mean'] + 1) / 2:.0%}"
            if self.bar is not None:  # a step is logged after its bar update
                self.bar.set_postfix(self.postfix)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def curves(log_history: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The train and valid curves of a trainer's log history."""
    train = []
    for entry in log_history:
        if entry.get("reward") is None:
            continue
        form = entry.get("rewards/format/mean")
        train.append({"step": entry["step"], "reward": entry["reward"],
                      "reward_std": entry.get("reward_std"),
                      "outcome": entry.get("rewards/outcome/mean"),
                      "format_rate": None if form is None else (form + 1) / 2,
                      # groups whose passes all got one reward: zero advantage, nothing learnt
                      "zero_spread": entry.get("frac_reward_zero_std"),
                      # passes of groups sampled in place of flat ones (grpo.resample_flat)
                      "resampled": entry.get("rollout/resampled"),
                      "entropy": entry.get("entropy"),
                      "kl": entry.get("kl"), "step_time": entry.get("step_time"),
                      "completion_length": entry.get("completions/mean_length")})
    valid = [{"step": e["step"], **{k[len(VALID):]: v for k, v in e.items() if k.startswith(VALID)}}
             for e in log_history if VALID + "AvgHR" in e]
    compare_to_start(valid)
    return {"train": train, "valid": valid}


def _points(points: Sequence[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    kept = [p for p in points if p.get(key) is not None]
    return [p["step"] for p in kept], [p[key] for p in kept]


def write_curves(curve: dict[str, list[dict[str, Any]]], out: Path) -> None:
    """curves.json and curves.png (matplotlib's Agg canvas: no display, no global backend)."""
    from matplotlib.figure import Figure

    (out / CURVES_JSON).write_text(json.dumps(curve, indent=2) + "\n", encoding="utf-8")
    figure = Figure(figsize=(10, 7))
    panels = figure.subplots(2, 2).ravel()
    train, valid = curve["train"], curve["valid"]
    steps, mean = _points(train, "reward")
    if steps:
        spread = np.array([p.get("reward_std") or 0.0 for p in train
                           if p.get("reward") is not None])
        panels[0].plot(steps, mean, label="reward (mean)")
        panels[0].fill_between(steps, np.array(mean) - spread, np.array(mean) + spread, alpha=0.2,
                               label="± std within the batch")
        panels[0].plot(*_points(train, "outcome"), label="outcome (per-task AvgHR)")
    panels[0].set_title("reward = format + outcome")
    panels[1].plot(*_points(train, "format_rate"))
    panels[1].set_title("format rate (well formed as written)")
    panels[1].set_ylim(-0.05, 1.05)
    panels[2].plot(*_points(train, "kl"), label="KL to the starting model")
    panels[2].plot(*_points(train, "zero_spread"), label="groups with one reward (no signal)")
    panels[2].set_title("KL and groups without signal")
    panels[2].legend(fontsize="small")
    steps, hr = _points(valid, "AvgHR")
    if steps:
        panels[3].plot(steps, hr, marker="o")
        panels[3].axhline(hr[0], linestyle="--", color="grey",
                          label=f"step {steps[0]}: {hr[0]:.1f}")
        panels[3].legend()
    n = valid[-1].get("n_tasks") if valid else None
    panels[3].set_title(f"valid AvgHR ({n} tasks of valid-200)" if n else "valid AvgHR")
    for axes in panels:
        axes.set_xlabel("optimizer step")
    if train:
        panels[0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(out / CURVES_PNG, dpi=100)


class CurveCallback(TrainerCallback):
    """curves.json / curves.png in `out` after every checkpoint and at the end."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def _write(self, args: Any, state: Any) -> None:
        if state.is_world_process_zero:
            write_curves(curves(state.log_history), self.out)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._write(args, state)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._write(args, state)
