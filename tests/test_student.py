"""Single-pass student inference: tool calls answered mid-generation, rankings completed."""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import replace

import pytest

from starrec.config import LLMConfig, StarConfig, StudentConfig, StudentFormatConfig
from starrec.core.tool_calls import tool_call_json
from starrec.cst.ranker import CSTRanker
from starrec.cst.tools import ToolExecutor, task_tool_calls, tool_specs
from starrec.evaluation.runner import read_records, run_tasks
from starrec.inference.student import Student, list_budget
from starrec.inference.system import StarSystem, load_star_system
from starrec.llm.base import ChoiceConstraint, LLMError, PermutationConstraint
from starrec.llm.card import ModelCard, write_model_card
from starrec.trajectories.format import parse_student_output, render_ranking, tool_response_spans
from starrec.trajectories.grammar import DONE, PARTS, START, Grammar
from tests.fakes import ScriptedModel, ranking


def tool_call(name: str, **arguments) -> str:
    return f'<tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'


def opened(call: str) -> str:
    """A tool call as the student writes it after a chosen `<tool_call>` opening."""
    return call.removeprefix("<tool_call>")


def paused(text: str) -> list[str]:
    """`reflection</reflection>\n<recommend>list</recommend>` as a student under masks
    writes it: the reflection pauses at its end and the ranking's opening follows
    without a decode, so two continuations."""
    reflection, ranking = text.split("</reflection>\n<recommend>")
    return [reflection, ranking]


def order(first: list[int], n: int = 20) -> str:
    """A list of letter labels with the 0-based `first` at the top."""
    return ranking(n, first)


def test_tool_call_is_answered_with_the_real_response_and_a_malformed_list_completed(
        world, tmp_path):
    store, tasks = world
    task = tasks[0]
    last = task.history[-1]
    seen = {}

    def after_tool(messages):
        seen["text"] = messages[-1]["content"]
        return "\n<reflection>neighbours favour 3</reflection>\n<recommend>[D, D, B, Z]</recommend>"

    call = tool_call("item_neighbours", item_id=last, k=2)
    model = ScriptedModel([f"<plan>look at the last item</plan>\n{call}", after_tool])
    student = Student(model, store)
    answer = student.answer(task)
    # labels name the candidates in the task file's order (format.candidate_order)
    shown = student.shown(task)
    assert shown.candidates == task.candidates
    assert f"A: {store.title(shown.candidates[0])}" in student.prompt(task)
    expected = ToolExecutor(store, shown).call("item_neighbours", {"item_id": last, "k": 2}).text

    # the continuation saw prompt + the call + the REAL tool response, nothing else
    assert seen["text"].endswith(
        f"</tool_call><tool_response>{expected}</tool_response>")
    assert seen["text"].startswith(student.prompt(task))
    assert model.calls[0].kwargs["stop"] == ["</tool_call>", "</recommend>"]
    assert answer.text.endswith("</recommend>") and answer.stop == "recommend"
    assert answer.segments == 2 and [c.name for c in answer.tool_calls] == ["item_neighbours"]
    assert answer.parsed.tool_calls[0].response == expected
    # duplicates and a label that does not exist: malformed, completed per DESIGN.md 3.4
    assert not answer.parsed.well_formed
    c = shown.candidates
    assert answer.ranking == [c[3], c[3], c[1], "#?"]
    # the rest follows in the task file's presented order (DESIGN.md 3.4)
    rest = [x for x in task.candidates if x not in (c[1], c[3])]
    assert answer.completed.ranking == [c[3], c[1], *rest] and not answer.completed.valid

    model = ScriptedModel([f"<plan>p</plan>\n{tool_call('popularity', item_ids=[c[0]])}",
                           "\n<reflection>r</reflection>\n<recommend>[D, D]</recommend>"])
    system = StarSystem(Student(model, store))
    record, = run_tasks(system, [task], progress=False, checkpoint=tmp_path / "records.jsonl")
    first_unranked = next(x for x in task.candidates if x != c[3])
    # a pass is as many generation requests as it has continuations (here 2)
    assert record.llm_calls == record.generation_requests == 2
    assert not record.valid and record.ranking[:2] == [c[3], first_unranked]
    # what the student wrote is kept with its record, for reading a number back to its text
    kept = read_records(tmp_path / "records.jsonl")[task.task_id]
    assert kept == record and kept.details["text"].endswith("<recommend>[D, D]</recommend>")


def test_constrained_pass_opens_with_plan_and_repairs_a_broken_list(world):
    store, tasks = world
    task = tasks[2]
    fixed = order([4, 1])
    model = ScriptedModel(["look at it</plan>\n<reflection>r</reflection>\n<recommend>[E, E, B",
                           fixed], supports=[PermutationConstraint])
    student = Student(model, store)
    answer = student.answer(task)
    first, second = model.calls
    assert first.messages[-1]["content"].endswith("<plan>")  # the pass opens with the tag
    assert first.kwargs.get("constraint") is None
    assert second.kwargs["constraint"] == PermutationConstraint(20)
    assert second.messages[-1]["content"].endswith("<reflection>r</reflection>\n<recommend>")
    shown = student.shown(task).candidates
    assert answer.repaired and answer.ranking[:2] == [shown[4], shown[1]]
    assert answer.completed.valid and answer.segments == 2
    assert answer.text.endswith(f"<recommend>{fixed}</recommend>")
    assert not answer.parsed.well_formed  # the student's own text stays judged as written

    # no list at all: one is decoded after the text, an open part closed first; a valid
    # list is left alone
    model = ScriptedModel(["rambling without an end", fixed], supports=[PermutationConstraint])
    answer = Student(model, store).answer(task)
    assert answer.repaired and answer.completed.valid
    assert answer.text == f"<plan>rambling without an end</plan>\n<recommend>{fixed}</recommend>"
    model = ScriptedModel([f"p</plan>\n<reflection>r</reflection>\n<recommend>{fixed}</recommend>"],
                          supports=[PermutationConstraint])
    answer = Student(model, store).answer(task)
    assert not answer.repaired and len(model.calls) == 1 and answer.completed.valid
    # without a mask the pass is left as written
    model = ScriptedModel(["<plan>p</plan><recommend>[E, E]</recommend>"])
    answer = Student(model, store).answer(task)
    assert not answer.repaired and not answer.completed.valid


def test_constrained_pass_chooses_its_plan_among_the_card_choices(world):
    store, tasks = world
    task = tasks[0]
    plans = ("recent: the latest items\nlong_term: lasting interests", "recent: the latest items")
    final = f"r</reflection>\n<recommend>{order([2])}</recommend>"
    masks = [PermutationConstraint, ChoiceConstraint]
    model = ScriptedModel([plans[1], "\n<reflection>", *paused(final)], supports=masks)
    answer = Student(model, store, plan_choices=plans).answer(task)
    choice, part, rest, ranking = model.calls
    assert choice.kwargs["constraint"] == ChoiceConstraint(plans)
    assert choice.messages[-1]["content"].endswith("<|im_start|>assistant\n<plan>")
    # what follows the closed plan is chosen among the parts the format allows there
    assert part.kwargs["constraint"] == ChoiceConstraint(("\n<tool_call>", "\n<reflection>"))
    assert part.messages[-1]["content"].endswith(f"<plan>{plans[1]}</plan>")
    # the student goes on, its budget less the tokens of both choices
    assert rest.messages[-1]["content"].endswith(f"<plan>{plans[1]}</plan>\n<reflection>")
    assert rest.kwargs["max_tokens"] == 768 - (len(plans[1]) // 4 + 1) - (len("\n<reflection>") // 4 + 1)
    assert answer.chosen_plan and answer.parsed.well_formed and not answer.repaired
    assert answer.text == f"<plan>{plans[1]}</plan>\n<reflection>{final}" and answer.segments == 4
    # the reflection pauses at its end: only the ranking may follow, with nothing to choose
    assert "</reflection>" in rest.kwargs["stop"] and ranking.kwargs["constraint"] is None
    assert ranking.messages[-1]["content"].endswith("r</reflection>\n<recommend>")
    again = ScriptedModel([plans[1], "\n<reflection>", *paused(final)], supports=masks)
    assert StarSystem(Student(again, store, plan_choices=plans)).recommend(task).details["chosen_plan"]

    # no choices, an answer outside them or a failing backend: the student writes its own
    # plan after <plan>; it pauses at </plan> and what follows is chosen, as above.
    # Without a choice mask the student writes all of it.
    own = ["mine", "\n<reflection>", *paused(final)]
    for script, kwargs, supports in ((own, {}, masks),
                                     (["other", *own], {"plan_choices": plans}, masks),
                                     ([LLMError("down"), *own], {"plan_choices": plans}, masks),
                                     ([f"mine</plan>\n<reflection>{final}"], {"plan_choices": plans},
                                      [PermutationConstraint])):
        model = ScriptedModel(script, supports=supports)
        answer = Student(model, store, **kwargs).answer(task)
        assert not answer.chosen_plan and answer.text == f"<plan>mine</plan>\n<reflection>{final}"
        plan = next(call for call in model.calls if call.text.startswith("mine"))
        assert plan.messages[-1]["content"].endswith("<plan>") and plan.kwargs["constraint"] is None
        assert ("</plan>" in plan.kwargs["stop"]) == (ChoiceConstraint in supports)
        if ChoiceConstraint in supports:
            assert model.calls[-3].kwargs["constraint"].options == ("\n<tool_call>", "\n<reflection>")


def test_constrained_pass_chooses_each_next_part_within_the_tool_cap(world):
    store, tasks = world
    task = tasks[1]
    call = tool_call_json("item_neighbours", {"k": 5, "item_id": task.history[-1]})
    final = f"r</reflection>\n<recommend>{order([1])}</recommend>"
    plans = ("recent: the latest items", "long_term: lasting interests")
    model = ScriptedModel([plans[0], "\n<tool_call>", call, "\n<tool_call>", call, *paused(final)],
                          supports=[PermutationConstraint, ChoiceConstraint])
    student = Student(model, store, config=StudentConfig(max_tool_calls=2), plan_choices=plans)
    answer = student.answer(task)
    both = ChoiceConstraint(("\n<tool_call>", "\n<reflection>"))
    assert [c.kwargs["constraint"] for c in model.calls] == [
        ChoiceConstraint(plans), both, None, both, None, None, None]
    # at the cap the reflection is the only part left: it follows without a decode
    response = ToolExecutor(store, student.shown(task)).call(
        "item_neighbours", {"item_id": task.history[-1]}).text
    looked_up = f"\n<tool_call>{call}</tool_call><tool_response>{response}</tool_response>"
    assert model.calls[-2].messages[-1]["content"].endswith(f"{looked_up}\n<reflection>")
    assert answer.text == f"<plan>{plans[0]}</plan>{looked_up * 2}\n<reflection>{final}"
    assert answer.parsed.well_formed and answer.completed.valid and answer.segments == 7
    assert [c.name for c in answer.tool_calls] == ["item_neighbours"] * 2
    # a format without a reflection goes from the last response to the ranking
    fmt = StudentFormatConfig(reflection=False)
    model = ScriptedModel([plans[0], "\n<tool_call>", call, f"{order([1])}</recommend>"],
                          supports=[PermutationConstraint, ChoiceConstraint])
    answer = Student(model, store, fmt, StudentConfig(max_tool_calls=1), plan_choices=plans).answer(task)
    assert model.calls[1].kwargs["constraint"].options == ("\n<tool_call>", "\n<recommend>")
    assert model.calls[-1].messages[-1]["content"].endswith("</tool_response>\n<recommend>")
    assert answer.parsed.well_formed and answer.stop == "recommend"
    # a call the student wrote after its reflection (a choice failed, so it wrote on):
    # the ranking is all that may follow, never a second reflection
    model = ScriptedModel([plans[0], LLMError("busy"), f"\n<reflection>r</reflection>\n<tool_call>{call}",
                           f"{order([1])}</recommend>"],
                          supports=[PermutationConstraint, ChoiceConstraint])
    answer = Student(model, store, plan_choices=plans).answer(task)
    assert answer.text.count("<reflection>") == 1 and len(model.calls) == 4
    assert [c.name for c in answer.tool_calls] == ["item_neighbours"]
    assert model.calls[-1].messages[-1]["content"].endswith("</tool_response>\n<recommend>")


def test_constrained_pass_decodes_a_broken_tool_call_again_among_runnable_calls(world):
    store, tasks = world
    task = tasks[1]
    last = task.history[-1]
    chosen = tool_call_json("item_neighbours", {"k": 5, "item_id": last})  # as training wrote it
    part, final = "\n<reflection>", f"r</reflection>\n<recommend>{order([5, 2])}</recommend>"
    # the placeholder a weak student copies from its prompt's format description
    broken = '{"name": "TOOL", "arguments": {...}}'
    script = ["look", "\n<tool_call>", broken, chosen, part, *paused(final)]
    model = ScriptedModel(list(script), supports=[PermutationConstraint, ChoiceConstraint])
    student = Student(model, store)
    answer = student.answer(task)
    repair = model.calls[3]
    options = repair.kwargs["constraint"].options
    assert chosen in options and len(options) == len(set(options)) > 5
    executor = ToolExecutor(store, student.shown(task))
    for option in options:  # every option runs, written with its defaults as in training
        name, arguments = json.loads(option)["name"], json.loads(option)["arguments"]
        assert executor.arguments_for(name, arguments) == arguments
    assert repair.messages[-1]["content"].endswith("<plan>look</plan>\n<tool_call>")
    expected = executor.call("item_neighbours", {"item_id": last}).text
    assert model.calls[4].messages[-1]["content"].endswith(
        f"<tool_call>{chosen}</tool_call><tool_response>{expected}</tool_response>")
    assert "TOOL" not in answer.text and answer.repaired_calls == [broken] and not answer.repaired
    assert [(c.name, c.ok) for c in answer.tool_calls] == [("item_neighbours", True)]
    assert answer.segments == 7 and answer.completed.valid
    # the budget goes on after the repair's tokens; the pass is not the student's own form
    assert model.calls[5].kwargs["max_tokens"] == 768 - sum(
        len(call.text) // 4 + 1 for call in model.calls[:5])
    assert not answer.parsed.well_formed and broken in answer.parsed.errors[-1]
    again = ScriptedModel(list(script), supports=[PermutationConstraint, ChoiceConstraint])
    assert StarSystem(Student(again, store)).recommend(task).details["repaired_calls"] == [broken]

    # a call the schema rejects, or on an item that does not exist, is decoded again; a
    # backend that cannot mask a choice reads the error back
    bad_k = tool_call("item_neighbours", item_id=last, k="many")
    unknown = tool_call("item_neighbours", item_id="12345")
    for call, masks, repaired in ((bad_k, [PermutationConstraint, ChoiceConstraint], 1),
                                  (unknown, [PermutationConstraint, ChoiceConstraint], 1),
                                  (bad_k, [PermutationConstraint], 0),
                                  (unknown, [PermutationConstraint], 0)):
        # with a choice mask the parts after the plan and the response are chosen too
        script = (["p", "\n<tool_call>", opened(call)] + [chosen] * repaired + [part, *paused(final)]
                  if ChoiceConstraint in masks else ["p</plan>\n" + call, part + final])
        answer = Student(ScriptedModel(script, supports=masks), store).answer(task)
        assert len(answer.repaired_calls) == repaired and answer.completed.valid
        assert ("<tool_response>Error:" in answer.text) == (not repaired)

    # an answer outside the options (a server ignoring the mask) or a failing backend
    # leaves the call as written; with the budget spent nothing is decoded again
    masks = [PermutationConstraint, ChoiceConstraint]
    for reply in ("not a call", LLMError("timeout")):
        model = ScriptedModel(["p", "\n<tool_call>", opened(bad_k), reply, part, *paused(final)],
                              supports=masks)
        answer = Student(model, store).answer(task)
        assert not answer.repaired_calls and "<tool_response>Error: invalid k" in answer.text
        assert answer.completed.valid and answer.error == (None if reply == "not a call" else "timeout")
    model = ScriptedModel([bad_k, order([5])], supports=masks)
    answer = Student(model, store, StudentFormatConfig(plan=False),
                     StudentConfig(max_new_tokens=1)).answer(task)
    assert not answer.repaired_calls and answer.stop == "length" and answer.repaired
    assert model.calls[1].kwargs["constraint"] == PermutationConstraint(20)


def test_a_rambling_tool_call_is_cut_at_the_longest_runnable_call_and_decoded_again(world):
    store, tasks = world
    task = tasks[1]
    chosen = tool_call_json("item_neighbours", {"k": 5, "item_id": task.history[-1]})
    rambling = '{"name": "item_neighbours", "arguments": {"k": 5, "item_id": "12' + ",000" * 500
    final = f"r</reflection>\n<recommend>{order([3])}</recommend>"
    plans = ("recent: the latest items", "long_term: lasting interests")
    model = ScriptedModel([plans[0], "\n<tool_call>", rambling, chosen, "\n<reflection>", *paused(final)],
                          supports=[PermutationConstraint, ChoiceConstraint], honour_max_tokens=True)
    answer = Student(model, store, plan_choices=plans).answer(task)
    cut, repair = model.calls[2], model.calls[3]
    options = repair.kwargs["constraint"].options
    cap = ChoiceConstraint(options).max_tokens + len("</tool_call>")
    assert cut.kwargs["max_tokens"] == cap < 768 and cut.text == rambling[:(cap - 1) * 4]
    assert answer.repaired_calls == [cut.text] and chosen in answer.text
    assert [(c.name, c.ok) for c in answer.tool_calls] == [("item_neighbours", True)]
    assert answer.stop == "recommend" and answer.completed.valid and not answer.repaired
    # a call that fits the cap runs as written; the rest of the budget is uncapped
    model = ScriptedModel([plans[0], "\n<tool_call>", chosen, "\n<reflection>", *paused(final)],
                          supports=[PermutationConstraint, ChoiceConstraint], honour_max_tokens=True)
    answer = Student(model, store, plan_choices=plans).answer(task)
    assert not answer.repaired_calls and answer.parsed.well_formed
    assert model.calls[4].kwargs["max_tokens"] > cap
    # a call cut by the pass's budget, not the cap, ends the pass: nothing is looked up
    model = ScriptedModel([plans[0], "\n<tool_call>", rambling, order([3])],
                          supports=[PermutationConstraint, ChoiceConstraint], honour_max_tokens=True)
    answer = Student(model, store, config=StudentConfig(max_new_tokens=40), plan_choices=plans).answer(task)
    assert model.calls[2].kwargs["max_tokens"] < cap and model.calls[2].text != rambling
    assert answer.stop == "length" and not answer.tool_calls and "<tool_response>" not in answer.text
    assert answer.repaired and answer.completed.valid


def test_a_reflection_past_the_longest_trained_one_is_cut_and_the_ranking_follows(world):
    store, tasks = world
    task = tasks[0]
    plans = ("recent: the latest items", "long_term: lasting interests")
    long = "the evidence says " * 40
    masks = [PermutationConstraint, ChoiceConstraint]
    model = ScriptedModel([plans[0], "\n<reflection>", long, f"{order([4])}</recommend>"],
                          supports=masks, honour_max_tokens=True)
    answer = Student(model, store, plan_choices=plans, reflection_cap=10).answer(task)
    cut = model.calls[2]
    assert cut.kwargs["max_tokens"] == 10 + len("</reflection>") and cut.text == long[:(23 - 1) * 4]
    assert answer.reflection_cut and answer.stop == "recommend" and not answer.repaired
    assert answer.text.endswith(f"<reflection>{cut.text}</reflection>\n<recommend>{order([4])}</recommend>")
    assert answer.parsed.well_formed and answer.completed.ranking[0] == student_first(store, task, 4)
    # without a cap (a card without the count) the reflection runs to the budget
    model = ScriptedModel([plans[0], "\n<reflection>", long + "</reflection>", f"{order([4])}</recommend>"],
                          supports=masks, honour_max_tokens=True)
    answer = Student(model, store, plan_choices=plans).answer(task)
    assert not answer.reflection_cut and model.calls[2].kwargs["max_tokens"] > 700
    assert answer.parsed.well_formed


def student_first(store, task, index: int) -> str:
    return Student(ScriptedModel([]), store).shown(task).candidates[index]


def test_call_options_leave_out_what_a_schema_rejects(world):
    store, tasks = world
    task = tasks[1]
    # 21 candidates: popularity over all of them is over the tool's 20-item limit
    wide = replace(task, candidates=[*task.candidates, task.history[0]])
    shown = Student(ScriptedModel([]), store).shown(wide)
    calls = task_tool_calls(tool_specs(), shown, store, StudentFormatConfig().history_items,
                            executor=ToolExecutor(store, shown))
    options = [call.json() for call in calls]
    names = [json.loads(option)["name"] for option in options]
    assert "popularity" in names and "item_neighbours" in names
    assert all(len(json.loads(o)["arguments"].get("item_ids", [])) <= 20 for o in options)


def test_tool_errors_reach_the_model(world):
    store, tasks = world
    task = tasks[1]
    final = f"\n<reflection>r</reflection>\n<recommend>{order([5, 2])}</recommend>"
    model = ScriptedModel([
        "<plan>p</plan>\n" + tool_call("item_neighbours", item_id="nope"),
        '\n<tool_call>{"name": "popularity", "arguments": ',  # broken JSON
        final,
    ])
    recommendation = StarSystem(Student(model, store)).recommend(task)
    text = recommendation.details["text"]
    assert "<tool_response>Error: Unknown item id 'nope'" in text
    assert "<tool_response>Error: the tool call is not valid JSON" in text
    # a call the tool rejects is still well-formed; one that is not JSON is not
    assert recommendation.details["errors"] == [
        "the tool call is not valid JSON (Expecting value at char 36)"]
    shown = Student(model, store).shown(task).candidates
    assert recommendation.ranking[:2] == [shown[5], shown[2]]
    assert [c["ok"] for c in recommendation.details["tool_calls"]] == [False, False]
    assert recommendation.llm_calls == recommendation.details["segments"] == 3
    assert recommendation.prompt_tokens == sum(
        len(call.messages[0]["content"]) // 4 + 1 for call in model.calls)

    model = ScriptedModel(["<plan>p</plan>\n" + tool_call("item_neighbours", item_id="nope"), final])
    recommendation = StarSystem(Student(model, store)).recommend(task)
    assert recommendation.details["well_formed"], recommendation.details["errors"]


def test_tool_cap_then_stop(world):
    store, tasks = world
    task = tasks[2]
    call = tool_call("popularity", item_ids=[task.candidates[0]])
    model = ScriptedModel(["<plan>p</plan>\n" + call, "\n" + call, "\n" + call])
    answer = Student(model, store, config=StudentConfig(max_tool_calls=1)).answer(task)
    assert len(answer.tool_calls) == 1 and answer.stop == "tool_cap"
    assert "the limit of 1 tool calls is reached" in answer.text
    assert answer.ranking is None and answer.completed.ranking == task.candidates


def test_backend_error_keeps_what_was_generated(world):
    store, tasks = world
    task = tasks[0]
    model = ScriptedModel(["<plan>p</plan>\n" + tool_call("popularity", item_ids=[task.candidates[0]]),
                           LLMError("timeout")])
    answer = Student(model, store).answer(task)
    assert answer.stop == "error" and answer.error == "timeout"
    assert answer.text.startswith("<plan>p</plan>") and "<tool_response>" in answer.text
    assert not answer.completed.valid


def test_ablated_student_is_parsed_in_its_own_format(world):
    store, tasks = world
    task = tasks[0]
    model = ScriptedModel([f"<recommend>{order([1])}</recommend>"])
    fmt = StudentFormatConfig(plan=False, tools=False, reflection=False)
    student = Student(model, store, fmt)
    answer = student.answer(task)
    assert answer.parsed.well_formed and answer.completed.valid
    assert model.calls[0].kwargs["stop"] == ["</recommend>"]  # no pause for tool calls
    assert "<plan>" not in student.prompt(task) and "Tools (" not in student.prompt(task)
    assert not Student(ScriptedModel([f"<recommend>{order([1])}</recommend>"]), store).answer(
        task).parsed.well_formed


def test_real_tiny_model_single_pass(world, tiny_lm_dir, tmp_path):
    """The transformers backend end to end, through the model folder's star_model.json."""
    store, tasks = world
    folder = tmp_path / "student"
    shutil.copytree(tiny_lm_dir, folder)
    fmt = StudentFormatConfig(tools=False)  # keeps the prompt inside the tiny model's 1024 positions
    plans = ["a: the user", "b: the items"]
    write_model_card(folder, ModelCard(stage="sft", base_model="tiny", base_model_path=str(tiny_lm_dir),
                                       format=fmt, plan_choices=plans, max_reflection_tokens=5))
    config = StarConfig(student=StudentConfig(max_new_tokens=12, llm=LLMConfig(threads=1)))
    system = load_star_system(folder, store, config)
    assert system.student.fmt == fmt
    records = run_tasks(system, tasks[:2], progress=False)
    for record, task in zip(records, tasks):
        # 12 tokens of its own, then the list decoded again under the permutation mask
        assert record.llm_calls == record.generation_requests >= 2
        assert 12 < record.completion_tokens <= 12 + list_budget(20)
        assert record.prompt_tokens > 300 and record.valid
        assert sorted(record.ranking) == sorted(task.candidates)
    answer = system.student.answer(tasks[0])
    assert answer.stop in ("length", "end", "recommend", "tool_cap") and answer.segments >= 2
    # the card's plan choices reach the student; its plan is one of them, under a real mask
    assert system.student.plan_choices == tuple(plans) and answer.chosen_plan
    assert system.student.reflection_cap == 5
    assert any(answer.text.startswith(f"<plan>{plan}</plan>") for plan in plans)


def test_cst_presentation_and_number_labels_are_options(world):
    store, tasks = world
    task = tasks[3]
    final = f"<plan>p</plan>\n<reflection>r</reflection>\n<recommend>{order([2])}</recommend>"
    student = Student(ScriptedModel([final]), store, StudentFormatConfig(candidate_order="cst"))
    shown = student.shown(task).candidates
    assert shown == CSTRanker.on_store(store).rank(task) != task.candidates
    assert f"A: {store.title(shown[0])}" in student.prompt(task)
    assert student.answer(task).ranking[0] == shown[2]
    numbered = "<plan>p</plan>\n<reflection>r</reflection>\n<recommend>[3, " + ", ".join(
        str(i) for i in range(1, 21) if i != 3) + "]</recommend>"
    student = Student(ScriptedModel([numbered]), store, StudentFormatConfig(labels="numbers"))
    answer = student.answer(task)
    assert f"1: {store.title(task.candidates[0])}" in student.prompt(task)
    assert answer.parsed.well_formed and answer.ranking[0] == task.candidates[2]


# ---------------------------------------------------------------------------------------
# the grammar table (DESIGN.md 3.5) the pass's state machine follows


def test_grammar_table_of_the_full_format_and_under_the_cap():
    full = Grammar(max_tool_calls=2)
    assert full.table() == {
        "start": ("plan",),
        "plan": ("tool_call", "reflection"),
        "tool_call": ("tool_response",),
        "tool_response": ("tool_call", "reflection"),
        "reflection": ("recommend",),
        "recommend": ("done",),
        "done": (),
    }
    assert tuple(full.table()) == PARTS
    # at the cap the calls end: the reflection is all that follows a plan or a response
    assert full.follows("plan", calls=1) == ("tool_call", "reflection")
    assert full.follows("plan", calls=2) == full.follows("tool_response", calls=2) == ("reflection",)
    assert Grammar(max_tool_calls=0).follows("plan") == ("reflection",)
    assert Grammar().follows("tool_response", calls=1000) == ("tool_call", "reflection")  # no cap
    assert Grammar.of(StudentFormatConfig(reflection=False), 3) == Grammar(True, True, False, 3)


@pytest.mark.parametrize("plan, tools, reflection", list(itertools.product((True, False), repeat=3)))
def test_grammar_switches_leave_their_part_out(plan, tools, reflection):
    grammar = Grammar(plan, tools, reflection)
    table = grammar.table()
    conclusion = "reflection" if reflection else "recommend"
    evidence = (("tool_call",) if tools else ()) + (conclusion,)
    assert table["start"] == (("plan",) if plan else evidence)
    assert table["plan"] == table["tool_response"] == evidence
    assert table["tool_call"] == ("tool_response",) and table["reflection"] == ("recommend",)
    assert table["recommend"] == (DONE,) and table["done"] == ()
    # a part that is switched off follows nothing
    followed = {part for parts in table.values() for part in parts}
    assert ("plan" in followed) == plan and ("tool_call" in followed) == tools
    assert ("reflection" in followed) == reflection and "recommend" in followed


def _accepted(grammar: Grammar, parts: tuple[str, ...]) -> bool:
    """Whether the table leads from start through `parts` to done."""
    at, calls = START, 0
    for part in (*parts, DONE):
        if part not in grammar.follows(at, calls):
            return False
        at, calls = part, calls + (part == "tool_call")
    return True


@pytest.mark.parametrize("plan, tools, reflection", list(itertools.product((True, False), repeat=3)))
def test_grammar_table_and_parser_agree_on_every_short_sequence(plan, tools, reflection):
    """The table the student is decoded under and the parser that judges it (the GRPO
    format reward) accept the same sequences of parts, here every one of up to 5 parts."""
    text = {"plan": "<plan>p</plan>",
            "tool_call": '<tool_call>{"name": "popularity", "arguments": {"item_ids": ["1"]}}</tool_call>',
            "tool_response": "<tool_response>x</tool_response>",
            "reflection": "<reflection>r</reflection>", "recommend": render_ranking(range(3), 3)}
    grammar = Grammar(plan, tools, reflection)
    accepted = 0
    for length in range(1, 6):
        for parts in itertools.product(text, repeat=length):
            parsed = parse_student_output("\n".join(text[p] for p in parts), 3, plan=plan,
                                          tools=tools, reflection=reflection)
            assert parsed.well_formed == _accepted(grammar, parts), (parts, parsed.errors)
            accepted += parsed.well_formed
    assert accepted > 0


# ---------------------------------------------------------------------------------------
# what the runtime wrote into a pass (a trainer masks it out of the loss)


def _split(answer):
    """(what the runtime inserted, what the model wrote) of `answer.text`."""
    inside = {i for start, end in answer.inserted for i in range(start, end)}
    text = answer.text
    return ("".join(text[start:end] for start, end in answer.inserted),
            "".join(c for i, c in enumerate(text) if i not in inside))


def test_inserted_spans_are_what_the_runtime_wrote(world):
    store, tasks = world
    task = tasks[1]
    call = tool_call_json("item_neighbours", {"k": 5, "item_id": task.history[-1]})
    final = f"r</reflection>\n<recommend>{order([1])}</recommend>"
    plans = ("recent: the latest items", "long_term: lasting interests")
    model = ScriptedModel([plans[0], "\n<tool_call>", call, "\n<tool_call>", call, *paused(final)],
                          supports=[PermutationConstraint, ChoiceConstraint])
    student = Student(model, store, config=StudentConfig(max_tool_calls=2), plan_choices=plans)
    answer = student.answer(task)
    response = ToolExecutor(store, student.shown(task)).call(
        "item_neighbours", {"item_id": task.history[-1]}).text
    answered = f"</tool_call><tool_response>{response}</tool_response>"
    inserted, written = _split(answer)
    # the model's text is every continuation it decoded, in order (choices included);
    # the runtime's: the opening, closing tags, responses, the only options (at the cap
    # the reflection, after it the ranking)
    assert written == "".join(c.text for c in model.calls)
    assert inserted == ("<plan>" + "</plan>" + answered * 2 + "\n<reflection>" + "</reflection>"
                        + "\n<recommend>" + "</recommend>")
    spans = answer.inserted
    assert all(a < b < c for (a, b), (c, _) in zip(spans, spans[1:]))  # in order, apart
    # every tool response lies inside a span
    for start, end in tool_response_spans(answer.text):
        assert any(a <= start and end <= b for a, b in spans)


def test_inserted_spans_follow_a_repair(world):
    store, tasks = world
    task = tasks[1]
    last = task.history[-1]
    chosen = tool_call_json("item_neighbours", {"k": 5, "item_id": last})
    broken = '{"name": "TOOL", "arguments": {...}}'
    final = f"r</reflection>\n<recommend>{order([5, 2])}</recommend>"
    model = ScriptedModel(["look", "\n<tool_call>", broken, chosen, "\n<reflection>", *paused(final)],
                          supports=[PermutationConstraint, ChoiceConstraint])
    answer = Student(model, store).answer(task)
    inserted, written = _split(answer)
    # the broken call is gone from the text; the call chosen in its place is the model's
    assert answer.repaired_calls == [broken] and broken not in answer.text
    assert written == "".join(c.text for c in model.calls if c.text != broken)
    assert inserted.startswith("<plan></plan></tool_call><tool_response>")
    # a list decoded again after the text: the runtime closes the open part and opens it
    fixed = order([4, 1])
    model = ScriptedModel(["rambling without an end", fixed], supports=[PermutationConstraint])
    answer = Student(model, store).answer(task)
    assert answer.text == f"<plan>rambling without an end</plan>\n<recommend>{fixed}</recommend>"
    assert _split(answer) == ("<plan></plan>\n<recommend></recommend>", "rambling without an end" + fixed)
    # an unconstrained pass that wrote its tags itself: only the responses are the runtime's
    model = ScriptedModel(["<plan>p</plan>\n" + tool_call("item_neighbours", item_id=last),
                           f"\n<reflection>r</reflection>\n<recommend>{fixed}</recommend>"])
    answer = Student(model, store).answer(task)
    assert [answer.text[a:b] for a, b in answer.inserted] == [
        answer.text[answer.text.index("</tool_call>"):answer.text.index("</tool_response>") + 16],
        "</recommend>"]


def test_without_evidence_a_call_that_runs_is_answered_with_the_fixed_line(world):
    store, tasks = world
    task = tasks[0]
    final = f"\n<reflection>r</reflection>\n<recommend>{order([1, 0])}</recommend>"
    script = ["<plan>p</plan>\n" + tool_call("item_neighbours", item_id=task.history[-1]),
              "\n" + tool_call("item_neighbours", item_id="nope"), final]
    answer = Student(ScriptedModel(list(script)), store,
                     config=StudentConfig(evidence=False)).answer(task)
    responses = [answer.text[a:b] for a, b in tool_response_spans(answer.text)]
    assert len(responses) == 2 and [c.ok for c in answer.tool_calls] == [True, False]
    # the call that ran reads no evidence; the one the tool rejected still reads its error
    assert "No evidence is available for this call." in responses[0]
    assert "Error: Unknown item id 'nope'" in responses[1]
    assert answer.parsed.well_formed and answer.stop == "recommend"
    with_evidence = Student(ScriptedModel(list(script)), store).answer(task)
    evidence = [with_evidence.text[a:b] for a, b in tool_response_spans(with_evidence.text)]
    assert "No evidence" not in evidence[0] and evidence[1] == responses[1]
