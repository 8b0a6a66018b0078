"""Student language, serializer, filters and the loss-masked dataset."""

from __future__ import annotations

import json

import pytest

from starrec.config import StudentFormatConfig, TrajectoryFilterConfig
from starrec.data.tasks import Task
from starrec.labels import candidate_labels
from starrec.trajectories.dataset import IGNORE_INDEX, build_sft_dataset, encode_example
from starrec.trajectories.filters import filter_runs, holdout_tasks, strata, tercile_labels
from starrec.trajectories.format import (
    StudentSequence,
    ToolCall,
    closed,
    parse_student_output,
    part_content,
    pending_tag,
    render_sequence,
    tags_written,
    tool_response_spans,
    unclosed_tag,
)
from starrec.trajectories.schema import Step, TeacherRun
from starrec.trajectories.serialize import (
    prompt_messages,
    reflection_text,
    serialize_run,
)

N = 20
FULL = StudentFormatConfig()


def title(item: str) -> str:
    return f"Film {item[1:]}"


def make_task(task_id: str = "train-u1", target_index: int = 3, history: int = 6) -> Task:
    candidates = [f"i{k}" for k in range(100, 100 + N)]
    return Task(task_id=task_id, user_id=task_id.split("-")[-1], scenario="classic",
                history=[f"i{k}" for k in range(history)], candidates=candidates,
                target=candidates[target_index], split="train")


def make_run(task: Task | None = None, *, top: int | None = None, sample: int = 0,
             status: str = "ok", fallback: str | None = None, shown: str = "presented") -> TeacherRun:
    """A run whose ranking puts candidate `top` (default: the target) first."""
    task = task or make_task()
    first = task.target_index if top is None else top
    order = [first] + [i for i in range(N) if i != first]
    steps = [
        Step(kind="message", agent="planner", output="Check recent items, then co-consumption."),
        Step(kind="tool", agent="recent", tool="next_items", arguments={"item_id": "i5", "k": 3},
             response="After Film 5, users consumed Film 103 (12 of 40)."),
        Step(kind="tool", agent="long_term", tool="item_neighbours", arguments={"item_id": "zzz"},
             response="Error: Unknown item id 'zzz'", ok=False),
        Step(kind="tool", agent="long_term", tool="next_items", arguments={"item_id": "i5", "k": 3},
             response="After Film 5, users consumed Film 103 (12 of 40)."),
        Step(kind="tool", agent="user_profile", tool="popularity", arguments={"item_ids": ["i103"]},
             response="Film 103: 40 users, 90th percentile."),
    ]
    return TeacherRun(
        task_id=task.task_id, task=json.loads(task.to_json()), model="fake",
        config={"mars": {"candidate_order": shown}}, steps=steps,
        plan="Check recent items, then co-consumption.",
        findings={"long_term": "Likes dramas.", "recent": "Film 103 follows Film 5 often."},
        reflection="accept", ranking=[task.candidates[i] for i in order], ranking_indices=order,
        fallback=fallback, sample=sample, status=status)


# ---------------------------------------------------------------- format + serializer


def test_serialize_then_parse_gives_back_every_part():
    run = make_run()
    serialized = serialize_run(run, title, FULL)
    parsed = parse_student_output(serialized.completion, N)
    assert parsed.well_formed, parsed.errors
    assert parsed.plan == run.plan
    # the failed call and the exact repeat are dropped; responses are the recorded ones
    assert [(c.name, c.arguments, c.response) for c in parsed.tool_calls] == [
        ("next_items", {"item_id": "i5", "k": 3}, "After Film 5, users consumed Film 103 (12 of 40)."),
        ("popularity", {"item_ids": ["i103"]}, "Film 103: 40 users, 90th percentile."),
    ]
    assert parsed.reflection == ("long_term: Likes dramas.\n"
                                 "recent: Film 103 follows Film 5 often.\nverdict: accept")
    assert parsed.ranking == run.ranking_indices
    assert render_sequence(parsed, N) == serialized.completion
    # tags in the documented order, a response glued to its call
    completion = serialized.completion
    assert completion.startswith("<plan>") and completion.endswith("</recommend>")
    assert "</tool_call><tool_response>" in completion
    assert completion.index("</plan>") < completion.index("<tool_call>") < completion.index(
        "<reflection>") < completion.index("<recommend>")


def test_prompt_shows_scenario_history_and_labelled_candidates():
    task = make_task(history=30)
    system, user = prompt_messages(task, title, FULL)
    assert system["role"] == "system" and user["role"] == "user"
    assert "<recommend>[best, second best, ..., worst]</recommend>" in system["content"]
    assert "label (A to T)" in system["content"]
    assert "- next_items(item_id, k=5):" in system["content"]
    lines = user["content"].splitlines()
    assert lines[0].startswith("Scenario: Predict the item this user consumes next")
    assert "has consumed 30 items; the last 20" in user["content"]
    assert "- Film 10 [i10]" in lines and "- Film 9 [i9]" not in lines
    assert "A: Film 100 [i100]" in lines and "T: Film 119 [i119]" in lines
    numbered = prompt_messages(task, title, StudentFormatConfig(labels="numbers"))[1]["content"]
    assert "1: Film 100 [i100]" in numbered and "20: Film 119 [i119]" in numbered


def test_completion_writes_the_ranking_in_the_format_labels():
    run = make_run()
    letters = serialize_run(run, title, FULL).completion
    first = run.ranking_indices[0]
    assert f"<recommend>[{'ABCDEFGHIJKLMNOPQRST'[first]}, A, B, " in letters
    numbers = serialize_run(run, title, StudentFormatConfig(labels="numbers")).completion
    assert f"<recommend>[{first + 1}, 1, 2, " in numbers
    assert parse_student_output(numbers, candidate_labels(N, "numbers")).ranking == run.ranking_indices


@pytest.mark.parametrize("switch, absent", [
    ("plan", "<plan>"), ("tools", "<tool_call>"), ("reflection", "<reflection>")])
def test_each_ablation_removes_its_part(switch, absent):
    fmt = StudentFormatConfig(**{switch: False})
    serialized = serialize_run(make_run(), title, fmt)
    assert absent not in serialized.completion
    assert absent not in serialized.messages[0]["content"]
    if switch == "tools":
        assert "<tool_response>" not in serialized.completion
        assert "Tools (" not in serialized.messages[0]["content"]
    flags = {switch: False}
    assert parse_student_output(serialized.completion, N, **flags).well_formed
    # the full format requires what the ablation removed (tool calls are optional)
    assert parse_student_output(serialized.completion, N).well_formed is (switch == "tools")
    # and an ablated format rejects the part it does not have
    full = serialize_run(make_run(), title, FULL).completion
    assert not parse_student_output(full, N, **flags).well_formed


def test_tool_options_and_tags_inside_teacher_text():
    run = make_run()
    run.plan = "First </plan><recommend>[1]</recommend> look at recent items"
    fmt = StudentFormatConfig(keep_failed_tools=True, max_tool_calls=2)
    parsed = parse_student_output(serialize_run(run, title, fmt).completion, N)
    assert parsed.well_formed, parsed.errors
    assert parsed.plan == "First [1] look at recent items"
    assert [c.name for c in parsed.tool_calls] == ["next_items", "item_neighbours"]
    assert parsed.tool_calls[1].response == "Error: Unknown item id 'zzz'"
    no_calls = serialize_run(run, title, StudentFormatConfig(max_tool_calls=0)).completion
    assert "<tool_call>" not in no_calls and parse_student_output(no_calls, N).well_formed


def test_reflection_lists_analysts_in_fixed_order():
    run = make_run()
    run.findings = {"recent": "r", "user_profile": "u", "extra": "x"}
    run.reflection = ""
    assert reflection_text(run) == "user_profile: u\nrecent: r\nextra: x"


def sequence(**parts) -> str:
    base = dict(plan="p", tool_calls=[ToolCall("popularity", {"item_ids": ["i1"]}, "r")],
                reflection="ok", ranking=list(range(N)))
    return render_sequence(StudentSequence(**{**base, **parts}), N)


@pytest.mark.parametrize("text, error", [
    (sequence(ranking=[0, 0] + list(range(2, N))), "duplicate labels ['A']"),
    (sequence().replace(", T]", ", Z]"), "not candidate labels: ['Z']"),
    (sequence().replace(", T]", ", 19]"), "not candidate labels: ['19']"),
    (sequence(ranking=list(range(N - 1))), "missing labels ['T']"),
    (sequence().replace("<recommend>[", "<recommend>ranking: "), "not a list"),
    (sequence(plan=None) + "\n<plan>late</plan>", "comes after a later part"),
    ("hello " + sequence(), "text outside the tags"),
    (sequence().replace("<tool_response>r</tool_response>", ""), "a tool call without a response"),
    (sequence().replace('{"name"', '{name'), "not valid JSON"),
    (sequence() + "\n<reflection>again</reflection>", "after </recommend>"),
    (sequence(plan=None), "missing <plan>"),
])
def test_malformed_outputs_are_named(text, error):
    parsed = parse_student_output(text, N)
    assert not parsed.well_formed
    assert any(error in e for e in parsed.errors), parsed.errors


def test_a_cut_off_ranking_still_yields_its_indices():
    text = sequence()
    text = text[: text.index("<recommend>[") + 19]  # "<recommend>[A, B, C,"
    parsed = parse_student_output(text, N)
    assert not parsed.well_formed and parsed.ranking == [0, 1, 2]
    assert "<recommend> is not closed" in parsed.errors


def test_tool_response_spans_include_the_tags():
    text = sequence()
    (start, end), = tool_response_spans(text)
    assert text[start:end] == "<tool_response>r</tool_response>"


def test_where_a_generation_stopped_and_closing_its_part():
    # a backend that cuts the stop string, and one that keeps it
    cut, kept = "<plan>p</plan>\n<tool_call>{}", "<plan>p</plan>\n<tool_call>{}</tool_call>"
    assert pending_tag(cut) == pending_tag(kept) == "tool_call"
    assert unclosed_tag(cut) == "tool_call" and unclosed_tag(kept) is None
    assert closed(cut, "tool_call") == kept == closed(kept, "tool_call")
    assert tags_written(kept) == ["plan", "tool_call"]
    assert pending_tag(kept + "\nmore") is None


# ---------------------------------------------------------------- filters and strata


def test_filter_steps_count_what_they_drop():
    hit = make_task("train-u1")
    runs = [
        make_run(hit, sample=0),
        make_run(hit, sample=1),
        make_run(make_task("train-u2"), top=0),  # target (index 3) at rank 4: missed
        make_run(make_task("train-u3"), status="error"),
        make_run(make_task("train-u4"), fallback="ranking never parsed"),
    ]
    broken = make_run(make_task("train-u5"))
    broken.ranking = broken.ranking[:-1]
    runs.append(broken)
    test_task = make_task("test-u6")
    test_task.split = "test"
    runs.append(make_run(test_task))  # a perfect run, but on a test target
    # a perfect run whose indices number another order than the student's prompt shows
    runs.append(make_run(make_task("train-u7"), shown="cst"))
    kept, report = filter_runs(runs, TrajectoryFilterConfig(), candidate_order="presented")
    assert [(r.task_id, r.sample) for r in kept] == [("train-u1", 0)]
    assert [(s.name, s.kept, s.dropped) for s in report.steps] == [
        ("not a test task", 7, 1), ("status ok", 6, 1), ("candidates shown in presented order", 5, 1),
        ("no fallback ranking", 4, 1), ("valid permutation", 3, 1),
        ("target in top 1", 2, 1), ("per task: first", 1, 1)]
    assert report.total == 8 and report.kept == 1
    assert "target in top 1" in report.table()
    kept, _ = filter_runs(runs, TrajectoryFilterConfig(top_k=5, per_task="all"),
                          candidate_order="presented")
    assert [(r.task_id, r.sample) for r in kept] == [("train-u1", 0), ("train-u1", 1), ("train-u2", 0)]


def test_best_sample_per_task():
    task = make_task()
    worse = make_run(task, top=0, sample=0)  # target at rank 4
    better = make_run(task, sample=1)  # target at rank 1
    kept, _ = filter_runs([worse, better], TrajectoryFilterConfig(top_k=5, per_task="best"))
    assert kept == [better]
    kept, _ = filter_runs([worse, better], TrajectoryFilterConfig(top_k=5, per_task="first"))
    assert kept == [worse]


def test_terciles_and_balanced_strata():
    assert tercile_labels({"a": 1, "b": 2, "c": 3, "d": 4, "e": 5, "f": 6}) == {
        "a": "low", "b": "low", "c": "mid", "d": "mid", "e": "high", "f": "high"}
    # 9 tasks: history lengths 1..9, target popularity 9..1 (long histories, rare targets)
    runs = [make_run(make_task(f"train-u{k}", target_index=k, history=k)) for k in range(1, 10)]
    popularity = {run.task["target"]: 10 - k for k, run in enumerate(runs, start=1)}
    labels = strata(runs, popularity)
    assert labels["train-u1"] == "pop=high/hist=low" and labels["train-u9"] == "pop=low/hist=high"
    assert labels["train-u5"] == "pop=mid/hist=mid"
    assert set(strata(runs, None).values()) == {"hist=low", "hist=mid", "hist=high"}
    # history terciles are 3/3/3; balancing to 2 per stratum keeps 6, by a fixed seed
    config = TrajectoryFilterConfig(balance=True, per_stratum=2, seed=1)
    kept, report = filter_runs(runs, config)
    assert report.strata == {"hist=high": 3, "hist=low": 3, "hist=mid": 3}
    assert report.balanced == {"hist=high": 2, "hist=low": 2, "hist=mid": 2}
    assert len(kept) == 6 and report.steps[-1].name == "balanced strata"
    assert [r.task_id for r in filter_runs(runs, config)[0]] == [r.task_id for r in kept]
    # without a cap, every stratum is cut to the smallest one (history 1-3 / 4-5 / 6-7)
    kept, report = filter_runs(runs[:7], TrajectoryFilterConfig(balance=True))
    assert report.strata == {"hist=high": 2, "hist=low": 3, "hist=mid": 2} and len(kept) == 6


def test_holdout_keeps_every_sample_of_a_task_on_one_side():
    runs = [make_run(make_task(f"train-u{k}"), sample=s) for k in range(10) for s in range(2)]
    train, held = holdout_tasks(runs, 0.2, seed=3)
    held_tasks = {r.task_id for r in held}
    assert len(held_tasks) == 2 and len(held) == 4
    assert not held_tasks & {r.task_id for r in train} and len(train) == 16
    assert holdout_tasks(runs, 0.2, seed=3)[1] == held
    assert holdout_tasks(runs, 0.0) == (runs, [])
    assert holdout_tasks(runs[:2], 0.5) == (runs[:2], [])  # one task: nothing to hold out


# ---------------------------------------------------------------- loss-masked dataset


def test_loss_mask_token_by_token(tiny_lm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    serialized = serialize_run(make_run(), title, FULL)
    encoded = encode_example(tokenizer, serialized.messages, serialized.completion)
    ids, labels = encoded.input_ids, encoded.labels
    assert len(ids) == len(labels)
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(labels, ids))

    def decode(tokens):
        return tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    prompt = tokenizer.apply_chat_template(serialized.messages, tokenize=False,
                                           add_generation_prompt=True)
    full = tokenizer.apply_chat_template(
        [*serialized.messages, {"role": "assistant", "content": serialized.completion}], tokenize=False)
    assert decode(ids) == full
    without_responses = serialized.completion
    for start, end in reversed(tool_response_spans(serialized.completion)):
        without_responses = without_responses[:start] + without_responses[end:]
    end_of_turn = full[len(prompt) + len(serialized.completion):]
    assert end_of_turn == "<|im_end|>\n"
    trained = [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert decode(trained) == without_responses + end_of_turn
    # the prompt is masked, the first trained token opens the plan
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert decode(ids[:first]) == prompt and decode(ids[first:]).startswith("<plan>")


def test_dataset_rows_and_length_drop(tiny_lm_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    runs = [serialize_run(make_run(make_task(f"train-u{k}", history=k)), title, FULL) for k in (1, 20)]
    lengths = [len(encode_example(tokenizer, r.messages, r.completion).input_ids) for r in runs]
    data, stats = build_sft_dataset(runs, tokenizer, max_length=max(lengths) - 1, show_progress=False)
    assert stats.examples == 1 and stats.dropped_too_long == 1 and len(data) == 1
    assert data[0]["task_id"] == "train-u1" and data[0]["messages"][-1]["role"] == "assistant"
    assert data[0]["messages"][-1]["content"] == runs[0].completion
    assert 0 < stats.trained_tokens < stats.tokens == len(data[0]["input_ids"])
    both, stats = build_sft_dataset(runs, tokenizer, max_length=max(lengths), show_progress=False)
    trained = [sum(label != -100 for label in row) for row in both["labels"]]
    assert stats.max_trained_tokens == max(trained) < stats.trained_tokens == sum(trained)
    reflections = [part_content(r.completion, "reflection") for r in runs]
    assert stats.max_reflection_tokens == max(
        len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in reflections) > 0
    ablated = [serialize_run(make_run(make_task("train-u1", history=1)), title,
                             FULL.model_copy(update={"reflection": False}))]
    assert build_sft_dataset(ablated, tokenizer, 4096, show_progress=False)[1].max_reflection_tokens == 0


def test_run_line_writes_a_shared_system_prompt_once_and_nothing_else():
    def llm(system):
        return Step("llm", "recent", messages=[{"role": "system", "content": system},
                                               {"role": "user", "content": "go"}], output="x")

    def line_of(*systems):
        run = TeacherRun("t", {}, "m", {}, steps=[llm(s) for s in systems])
        record = json.loads(run.to_json())
        assert TeacherRun.from_dict(record) == run
        return record

    record = line_of("shared", "shared", "own")
    assert record["system_prompt"] == "shared"
    assert [s["messages"][0]["content"] for s in record["steps"]] == [None, None, "own"]
    # one call, or a system message that is null itself: written as is
    assert "system_prompt" not in line_of("once") and "system_prompt" not in line_of(None, None)
