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
    # records written before they kept a system's details read back with none
    lines = checkpoint.read_text().splitlines()
    old = {k: v for k, v in json.loads(lines[0]).items() if k != "details"}
    checkpoint.write_text(json.dumps(old) + "\n" + "\n".join(lines[1:]) + "\n")
    assert read_records(checkpoint)[tasks[0].task_id] == records[0]


def test_checkpoint_of_another_task_file_is_refused(tiny, tmp_path):
    tasks = build_split_tasks(tiny, "test")[:2]
    checkpoint = tmp_path / "records.jsonl"
    run_tasks(CountingSystem(), tasks, progress=False, checkpoint=checkpoint)
    lines = checkpoint.read_text().splitlines()
    record = json.loads(lines[0])
    record["target"] = "some other item"
    checkpoint.write_text(json.dumps(record) + "\n")
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
