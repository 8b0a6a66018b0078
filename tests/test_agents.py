"""The MARS teacher, its agent core and structured-output repair, driven by a scripted
model through every branch; one test runs the real tiny transformers model end to end."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import typer
from typer.testing import CliRunner

from starrec.agents.answers import parse_findings, parse_plan, parse_verdict
from starrec.agents.mars import MarsTeacher
from starrec.agents.choices import plan_options
from starrec.agents.prompts import role_prompt, role_tool_specs, roles
from starrec.agents.system import MarsSystem
from starrec.config import MarsConfig
from starrec.cst.ranker import CSTRanker
from starrec.core import ToolCall, parse_tool_call
from starrec.cst.tools import ToolExecutor, task_tool_calls, tool_names
from starrec.data.tasks import Task
from starrec.labels import candidate_labels
from starrec.llm.base import ChoiceConstraint, LLMError, PermutationConstraint
from starrec.llm.structured import (
    ParseError,
    RankingError,
    generate_structured,
    parse_ranking,
    ranking_prefix,
)
from starrec.trajectories.recorder import TrajectoryWriter, read_runs
from starrec.trajectories.schema import TeacherRun
from tests.conftest import write_dataset_folder
from tests.fakes import ScriptedModel, permutation, ranking

NAMES = tool_names()


def tool_call_options(role: str, task: Task, store, history_items: int) -> tuple[str, ...]:
    """The calls a role's turn is offered, as the teacher renders them."""
    calls = task_tool_calls(role_tool_specs(role), task, store, history_items)
    return tuple(call.render() for call in calls)


def read_call(text: str) -> ToolCall:
    """A tool call read as a teacher's agent reads it: leniently, among the CST tools."""
    return parse_tool_call(text, NAMES, lenient=True)


def teacher(model, world, **config):
    store, _ = world
    return MarsTeacher(model, store, MarsConfig(**config))


def call(name, **arguments):
    return f'<tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'


def llm_system(model):
    """The system prompt the model was sent (the same on every call of a run)."""
    return model.calls[0].messages[0]["content"]


def steps(run, kind, agent=None):
    return [s for s in run.steps if s.kind == kind and (agent is None or s.agent == agent)]


# --- structured output ------------------------------------------------------------


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "next_items", "arguments": {"item_id": "i3"}}</tool_call> then I rank',
    'Let me look.\n```json\n{"name": "next_items", "arguments": {"item_id": "i3"}}\n```',
    '{"name": "next_items", "arguments": {"item_id": "i3"}} and more text {"x": 1}',
    '<tool_call>{"name": "next_items", "arguments": {"item_id": "i3",},}</tool_call>',
    "<tool_call>{'name': 'next_items', 'arguments': {'item_id': 'i3'}}</tool_call>",
    '<tool_call>{"name": "next_items", "arguments": {"item_id": "i3"',  # cut off at max_tokens
    '{"type": "function", "function": {"name": "next_items", "arguments": "{\\"item_id\\": \\"i3\\"}"}}',
])
def test_tool_call_forms(text):
    assert read_call(text) == ToolCall("next_items", {"item_id": "i3"})


def test_tool_call_errors_tell_the_model_what_to_do():
    with pytest.raises(ParseError, match="unknown tool 'rank_all'.*popularity"):
        read_call('<tool_call>{"name": "rank_all", "arguments": {}}</tool_call>')
    with pytest.raises(ParseError, match="not valid JSON.*<tool_call>"):
        read_call('<tool_call>{"name" "next_items"}</tool_call>')
    with pytest.raises(ParseError, match='no "name"'):
        read_call('<tool_call>{"arguments": {}}</tool_call>')
    with pytest.raises(ParseError, match="must be a JSON object"):
        read_call('{"name": "popularity", "arguments": [1, 2]}')


def test_one_tool_call_parser_strict_for_the_student():
    """The student's sequence is read strictly: what a teacher's answer may get away with
    is an error the student reads back; an exact call reads the same either way."""
    exact = '{"name": "next_items", "arguments": {"item_id": "i3"}}'
    assert parse_tool_call(exact) == read_call(exact) == ToolCall("next_items", {"item_id": "i3"})
    assert read_call(f"<tool_call>{exact}</tool_call>") == parse_tool_call(exact)
    sloppy = {'{"name": "next_items", "arguments": {"item_id": "i3",},}': "not valid JSON",
              f"<tool_call>{exact}</tool_call>": "not valid JSON",
              '{"name": "next_items", "parameters": {}}': "unexpected keys"}
    for text, error in sloppy.items():
        assert read_call(text).name == "next_items"
        with pytest.raises(ParseError, match=error):
            parse_tool_call(text)
    with pytest.raises(ParseError, match="unknown tool 'rank_all'"):
        parse_tool_call('{"name": "rank_all", "arguments": {}}', NAMES)


L4, L5 = candidate_labels(4), candidate_labels(5)


@pytest.mark.parametrize("text,expected", [
    ("[C, A, B, D]", [2, 0, 1, 3]),
    ("I think <recommend>[D, B, A, C]</recommend> because 7 > 2", [3, 1, 0, 2]),
    ("Ranking: [D, B, A, C,] done. [E]", [3, 1, 0, 2]),
    ("[B] Item 4\n[D] Item 9\n[A] Item 1\n[C] Item 7", [1, 3, 0, 2]),  # candidates echoed
    ("<recommend>C, D, B, A</recommend>", [2, 3, 1, 0]),
])
def test_ranking_forms(text, expected):
    assert parse_ranking(text, L4) == expected


def test_ranking_in_number_labels_counts_from_one():
    labels = candidate_labels(12, "numbers")
    assert parse_ranking("[12, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]", labels) == [11, *range(11)]
    with pytest.raises(ParseError):  # 0 is no label: a 0-based answer is not read as one
        parse_ranking("[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]", labels)


def test_ranking_errors_are_precise():
    with pytest.raises(RankingError) as caught:
        parse_ranking("<recommend>[D, D, A, B]</recommend>", L5)
    error = caught.value
    assert (error.duplicates, error.missing) == (["D"], ["C", "E"])
    assert "duplicated: D" in str(error) and "missing: C, E" in str(error)
    with pytest.raises(RankingError) as caught:  # cut off by max_tokens
        parse_ranking("<recommend>[E, C, A", L5)
    assert caught.value.missing == ["B", "D"]
    with pytest.raises(ParseError, match="no list of candidate labels"):
        parse_ranking("The best is Star Wars.", L5)
    with pytest.raises(ParseError, match="no list"):  # a label that does not exist
        parse_ranking("[A, B, C, D, Z]", L5)


def test_ranking_prefix_keeps_what_was_written_once():
    assert ranking_prefix("<recommend>[D, D, A, Z, B", L5) == [3, 0, 1]
    assert ranking_prefix("<recommend>[D, D, A, B]</recommend>", L5) == [3, 0, 1]
    assert ranking_prefix("nothing here", L5) == []
    assert ranking_prefix("I like A and B best", L5) == []  # capitals in prose are no labels
    assert ranking_prefix("<recommend>C, A", L5) == [2, 0]


def test_repair_feeds_the_error_back_and_constraint_only_when_supported():
    model = ScriptedModel(["[A, A, B]", "[C, A, B]"])
    messages = [{"role": "user", "content": "rank"}]
    L3 = candidate_labels(3)
    result = generate_structured(model, messages, lambda t: parse_ranking(t, L3),
                                 constraint=PermutationConstraint(3), max_repairs=2)
    assert result.value == [2, 0, 1] and len(result.attempts) == 2
    assert "duplicated: A" in result.attempts[0].error and result.attempts[1].error is None
    retry = model.calls[1].messages
    assert retry[1] == {"role": "assistant", "content": "[A, A, B]"}
    assert "duplicated: A" in retry[2]["content"] and retry[2]["role"] == "user"
    assert messages == [{"role": "user", "content": "rank"}]  # the caller's list is untouched
    assert all(c.kwargs["constraint"] is None for c in model.calls)  # not supported

    model = ScriptedModel(["[B, A]"], supports=[PermutationConstraint])
    result = generate_structured(model, messages, lambda t: parse_ranking(t, candidate_labels(2)),
                                 constraint=PermutationConstraint(2))
    assert model.calls[0].kwargs["constraint"] == PermutationConstraint(2)
    assert result.attempts[0].constrained


def test_repairs_are_bounded_and_backend_errors_recorded():
    model = ScriptedModel(["nope", "still no", "no"])
    result = generate_structured(model, [{"role": "user", "content": "x"}],
                                 lambda t: parse_ranking(t, candidate_labels(3)), max_repairs=2)
    assert result.value is None and len(result.attempts) == 3 and "no list" in result.error
    model = ScriptedModel(["nope", "nope", "[A, B, C]"])  # a repeated rejected answer ends it
    result = generate_structured(model, [{"role": "user", "content": "x"}],
                                 lambda t: parse_ranking(t, candidate_labels(3)), max_repairs=2)
    assert result.value is None and len(result.attempts) == 2
    model = ScriptedModel([LLMError("timeout after 120 s")])
    result = generate_structured(model, [{"role": "user", "content": "x"}],
                                 lambda t: parse_ranking(t, candidate_labels(3)))
    assert result.value is None and result.backend_failed
    assert result.attempts[0].error == "backend error: timeout after 120 s"


def test_plan_and_verdict_parsing():
    analysts = ["user_profile", "long_term", "recent", "divergence"]
    plan = parse_plan("1. Recent-Interest analyst: check what follows Item 3\n"
                      "- **long-term**: the whole history\n- nobody: nothing", analysts)
    assert plan == {"recent": "check what follows Item 3", "long_term": "the whole history"}
    assert parse_plan("Ask the profile and exploration analysts.", analysts) == {
        "user_profile": "", "divergence": ""}
    with pytest.raises(ParseError, match="names no analyst"):
        parse_plan("Rank them well.", analysts)
    assert parse_verdict("ACCEPT. The findings are fine.", analysts).accept
    verdict = parse_verdict("recent: cite the transition counts", analysts)
    assert not verdict.accept and verdict.revise == {"recent": "cite the transition counts"}
    with pytest.raises(ParseError, match="ACCEPT"):
        parse_verdict("Hmm.", analysts)
    assert parse_findings("Item 3 fits.\n<tool_response>\nmade up") == "Item 3 fits."
    assert parse_findings("<tool_response>\n220 users also consumed X.") == "220 users also consumed X."
    with pytest.raises(ParseError, match="empty"):
        parse_findings(" <findings> </findings>")


# --- the teacher ----------------------------------------------------------------------


def test_full_run_with_multi_turn_tool_loops(world):
    store, tasks = world
    task = tasks[0]
    last = task.history[-1]
    model = ScriptedModel({
        "planner": "recent: what follows the last items\nlong_term: lasting interests",
        "recent": [call("next_items", item_id=last), call("sequence_candidates", recent=3),
                   "Candidate [6] followed Item 11 once."],
        "long_term": [call("candidate_evidence"), "Candidates [11] and [12] match the history."],
        "reflector": "ACCEPT",
        "ranker": permutation(20, [11, 12, 6]),
    })
    run = teacher(model, world, max_tool_calls=2).run(task)
    assert run.status == "ok" and run.fallback is None and run.error is None
    assert model.roles_called() == ["planner", "recent", "recent", "recent", "long_term",
                                    "long_term", "reflector", "ranker"]
    tools = steps(run, "tool")
    assert [(s.agent, s.tool) for s in tools] == [("recent", "next_items"), (
        "recent", "sequence_candidates"), ("long_term", "candidate_evidence")]
    assert all(s.ok for s in tools) and "Item 22 came right after" in tools[1].response
    fresh = ToolExecutor(store, task, budget=MarsConfig().evidence_budget)
    assert tools[0].response == fresh.call("next_items", {"item_id": last}).text
    # the second recent turn saw the first tool's real response, in the student's tags
    second = model.calls[2].messages
    assert second[-2]["content"].startswith('<tool_call>{"name": "next_items"')
    assert second[-1]["content"] == f"<tool_response>\n{tools[0].response}\n</tool_response>"
    assert model.calls[1].kwargs["stop"] == ["</tool_call>"]
    assert run.plan.startswith("recent:")
    assert run.findings == {"recent": "Candidate [6] followed Item 11 once.",
                            "long_term": "Candidates [11] and [12] match the history."}
    assert run.reflection == "ACCEPT" and run.reflection_rounds == 0
    assert run.ranking_indices[:3] == [11, 12, 6]
    # by default the model sees the task file's order (DESIGN.md 3.7), labelled A, B, ...
    shown = run.task["candidates"]
    assert shown == task.candidates
    assert "[A] " + store.title(shown[0]) in llm_system(model)
    assert run.ranking == [shown[i] for i in run.ranking_indices]
    assert sorted(run.ranking) == sorted(task.candidates)
    # totals agree with the steps, every prompt is recorded as sent
    llm = steps(run, "llm")
    assert run.llm_calls == len(llm) == 8 and run.tool_calls == 3
    assert run.prompt_tokens == sum(s.prompt_tokens for s in llm) > 0
    assert run.completion_tokens == sum(s.completion_tokens for s in llm) > 0
    assert [s.messages for s in llm] == [c.messages for c in model.calls]
    assert llm[0].messages[1]["content"].startswith(role_prompt("planner").brief)
    # one system prompt, the task with its evidence, opens every call: a KV cache reuses it
    assert {s.messages[0]["content"] for s in llm} == {llm[0].messages[0]["content"]}
    assert "Scenario:" in llm[0].messages[0]["content"] and "[T]" in llm[0].messages[0]["content"]
    messages = {s.agent: s for s in steps(run, "message")}
    assert messages["planner"].parsed == {"recent": "what follows the last items",
                                          "long_term": "lasting interests"}
    assert messages["reflector"].parsed == {"accept": True, "revise": {}}
    assert messages["ranker"].parsed == run.ranking_indices
    # the record survives its JSON line, where the shared system prompt is written once
    line = run.to_json()
    shared = llm[0].messages[0]["content"]
    assert json.loads(line)["system_prompt"] == shared
    assert line.count(json.dumps(shared, ensure_ascii=False)[1:-1]) == 1 and len(llm) > 2
    again = TeacherRun.from_dict(json.loads(line))
    assert again == run and again.key == f"{task.task_id}#0"
    # lines written before the prompt was shared (no system_prompt) read as they are
    old = json.loads(json.dumps(asdict(run)))
    assert TeacherRun.from_dict(old) == run


def test_reflector_sends_an_analyst_back_and_rounds_are_bounded(world):
    store, tasks = world
    model = ScriptedModel({
        "planner": "recent: latest items",
        "recent": ["First findings.", "Revised with numbers.", "Revised again."],
        "reflector": "recent: cite the transition counts",  # never satisfied
        "ranker": permutation(20),
    })
    run = teacher(model, world, reflection_rounds=2).run(tasks[1])
    assert model.roles_called() == ["planner", "recent", "reflector", "recent", "reflector",
                                    "recent", "ranker"]
    assert run.reflection_rounds == 2 and run.findings == {"recent": "Revised again."}
    revision = model.calls[3].messages[1]["content"]
    assert "cite the transition counts" in revision and "First findings." in revision
    rounds = [s.round for s in steps(run, "message", "recent")]
    assert rounds == [0, 1, 2]
    # accepted on the first look: no second round
    model = ScriptedModel({"planner": "recent: x", "recent": "Fine.", "reflector": "ACCEPT",
                           "ranker": permutation(20)})
    run = teacher(model, world, reflection_rounds=3).run(tasks[1])
    assert model.roles_called().count("reflector") == 1 and run.reflection_rounds == 0
    # no reflector at all
    model = ScriptedModel({"planner": "recent: x", "recent": "Fine.", "ranker": permutation(20)})
    teacher(model, world, reflection_rounds=0).run(tasks[1])
    assert "reflector" not in model.roles_called()


def test_malformed_tool_call_repaired_on_second_attempt(world):
    store, tasks = world
    task = tasks[2]
    model = ScriptedModel({
        "planner": "recent: latest items",
        "recent": ['<tool_call>{"name": "next_items" "arguments": {}}</tool_call>',
                   call("next_items", item_id=task.history[-1]), "Done."],
        "reflector": "ACCEPT", "ranker": permutation(20),
    })
    run = teacher(model, world).run(task)
    recent = steps(run, "llm", "recent")
    assert [s.attempt for s in recent] == [0, 1, 0]
    assert "not valid JSON" in recent[0].error and recent[1].error is None
    assert "not valid JSON" in recent[1].messages[-1]["content"]
    assert [s.tool for s in steps(run, "tool")] == ["next_items"] and run.findings["recent"] == "Done."


def test_malformed_ranking_repaired(world):
    store, tasks = world
    model = ScriptedModel({"planner": "recent: x", "recent": "Fine.", "reflector": "ACCEPT",
                           "ranker": ["[A, A, B]", permutation(20, [5])]})
    run = teacher(model, world).run(tasks[3])
    ranker = steps(run, "llm", "ranker")
    assert len(ranker) == 2 and "duplicated: A" in ranker[0].error
    assert run.fallback is None and run.ranking_indices[0] == 5


def test_ranking_still_broken_falls_back_to_the_presented_order(world):
    store, tasks = world
    task = tasks[4]
    model = ScriptedModel({"planner": "recent: x", "recent": "Fine.", "reflector": "ACCEPT",
                           "ranker": "I like them all."})
    run = teacher(model, world, max_repairs=1, candidate_order="cst").run(task)
    assert len(steps(run, "llm", "ranker")) == 2
    # shown in the cst order, but the fallback is the task file's order, not the ranker's
    assert run.ranking == task.candidates != CSTRanker.on_store(store).rank(task)
    assert run.ranking == [Task(**run.task).candidates[i] for i in run.ranking_indices]
    assert run.status == "ok" and run.fallback.startswith("ranking unusable (no list of candidate labels")
    assert "presented order" in run.fallback
    assert steps(run, "message", "ranker")[-1].error == run.fallback


def test_tool_call_cap_forces_the_final_answer(world):
    store, tasks = world
    task = tasks[5]
    item = task.history[-1]
    model = ScriptedModel({
        "planner": "recent: x",
        "recent": [call("next_items", item_id=item), call("item_neighbours", item_id=item),
                   call("next_items", item_id=item),  # refused: the cap is reached
                   "Findings after the cap."],
        "reflector": "ACCEPT", "ranker": permutation(20),
    })
    run = teacher(model, world, max_tool_calls=2, max_turns=6).run(task)
    assert run.tool_calls == 2 and run.findings["recent"] == "Findings after the cap."
    forced_prompt = model.calls[3].messages[-1]["content"]
    assert "Tool-call limit (2) reached" in forced_prompt and "cannot call more tools" in forced_prompt
    assert model.calls[3].kwargs["stop"] is None
    recent = steps(run, "llm", "recent")
    assert "no more tool calls" in recent[2].error and recent[3].attempt == 1
    message = steps(run, "message", "recent")[0]
    assert message.parsed == {"forced": "Tool-call limit (2) reached."}


def test_turn_cap_forces_the_final_answer(world):
    store, tasks = world
    task = tasks[5]
    model = ScriptedModel({
        "planner": "recent: x",
        "recent": [call("next_items", item_id=task.history[-1]), "Forced findings."],
        "reflector": "ACCEPT", "ranker": permutation(20),
    })
    run = teacher(model, world, max_tool_calls=5, max_turns=2).run(task)
    assert run.tool_calls == 1 and "Turn limit (2) reached" in model.calls[2].messages[-1]["content"]
    assert steps(run, "message", "recent")[0].parsed == {"forced": "Turn limit (2) reached."}


def test_backend_error_mid_run_completes_with_a_recorded_fallback(world):
    store, tasks = world
    task = tasks[6]
    model = ScriptedModel({
        "planner": "recent: x\nlong_term: y",
        "recent": [call("next_items", item_id=task.history[-1]), LLMError("timeout after 120 s")],
        "long_term": "never asked", "reflector": "ACCEPT", "ranker": permutation(20),
    })
    run = teacher(model, world).run(task)
    assert model.roles_called() == ["planner", "recent", "recent"]  # nothing after the failure
    assert run.status == "error" and "timeout after 120 s" in run.error
    assert run.fallback.startswith("backend error: timeout") and run.ranking
    # the fallback is the task file's presented order, never a ranker's (DESIGN.md 3.4)
    assert run.ranking == task.candidates and run.ranking_indices == list(range(20))
    assert "ranked by presented order" in run.fallback
    failed = steps(run, "llm", "recent")[-1]
    assert failed.error == "backend error: timeout after 120 s" and failed.output == ""
    assert run.llm_calls == 3 and run.tool_calls == 1


def test_unparsable_plan_and_verdict_fall_back_and_are_recorded(world):
    store, tasks = world
    model = ScriptedModel({"planner": "Let us rank.", "user_profile": "A", "long_term": "B",
                           "recent": "C", "divergence": "D", "reflector": "Hmm.",
                           "ranker": permutation(20)})
    run = teacher(model, world, max_repairs=0).run(tasks[7])
    assert set(run.findings) == {"user_profile", "long_term", "recent", "divergence"}
    planner = steps(run, "message", "planner")[0]
    assert "names no analyst" in planner.error and "every analyst assigned" in planner.error
    assert planner.output == "Let us rank." and run.plan.startswith("user_profile: who the user")
    assert run.plan.count("\n") == 3 and "recent: the latest items" in run.plan
    assert "Planner's request: lasting interests" in model.calls[2].messages[1]["content"]
    reflector = steps(run, "message", "reflector")[0]
    assert reflector.parsed == {"accept": True, "revise": {}} and "taken as ACCEPT" in reflector.error
    assert reflector.output == "Hmm." and run.reflection == "ACCEPT"
    assert run.status == "ok" and run.fallback is None


def test_ranker_decodes_under_the_permutation_constraint_when_supported(world):
    store, tasks = world
    script = {"planner": "recent: x", "recent": "Fine.", "reflector": "ACCEPT",
              "ranker": ranking(20, list(range(19, -1, -1)))}
    model = ScriptedModel(script, supports=[PermutationConstraint])
    run = teacher(model, world).run(tasks[8])
    constraints = {c.role: c.kwargs["constraint"] for c in model.calls}
    assert constraints["ranker"] == PermutationConstraint(20, prefix="<recommend>")
    assert constraints["recent"] is None and constraints["planner"] is None
    assert steps(run, "llm", "ranker")[0].constrained and run.ranking_indices[0] == 19
    model = ScriptedModel(script)  # no support: free text, parsed
    run = teacher(model, world).run(tasks[8])
    assert model.calls[-1].kwargs["constraint"] is None and not steps(run, "llm", "ranker")[0].constrained


def test_plans_verdicts_and_tool_calls_are_choices_when_supported(world):
    store, tasks = world
    task = tasks[8]
    first = f'<tool_call>{{"name": "next_items", "arguments": {{"item_id": "{task.history[-1]}"}}}}</tool_call>'
    script = {"planner": "recent: the latest items and what users usually consume after them",
              "recent": [first, call("sequence_candidates"), "Findings."],
              "reflector": "ACCEPT", "ranker": permutation(20)}
    model = ScriptedModel(script, supports=[ChoiceConstraint, PermutationConstraint])
    run = teacher(model, world, analysts=["recent", "long_term"], max_tool_calls=2).run(task)
    planner, turn0, turn1, final, reflector, ranker = [c.kwargs["constraint"] for c in model.calls]
    assert planner.options == plan_options(["recent", "long_term"]) and len(planner.options) == 3
    assert planner.options[0] == ("recent: the latest items and what users usually consume after "
                                  "them\nlong_term: lasting interests across the whole history")
    assert turn0.options == tool_call_options("recent", task, store, 10) and first in turn0.options
    assert '{"name": "sequence_candidates", "arguments": {}}' in turn0.options[-2]
    assert '{"name": "sequence_model", "arguments": {}}' in turn0.options[-1]
    # next_items and item_neighbours per history item, then the two task-bound tools
    assert len(turn0.options) == 2 * min(10, len(task.history)) + 2
    assert set(turn1.options) == set(turn0.options) - {first}  # no call twice
    assert final is None and run.findings == {"recent": "Findings."}
    assert reflector.options == ("ACCEPT", "recent: " + roles()["recent"].revise)
    assert ranker == PermutationConstraint(20, prefix="<recommend>")
    # a choice may always finish its longest option, whatever the role's max_tokens
    assert model.calls[0].kwargs["max_tokens"] == max(map(len, planner.options)) > 96
    longest_call = max(map(len, turn0.options))
    assert model.calls[1].kwargs["max_tokens"] == longest_call > MarsConfig().max_tokens.analyst
    assert run.tool_calls == 2 and all(s.error is None for s in steps(run, "message"))
    model = ScriptedModel(script, supports=[ChoiceConstraint, PermutationConstraint])
    teacher(model, world, analysts=["recent"], constrain=False).run(task)
    assert [c.kwargs["constraint"] for c in model.calls][:-1] == [None] * 5


def test_tool_options_cover_every_tool_a_role_has(world):
    store, tasks = world
    task = tasks[0]
    for role in ("user_profile", "long_term", "recent", "divergence"):
        options = tool_call_options(role, task, store, 3)
        names = {read_call(o).name for o in options}
        # this store has no content embeddings, so content_neighbours is never offered
        assert names == set(roles()[role].tools) - {"content_neighbours"}, role
        for option in options:  # every option is a call the executor answers
            parsed = read_call(option)
            assert ToolExecutor(store, task).call(parsed.name, parsed.arguments).ok, option


def test_presented_order_keeps_the_task_as_given(world):
    store, tasks = world
    model = ScriptedModel({"planner": "recent: x", "recent": "Fine.", "reflector": "ACCEPT",
                           "ranker": permutation(20, [5])})
    config = MarsConfig(candidate_order="presented")
    run = MarsTeacher(model, store, config).run(tasks[3])
    assert run.task == json.loads(tasks[3].to_json())
    assert run.ranking[0] == tasks[3].candidates[5]
    assert "[F] " + store.title(tasks[3].candidates[5]) in llm_system(model)


def test_cst_order_is_the_secondary_presentation(world):
    store, tasks = world
    model = ScriptedModel({"planner": "recent: x", "recent": "Fine.", "reflector": "ACCEPT",
                           "ranker": permutation(20, [5])})
    run = MarsTeacher(model, store, MarsConfig(candidate_order="cst")).run(tasks[3])
    shown = run.task["candidates"]
    assert shown == CSTRanker.on_store(store).rank(tasks[3]) != tasks[3].candidates
    assert run.ranking[0] == shown[5] and "[A] " + store.title(shown[0]) in llm_system(model)


def test_a_broken_ranking_keeps_what_was_written_then_the_presented_order(world):
    store, tasks = world
    task = tasks[3]
    model = ScriptedModel({"planner": "recent: x", "recent": "Fine.", "reflector": "ACCEPT",
                           "ranker": "<recommend>[E, C, C, A"})
    run = MarsTeacher(model, store, MarsConfig(candidate_order="cst", max_repairs=0)).run(task)
    shown = run.task["candidates"]
    kept = [shown[4], shown[2], shown[0]]
    assert run.ranking[:3] == kept
    assert run.ranking[3:] == [c for c in task.candidates if c not in kept]  # task file's order
    assert run.fallback and "the 3 candidates it ranked" in run.fallback
    assert run.ranking == [shown[i] for i in run.ranking_indices]


def test_number_labels_count_from_one(world):
    store, tasks = world
    model = ScriptedModel({"planner": "recent: x", "recent": "Fine.", "reflector": "ACCEPT",
                           "ranker": "<recommend>[6, " + ", ".join(
                               str(i) for i in range(1, 21) if i != 6) + "]</recommend>"})
    run = MarsTeacher(model, store, MarsConfig(labels="numbers")).run(tasks[3])
    assert run.fallback is None and run.ranking[0] == tasks[3].candidates[5]
    assert "[1] " + store.title(tasks[3].candidates[0]) in llm_system(model)
    assert "[0] " not in llm_system(model)


def test_a_bug_is_recorded_not_raised(world, monkeypatch):
    store, tasks = world
    model = ScriptedModel({"planner": "recent: x", "recent": "Fine.", "reflector": "ACCEPT",
                           "ranker": permutation(20)})
    monkeypatch.setattr("starrec.agents.mars.team_prompt", lambda *a: 1 / 0)
    run = teacher(model, world).run(tasks[9], sample=2)
    assert run.status == "error" and run.error.startswith("ZeroDivisionError")
    assert run.ranking and run.sample == 2 and run.seed == 2


def test_mars_system_recommends_and_appends(world, tmp_path):
    store, tasks = world
    model = ScriptedModel({"planner": "recent: x", "recent": "Fine.", "reflector": "ACCEPT",
                           "ranker": permutation(20, [3])})
    with TrajectoryWriter(tmp_path / "t.jsonl") as writer:
        system = MarsSystem(teacher(model, world), writer)
        answer = system.recommend(tasks[0])
    (run,) = read_runs(tmp_path / "t.jsonl")
    assert answer.ranking[0] == run.task["candidates"][3] and answer.llm_calls == 4
    assert not answer.fallback and answer.prompt_tokens > 0
    assert run.ranking == answer.ranking and run.llm_calls == answer.llm_calls


# --- star teach -------------------------------------------------------------------------


def test_teach_command_writes_and_resumes(tmp_path, monkeypatch):
    from starrec.cli.teach import teach

    monkeypatch.setenv("STAR_HOME", str(tmp_path / "home"))
    data = tmp_path / "shop"
    write_dataset_folder(data, n_users=8, n_items=40)
    models = []

    def load(spec, cfg):
        assert spec == "fake-spec" and cfg.mars.temperature == 0.5 and cfg.cst.content is False
        models.append(ScriptedModel({"planner": "recent: x", "recent": "Fine.",
                                     "reflector": "ACCEPT", "ranker": permutation(20)}))
        return models[-1]

    monkeypatch.setattr("starrec.cli.teach._load_model", load)
    app = typer.Typer()
    app.command()(teach)
    app.command("other")(lambda: None)  # two commands: the name is part of the command line
    out = tmp_path / "traj.jsonl"
    args = ["teach", "--dataset", str(data), "--split", "train", "--limit", "3", "--model",
            "fake-spec", "--out", str(out), "--temperature", "0.5", "--set", "cst.content=false"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "3 run(s) written" in result.output
    runs = read_runs(out)
    assert [r.task["split"] for r in runs] == ["train"] * 3 and len({r.task_id for r in runs}) == 3
    assert runs[0].config["mars"]["temperature"] == 0.5
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0 and "0 run(s) written, 3 already done" in result.output
    assert len(out.read_text().splitlines()) == 3
    result = CliRunner().invoke(app, args[:-2] + ["--users", "eval-200"])
    assert result.exit_code == 2 and "eval-200 is a set of test tasks" in result.output


# --- the real tiny model ----------------------------------------------------------------


@pytest.mark.slow
def test_tiny_model_end_to_end(world, tiny_lm_dir, tmp_path, monkeypatch):
    """Two tasks through the transformers backend: whatever a random model says, every
    run completes, is recorded, and resumes."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from starrec.config import LLMConfig
    from starrec.llm.models import load_chat_model
    from starrec.trajectories.recorder import run_teacher

    store, tasks = world
    model = load_chat_model(str(tiny_lm_dir), LLMConfig())
    config = MarsConfig(analysts=["recent"], max_turns=2, max_tool_calls=1, reflection_rounds=1,
                        max_repairs=1, history_items=3, evidence_budget=60,
                        max_tokens={"planner": 8, "analyst": 8, "reflector": 6, "ranker": 60})
    out = tmp_path / "tiny.jsonl"
    summary = run_teacher(lambda: MarsTeacher(model, store, config), tasks[:2], out, progress=False)
    assert summary.written == 2 and summary.errors == 0
    for run in read_runs(out):
        assert run.status == "ok" and run.llm_calls >= 3 and run.prompt_tokens > 0
        task = next(t for t in tasks if t.task_id == run.task_id)
        assert sorted(run.ranking) == sorted(task.candidates)
        ranker = [s for s in run.steps if s.kind == "llm" and s.agent == "ranker"]
        # the HF backend enforces the permutation, so the ranking is the model's own; plan,
        # verdict and the tool call are choices, so well-formed whatever the weights
        assert ranker and ranker[0].constrained and run.fallback is None
        assert [s.agent for s in run.steps if s.kind == "tool"] == ["recent"]
        assert all(s.error is None for s in run.steps if s.kind == "message" and s.agent != "recent")
    assert run_teacher(lambda: MarsTeacher(model, store, config), tasks[:2], out,
                       progress=False).written == 0
