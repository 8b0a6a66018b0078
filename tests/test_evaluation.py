import json

import pytest

from starrec.data.tasks import build_split_tasks
from starrec.evaluation.runner import Recommendation, read_records, run_tasks


class CountingSystem:
    """Ranks candidates in reverse presented order; can be told to crash at a task."""

    name = "counting"

    def __init__(self, crash_at: str | None = None, fallback: bool = False):
        self.calls: list[str] = []
        self.crash_at = crash_at
        self.fallback = fallback

    def recommend(self, task):
        if task.task_id == self.crash_at:
            raise KeyboardInterrupt
        self.calls.append(task.task_id)
        return Recommendation(list(reversed(task.candidates)), fallback=self.fallback, llm_calls=2)


def test_checkpointed_run_resumes_without_repeating_or_losing_a_task(tiny, tmp_path):
    tasks = build_split_tasks(tiny, "test")[:6]
    checkpoint = tmp_path / "records.jsonl"
    crashing = CountingSystem(crash_at=tasks[3].task_id)
    with pytest.raises(KeyboardInterrupt):
        run_tasks(crashing, tasks, progress=False, checkpoint=checkpoint)
    assert crashing.calls == [t.task_id for t in tasks[:3]]
    # a crash in the middle of a write leaves a cut line: that task simply runs again
    with checkpoint.open("a") as handle:
        handle.write('{"task_id": "' + tasks[3].task_id + '", "tar')

    resumed = CountingSystem()
    records = run_tasks(resumed, tasks, progress=False, checkpoint=checkpoint)
    assert resumed.calls == [t.task_id for t in tasks[3:]]
    assert [r.task_id for r in records] == [t.task_id for t in tasks]
    fresh = run_tasks(CountingSystem(), tasks, progress=False)
    assert [r.rank for r in records] == [r.rank for r in fresh]
    # records written before they kept a system's details read back with none (line 0 is
    # the records' identity)
    lines = checkpoint.read_text().splitlines()
    old = {k: v for k, v in json.loads(lines[1]).items() if k != "details"}
    checkpoint.write_text("\n".join([lines[0], json.dumps(old), *lines[2:]]) + "\n")
    assert read_records(checkpoint)[tasks[0].task_id] == records[0]


def test_checkpoint_of_another_task_file_is_refused(tiny, tmp_path):
    tasks = build_split_tasks(tiny, "test")[:2]
    checkpoint = tmp_path / "records.jsonl"
    run_tasks(CountingSystem(), tasks, progress=False, checkpoint=checkpoint)
    lines = checkpoint.read_text().splitlines()
    record = json.loads(lines[1])
    record["target"] = "some other item"
    checkpoint.write_text(lines[0] + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="different task file"):
        run_tasks(CountingSystem(), tasks, progress=False, checkpoint=checkpoint)


def test_a_fallback_ranking_counts_as_invalid_even_when_complete(tiny):
    task = build_split_tasks(tiny, "test")[0]
    own, = run_tasks(CountingSystem(), [task], progress=False)
    fallback, = run_tasks(CountingSystem(fallback=True), [task], progress=False)
    assert own.valid and not fallback.valid
    assert own.rank == fallback.rank  # the ranking itself still counts


def test_answer_counts_sum_the_details_of_the_answers():
    from starrec.evaluation.runner import TaskRecord, answer_counts, results_json

    def record(task: str, details: dict) -> TaskRecord:
        return TaskRecord(task, "t", 1, True, 1.0, 1, 10, 5, ["t"], details=details)

    records = [record("a", {"well_formed": True, "repaired": False, "stop": "recommend",
                            "tool_calls": [1, 2, 3], "text": "x"}),
               record("b", {"well_formed": False, "repaired": True, "stop": "length",
                            "tool_calls": []}),
               record("c", {"well_formed": True, "repaired": False, "stop": "recommend",
                            "tool_calls": [1, 2]})]
    assert answer_counts(records) == {"repaired": 1, "well_formed": 2,
                                      "stop": {"length": 1, "recommend": 2},
                                      "tool_calls_per_task": 1.67}
    assert results_json("s", "d", "test", records, {})["answers"]["well_formed"] == 2
    plain = [record("a", {})]
    assert answer_counts(plain) == {} and "answers" not in results_json("s", "d", "test", plain, {})


# --- what an LLM adds, warnings, provenance (issue 12) --------------------------------

class ShownSystem:
    """Shown the candidates reversed; ranks them as `mode` says."""

    name = "shown"

    def __init__(self, mode: str = "shown", fallback_at: set[str] = frozenset()):
        self.mode = mode
        self.fallback_at = fallback_at

    def recommend(self, task):
        shown = list(reversed(task.candidates))
        ranking = {"shown": shown, "file": list(task.candidates),
                   "swap": [shown[1], shown[0], *shown[2:]]}[self.mode]
        fallback = task.task_id in self.fallback_at
        return Recommendation(ranking, fallback=fallback, shown=shown, well_formed=not fallback,
                              repaired=fallback, constrained=not fallback, generation_requests=3,
                              llm_calls=3)


def test_kendall_tau():
    from starrec.evaluation.metrics import kendall_tau

    assert kendall_tau(list("abcd"), list("abcd")) == 1.0
    assert kendall_tau(list("dcba"), list("abcd")) == -1.0
    assert kendall_tau(list("bacd"), list("abcd")) == pytest.approx(1 - 2 / 6)
    assert kendall_tau(["a"], ["a"]) == 1.0
    with pytest.raises(ValueError):
        kendall_tau(list("abc"), list("abd"))


@pytest.mark.parametrize("mode, identity, tau", [("shown", 100.0, 1.0), ("file", 0.0, -1.0),
                                                 ("swap", 0.0, 1 - 2 / 190)])
def test_results_say_how_far_the_ranking_is_from_the_shown_order(tiny, mode, identity, tau):
    from starrec.evaluation.runner import results_json

    tasks = build_split_tasks(tiny, "test")[:5]
    records = run_tasks(ShownSystem(mode), tasks, progress=False)
    assert records[0].shown == list(reversed(tasks[0].candidates))
    result = results_json("shown", "tiny", "test", records, {}, n_resamples=10)
    m = result["metrics"]
    assert m["shown_order_identity"] == pytest.approx(identity)
    assert m["kendall_tau_shown"] == pytest.approx(tau, abs=1e-3)
    assert m["well_formed_rate"] == 100 and m["repaired_rate"] == 0 and m["fallback_rate"] == 0
    assert m["constrained_rate"] == 100 and m["valid_rate"] == 100
    assert result["efficiency"]["generation_requests_per_task"] == 3
    assert result["warnings"] == []


def test_many_fallbacks_are_flagged(tiny):
    from starrec.evaluation.runner import results_json

    tasks = build_split_tasks(tiny, "test")[:10]
    one = run_tasks(ShownSystem(fallback_at={tasks[0].task_id}), tasks, progress=False)
    assert results_json("s", "tiny", "test", one, {}, n_resamples=10)["warnings"] == []
    two = run_tasks(ShownSystem(fallback_at={t.task_id for t in tasks[:2]}), tasks, progress=False)
    result = results_json("s", "tiny", "test", two, {}, n_resamples=10)
    assert result["metrics"]["fallback_rate"] == 20 and result["metrics"]["repaired_rate"] == 20
    assert result["metrics"]["well_formed_rate"] == 80 and result["metrics"]["valid_rate"] == 80
    (warning,) = result["warnings"]
    assert "2 of 10" in warning and "fell back" in warning


def test_a_fallback_keeps_the_partial_ranking_it_was_given(tiny):
    """DESIGN.md 3.4: what the system ranked stays first, the rest follows in presented
    order; nothing in the evaluation puts another ranker's order in its place."""
    task = build_split_tasks(tiny, "test")[0]
    c = task.candidates

    class Partial:
        name = "partial"

        def recommend(self, task):
            return Recommendation([c[5], c[2]], fallback=True)

    (record,) = run_tasks(Partial(), [task], progress=False)
    assert record.ranking == [c[5], c[2], *[x for x in c if x not in (c[5], c[2])]]
    assert not record.valid and record.fallback and record.repaired
    assert not record.well_formed_or_valid  # a non-generative system counts as its validity


def test_baselines_count_as_well_formed_when_valid(tiny):
    from starrec.evaluation.runner import results_json

    tasks = build_split_tasks(tiny, "test")[:4]
    records = run_tasks(CountingSystem(), tasks, progress=False)
    assert all(r.well_formed is None and r.shown == t.candidates for r, t in zip(records, tasks))
    m = results_json("c", "tiny", "test", records, {}, n_resamples=10)["metrics"]
    assert m["well_formed_rate"] == 100 and m["repaired_rate"] == 0
    assert m["shown_order_identity"] == 0 and m["kendall_tau_shown"] == pytest.approx(-1.0)


def test_a_system_shown_foreign_items_is_an_error(tiny):
    task = build_split_tasks(tiny, "test")[0]

    class Liar:
        name = "liar"

        def recommend(self, task):
            return Recommendation(list(task.candidates), shown=["x", *task.candidates[1:]])

    with pytest.raises(ValueError, match="not the task's candidates"):
        run_tasks(Liar(), [task], progress=False)


def test_old_record_lines_read_what_their_details_say(tmp_path):
    base = {"target": "t", "rank": 1, "valid": True, "seconds": 1.0, "llm_calls": 1,
            "prompt_tokens": 10, "completion_tokens": 5, "ranking": ["t", "x"]}
    lines = [
        {"task_id": "student", **base, "details": {"well_formed": True, "repaired": True,
                                                   "repaired_calls": [], "segments": 4}},
        {"task_id": "teacher", **base, "llm_calls": 9,
         "details": {"fallback": "backend error; ranked by cst ranker order", "status": "error"}},
        {"task_id": "plain", **base},
    ]
    path = tmp_path / "old.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    records = read_records(path)
    student, teacher, plain = records["student"], records["teacher"], records["plain"]
    assert student.well_formed is False and student.repaired and student.constrained
    assert student.generation_requests == 4 and student.shown is None
    assert teacher.fallback and teacher.repaired and teacher.generation_requests == 9
    assert plain.well_formed is None and not plain.fallback and plain.generation_requests == 1
    # the shown order of old records is not known: identity and tau are left out
    from starrec.evaluation.runner import results_json

    m = results_json("old", "d", "test", list(records.values()), {}, n_resamples=10)["metrics"]
    assert m["shown_order_identity"] is None and m["kendall_tau_shown"] is None
    assert m["fallback_rate"] == pytest.approx(100 / 3, abs=0.01)


def test_results_carry_their_provenance(tiny, tmp_path):
    from starrec.config import StarConfig
    from starrec.data.tasks import write_tasks
    from starrec.evaluation.identity import code_version, tasks_sha256
    from starrec.evaluation.runner import evaluate_baseline, subset_result

    config = StarConfig()
    config.eval.bootstrap_resamples = 10
    tasks = build_split_tasks(tiny, "test")
    result, records = evaluate_baseline("pop", tiny, tasks, config)
    p = result["provenance"]
    assert set(p) == {"dataset_fingerprint", "tasks_sha256", "config_hash", "model_hash",
                      "code_version", "machine"}
    assert p["dataset_fingerprint"] == tiny.fingerprint() and p["tasks_sha256"] == tasks_sha256(tasks)
    assert p["model_hash"] is None and len(p["config_hash"]) == 16
    assert p["code_version"] == code_version()
    assert set(p["machine"]) == {"cores", "cpu_model", "platform"} and p["machine"]["cores"] >= 1
    # the file's sha256 when the tasks came from one; another config, another hash
    path = tmp_path / "t.jsonl"
    _, digest = write_tasks(tasks[:3], path)
    again, _ = evaluate_baseline("pop", tiny, tasks[:3], config, tasks_path=path)
    assert again["provenance"]["tasks_sha256"] == digest
    assert again["provenance"]["config_hash"] == p["config_hash"]
    random, _ = evaluate_baseline("random", tiny, tasks[:3], config)
    assert random["provenance"]["config_hash"] != p["config_hash"]
    subset = subset_result(result, records, {tasks[0].task_id}, config, tasks_sha256="abc")
    assert subset["n_tasks"] == 1 and subset["provenance"]["tasks_sha256"] == "abc"
    assert subset["provenance"]["dataset_fingerprint"] == tiny.fingerprint()


def test_cpu_model_comes_from_cpuinfo(tmp_path):
    from starrec.evaluation.provenance import cpu_model

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Example CPU @ 2.0GHz\n")
    assert cpu_model(info) == "Example CPU @ 2.0GHz"
    assert cpu_model(tmp_path / "missing") == (__import__("platform").processor() or None)


def teacher_run(attempts, fallback=None):
    from starrec.trajectories.schema import Step, TeacherRun

    steps = [Step(kind="llm", agent="planner", output="plan")]
    steps += [Step(kind="llm", agent="ranker", output=text, error=error, constrained=constrained)
              for text, error, constrained in attempts]
    shown = [f"i{k}" for k in (3, 1, 2, 0)]
    ranking = [shown[k] for k in (2, 0, 1, 3)]
    return TeacherRun(task_id="t", task={"candidates": shown}, model="m", config={}, steps=steps,
                      ranking=ranking, ranking_indices=[2, 0, 1, 3], fallback=fallback,
                      llm_calls=len(steps), status="error" if fallback else "ok")


def test_teacher_answers_say_how_they_were_formed():
    from starrec.agents.system import recommendation

    clean = recommendation(teacher_run([("<recommend>[C, A, B, D]</recommend>", None, True)]))
    assert clean.shown == ["i3", "i1", "i2", "i0"]
    assert clean.well_formed and not clean.repaired and clean.constrained
    assert clean.generation_requests == 2 and not clean.fallback

    reasked = recommendation(teacher_run([("[C, C]", "C twice", False), ("[C, A, B, D]", None, False)]))
    assert not reasked.well_formed and reasked.repaired and not reasked.constrained
    assert reasked.generation_requests == 3

    fell_back = recommendation(teacher_run([("junk", "no list", True)], fallback="ranking unusable"))
    assert fell_back.fallback and fell_back.repaired and not fell_back.well_formed
    assert not fell_back.constrained


def test_student_answers_say_how_they_were_formed(world):
    from starrec.evaluation.metrics import complete_ranking
    from starrec.inference.student import StudentAnswer
    from starrec.inference.system import StarSystem
    from starrec.trajectories.format import ParsedOutput

    _, tasks = world
    task = tasks[0]
    shown = list(reversed(task.candidates))

    class FakeStudent:
        def __init__(self, **answer):
            self.answer_fields = answer

        def shown(self, task):
            from dataclasses import replace

            return replace(task, candidates=shown)

        def answer(self, task):
            parsed = ParsedOutput()
            parsed.well_formed = self.answer_fields.pop("parsed_well_formed")
            return StudentAnswer(text="", parsed=parsed, ranking=shown,
                                 completed=complete_ranking(shown, task.candidates),
                                 **self.answer_fields)

    clean = StarSystem(FakeStudent(parsed_well_formed=True, segments=4)).recommend(task)
    assert clean.shown == shown and clean.well_formed and not clean.repaired
    assert clean.llm_calls == clean.generation_requests == 4 and not clean.constrained
    masked = StarSystem(FakeStudent(parsed_well_formed=False, segments=5, repaired=True)).recommend(task)
    assert not masked.well_formed and masked.repaired and masked.constrained
    call = StarSystem(FakeStudent(parsed_well_formed=False, segments=6,
                                  repaired_calls=["{bad"])).recommend(task)
    assert not call.well_formed and call.repaired and not call.constrained


def test_report_shows_what_each_llm_row_adds():
    from starrec.evaluation.report import full_report, llm_table

    def result(system, llm_calls, metrics, config):
        base = {k: 50.0 for k in ("HR@1", "HR@3", "HR@5", "AvgHR", "NDCG@10", "MRR", "valid_rate")}
        return {"system": system, "split": "test", "n_tasks": 200, "config": config,
                "metrics": {**base, **metrics}, "ci95": {"AvgHR": [40.0, 60.0]},
                "efficiency": {"median_s": 1.0, "p95_s": 2.0, "llm_calls_per_task": llm_calls,
                               "prompt_tokens_per_task": 10.0, "completion_tokens_per_task": 5.0}}

    teacher = result("mars", 11, {"shown_order_identity": 12.5, "kendall_tau_shown": 0.4312,
                                  "well_formed_rate": 80.0, "repaired_rate": 20.0,
                                  "constrained_rate": 100.0, "fallback_rate": 1.5},
                     {"users": "eval-200", "params": {"candidate_order": "presented"}})
    student = result("star", 4, {}, {"users": "eval-200", "candidate_order": "cst"})  # older JSON
    ranker = result("cst", 0, {}, {})
    rows = llm_table([ranker, teacher, student]).splitlines()
    assert len(rows) == 4 and "shown-order identity" in rows[0] and "presentation" in rows[0]
    assert rows[2] == ("| mars | test eval-200 | 200 | task file (shuffled) | 12.5 | 0.43 | 80.0 | "
                       "20.0 | 100.0 | 1.5 | 50.0 |")
    assert rows[3].startswith("| star | test eval-200 | 200 | cst ranker's order | – | – | – |")
    assert llm_table([ranker]) == "" and "shown-order identity" in full_report([ranker, teacher])
