"""The agent loop against a scripted fake engine: messages sent, tools run, events streamed."""
import copy
import json
import threading

import pytest

from app.agents import (
    DEFAULT_SYSTEM,
    Agent,
    FinalAnswer,
    TextDelta,
    Tool,
    ToolCallEvent,
    ToolResultEvent,
    ToolStep,
)
from app.engine_api import Sampling
from tests.fakes import ScriptedEngine


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: First number.
        b: Second number.
    """
    return a + b


def weather(city: str) -> dict:
    """Current weather in a city."""
    return {"city": city, "sky": "sunny", "celsius": 21}


def broken(x: str) -> str:
    """Always fails."""
    raise ValueError(f"cannot handle {x}")


def call(name, **arguments):
    return "<|tool_call|>" + json.dumps([{"name": name, "arguments": arguments}]) + "<|/tool_call|>"


def roles(messages):
    return [m["role"] for m in messages]


def test_final_answer_without_tools():
    engine = ScriptedEngine(" Hello! How can I help?")
    agent = Agent(engine, tools=[add])
    result = agent.run("Hi")
    assert result.answer == "Hello! How can I help?"
    assert result.steps == [] and result.stop_reason == "answer"
    assert roles(result.messages) == ["system", "user", "assistant"]
    sent = engine.requests[0]
    assert sent["stream"] is True and sent["grammar"] is None and "<|/tool_call|>" in sent["stop"]
    assert sent["messages"][1] == {"role": "user", "content": "Hi"}


def test_system_message_declares_tools_in_phi_format():
    engine = ScriptedEngine("ok")
    Agent(engine, tools=[add, weather]).run("Hi")
    system = engine.requests[0]["messages"][0]
    assert set(system) == {"role", "content", "tools", "tools_text"}
    assert system["role"] == "system" and system["content"] == DEFAULT_SYSTEM
    assert isinstance(system["tools"], str)
    # for a chat template with no place for tools: the same list, and how to call them
    assert system["tools"] in system["tools_text"] and "<|tool_call|>[" in system["tools_text"]
    declared = json.loads(system["tools"])
    assert [t["name"] for t in declared] == ["add", "weather"]
    assert declared[0] == {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {
                "a": {"description": "First number.", "type": "integer"},
                "b": {"description": "Second number.", "type": "integer"},
            },
            "required": ["a", "b"],
        },
    }
    engine = ScriptedEngine("ok")
    Agent(engine, tools=[add], system="Be brief.").run("Hi")
    assert engine.requests[0]["messages"][0]["content"] == "Be brief."


def test_no_tools_is_plain_chat():
    engine = ScriptedEngine("Hello <|tool_call|> is just text here")
    result = Agent(engine).run("Hi")
    assert result.answer == "Hello <|tool_call|> is just text here"
    assert engine.requests[0]["messages"] == [{"role": "user", "content": "Hi"}]
    engine = ScriptedEngine("ok")
    Agent(engine, system="Be brief.").run("Hi")
    assert engine.requests[0]["messages"][0] == {"role": "system", "content": "Be brief."}


def test_single_call_is_regenerated_under_the_grammar():
    engine = ScriptedEngine(
        'Let me add. <|tool_call|>[{"name": "add", "arguments": {"a": "two", "b"',  # free: cut at the marker
        '[{"name": "add", "arguments": {"a": 2, "b": 3}}]<|/tool_call|>',  # constrained continuation
        "2 + 3 = 5.",
    )
    agent = Agent(engine, tools=[add])
    result = agent.run("What is 2 + 3?")

    assert result.answer == "2 + 3 = 5."
    assert [(s.name, s.arguments, s.result, s.error) for s in result.steps] == [("add", {"a": 2, "b": 3}, 5, None)]
    # The free generation was abandoned as soon as the call began.
    assert engine.pieces_read < len('Let me add. <|tool_call|>[{"name": "add", "arguments": {"a": "two", "b"') / 3
    constrained = engine.requests[1]
    assert constrained["grammar"] == agent.grammar and "root ::=" in constrained["grammar"]
    assert constrained["stream"] is False
    assert constrained["messages"][-1] == {"role": "assistant", "content": "Let me add. <|tool_call|>"}
    assert constrained["messages"][:-1] == engine.requests[0]["messages"]
    assert result.messages[2:] == [
        {
            "role": "assistant",
            "content": 'Let me add. <|tool_call|>[{"name": "add", "arguments": {"a": 2, "b": 3}}]<|/tool_call|>',
        },
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "2 + 3 = 5."},
    ]
    assert engine.requests[2]["messages"] == result.messages[:-1]


def test_engine_that_repeats_the_whole_call_still_works():
    engine = ScriptedEngine(call("add", a=1, b=1), call("add", a=1, b=1), "2")
    result = Agent(engine, tools=[add]).run("1+1?")
    assert [s.result for s in result.steps] == [2]
    assert result.messages[2]["content"] == call("add", a=1, b=1)


def test_several_calls_in_one_turn_unconstrained():
    reply = '<|tool_call|>[{"name": "weather", "arguments": {"city": "Oslo"}}, {"name": "add", "arguments": {"a": 1, "b": 2}}]'
    engine = ScriptedEngine(reply, "Oslo is sunny; 1 + 2 = 3.")
    agent = Agent(engine, tools=[add, weather], constrain=False)
    assert agent.grammar is None
    result = agent.run("Weather in Oslo, and 1 + 2?")
    assert [(s.name, s.result) for s in result.steps] == [
        ("weather", {"city": "Oslo", "sky": "sunny", "celsius": 21}),
        ("add", 3),
    ]
    assert roles(result.messages) == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert json.loads(result.messages[3]["content"]) == {"city": "Oslo", "sky": "sunny", "celsius": 21}
    assert result.messages[4]["content"] == "3"
    assert len(engine.requests) == 2 and all(c["grammar"] is None for c in engine.requests)


def test_lenient_call_without_grammar():
    engine = ScriptedEngine("functools[{'name': 'add', 'arguments': {'a': 4, 'b': 5,},}]", "9")
    result = Agent(engine, tools=[add], constrain=False).run("4+5")
    assert [s.result for s in result.steps] == [9]
    # Stored back in the model's native markup.
    assert result.messages[2]["content"] == call("add", a=4, b=5)


def test_tool_error_goes_back_to_the_model():
    engine = ScriptedEngine(call("broken", x="y"), "Sorry, that failed.")
    result = Agent(engine, tools=[broken], constrain=False).run("Try it")
    assert result.answer == "Sorry, that failed."
    step = result.steps[0]
    assert step.result is None and step.error == "ValueError: cannot handle y"
    assert json.loads(result.messages[3]["content"]) == {"error": "ValueError: cannot handle y"}


def test_hung_tool_times_out():
    release = threading.Event()

    def slow(seconds: int) -> str:
        """Wait."""
        release.wait(30)
        return "done"

    try:
        engine = ScriptedEngine(call("slow", seconds=100), "It took too long.")
        result = Agent(engine, tools=[slow], tool_timeout=0.2, constrain=False).run("Wait")
    finally:
        release.set()
    step = result.steps[0]
    assert step.error == "tool 'slow' timed out after 0.2 seconds"
    assert 0.2 <= step.seconds < 5
    assert result.answer == "It took too long."


def test_unknown_tool_names_the_available_ones():
    engine = ScriptedEngine(call("search_web", query="x"), "I cannot search.")
    result = Agent(engine, tools=[add, weather], constrain=False).run("Search")
    assert result.steps[0].error == "unknown tool 'search_web'; available tools: add, weather"
    assert "available tools: add, weather" in result.messages[3]["content"]


def test_invalid_arguments_are_not_run_and_explained():
    ran = []

    def record(n: int) -> int:
        """Record."""
        ran.append(n)
        return n

    engine = ScriptedEngine(call("record", n="five"), call("record", n=5), "Recorded.")
    result = Agent(engine, tools=[record], constrain=False).run("Record five")
    assert ran == [5]
    assert result.steps[0].error == 'invalid arguments: arguments.n: expected integer, got "five"'
    assert result.steps[1].result == 5


def test_unreadable_call_is_reported_and_retried():
    engine = ScriptedEngine("<|tool_call|> sorry {{{", call("add", a=1, b=2), "3")
    result = Agent(engine, tools=[add], constrain=False).run("1+2")
    assert result.steps[0].name == "" and "could not read the tool call" in result.steps[0].error
    assert result.steps[1].result == 3 and result.answer == "3"
    assert result.messages[2] == {"role": "assistant", "content": "<|tool_call|> sorry {{{"}


def test_step_limit_then_a_last_chance_to_answer():
    engine = ScriptedEngine(call("add", a=1, b=1), call("add", a=2, b=2), call("add", a=3, b=3), "Enough: 2, 4.")
    result = Agent(engine, tools=[add], max_steps=2, constrain=False).run("Keep adding")
    assert [s.result for s in result.steps] == [2, 4]
    assert result.stop_reason == "max_steps" and result.answer == "Enough: 2, 4."
    skipped = json.loads(result.messages[-2]["content"])
    assert skipped["error"].startswith("not run: the limit of 2 tool calls")


def test_step_limit_stops_a_model_that_keeps_calling():
    engine = ScriptedEngine(*[call("add", a=i, b=i) for i in range(6)])
    result = Agent(engine, tools=[add], max_steps=2).run("Keep adding")
    # Each call within the limit takes a free and a constrained generation (1 and 3 are the
    # constrained ones); past the limit calls are not constrained and not run.
    assert [(s.arguments, s.result) for s in result.steps] == [({"a": 1, "b": 1}, 2), ({"a": 3, "b": 3}, 6)]
    assert result.stop_reason == "max_steps" and result.answer == ""
    assert len(engine.requests) == 6 and engine.replies == []
    assert [c["grammar"] is not None for c in engine.requests] == [False, True, False, True, False, False]
    assert roles(result.messages)[-4:] == ["assistant", "tool", "assistant", "tool"]
    assert all("not run" in m["content"] for m in result.messages[-3::2])


def test_bare_json_call_without_markup():
    engine = ScriptedEngine('{"name": "add", "arguments": {"a": 5, "b": 6}}', "11")
    result = Agent(engine, tools=[add]).run("5+6")
    assert [s.result for s in result.steps] == [11]
    assert len(engine.requests) == 2  # a bare call is parsed as written, not regenerated


def test_streaming_events():
    engine = ScriptedEngine(
        "Checking the weather. <|tool_call|>",
        '[{"name": "weather", "arguments": {"city": "Paris"}}]',
        "It is sunny in Paris.",
    )
    events = list(Agent(engine, tools=[weather]).stream("Weather in Paris?"))
    kinds = [type(e).__name__ for e in events]
    assert kinds[-1] == "FinalAnswer" and kinds.count("FinalAnswer") == 1
    first_call = kinds.index("ToolCallEvent")
    assert kinds[first_call + 1] == "ToolResultEvent"
    before = "".join(e.text for e in events[:first_call] if isinstance(e, TextDelta))
    after = "".join(e.text for e in events[first_call:] if isinstance(e, TextDelta))
    assert before == "Checking the weather. "
    assert after == "It is sunny in Paris."
    call_event, result_event, final = events[first_call], events[first_call + 1], events[-1]
    assert (call_event.name, call_event.arguments) == ("weather", {"city": "Paris"})
    assert result_event.name == "weather" and result_event.error is None
    assert result_event.result == {"city": "Paris", "sky": "sunny", "celsius": 21}
    assert result_event.id == call_event.id != ""
    assert final.text == "It is sunny in Paris." and final.result.steps[0].name == "weather"


def test_streamed_text_never_shows_markup():
    engine = ScriptedEngine(
        'A <tag> and <|tool and func: <|tool_call|>[{"name": "add", "arguments": {"a": 1, "b": 1}}]', "Done."
    )
    events = list(Agent(engine, tools=[add], constrain=False).stream("x"))
    shown = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert shown == "A <tag> and <|tool and func: Done."


def test_conversation_continues_across_runs_and_reset():
    engine = ScriptedEngine("Hi Ada.", call("add", a=1, b=2), "3", "You are Ada.")
    agent = Agent(engine, tools=[add], constrain=False)
    agent.run("I am Ada.")
    agent.run("1+2?")
    result = agent.run("Who am I?")
    assert roles(result.messages) == [
        "system", "user", "assistant", "user", "assistant", "tool", "assistant", "user", "assistant"
    ]
    assert result.steps == []  # steps are per question
    assert engine.requests[-1]["messages"][3] == {"role": "user", "content": "1+2?"}
    agent.reset()
    assert roles(agent.messages) == ["system"]


def test_interrupted_turn_leaves_no_trace():
    engine = ScriptedEngine("A long answer that the user stops.")
    agent = Agent(engine, tools=[add])
    before = copy.deepcopy(agent.messages)
    for event in agent.stream("Tell me a story"):
        break
    assert agent.messages == before

    agent = Agent(ScriptedEngine(RuntimeError("out of memory")), tools=[add])
    with pytest.raises(RuntimeError):
        agent.run("Hi")
    assert roles(agent.messages) == ["system"]


def test_engine_streaming_its_whole_answer_in_one_chunk_is_accepted():
    assert Agent(ScriptedEngine(["Plain."]), tools=[add]).run("Hi").answer == "Plain."


def test_large_results_are_cut_for_the_model_but_kept_for_the_caller():
    def big() -> str:
        """Big."""
        return "x" * 100

    engine = ScriptedEngine(call("big"), "ok")
    result = Agent(engine, tools=[big], max_result_chars=10, constrain=False).run("x")
    assert result.steps[0].result == "x" * 100
    assert result.messages[3]["content"] == "x" * 10 + "\n[... cut: 90 more characters]"


def test_tools_can_be_given_as_tool_objects_and_must_have_unique_names():
    spec = {"type": "function", "function": {"name": "echo", "description": "Echo.", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}}}
    engine = ScriptedEngine(call("echo", text="hi"), "hi")
    result = Agent(engine, tools=[Tool.from_openai(spec, lambda text: text)], constrain=False).run("echo hi")
    assert result.steps == [ToolStep("echo", {"text": "hi"}, "hi", None, result.steps[0].seconds)]
    with pytest.raises(ValueError, match="two tools"):
        Agent(engine, tools=[add, add])


def test_grammar_failure_falls_back_to_unconstrained(monkeypatch):
    import app.agents.grammar as grammar

    def no_grammar(tools):
        raise ImportError("No module named 'llama_cpp'")

    monkeypatch.setattr(grammar, "tool_call_grammar", no_grammar)
    with pytest.warns(UserWarning, match="not be constrained"):
        agent = Agent(ScriptedEngine(call("add", a=1, b=1), "2"), tools=[add])
    assert agent.grammar is None
    assert agent.run("1+1").steps[0].result == 2


def test_final_answer_event_is_last_and_carries_the_result():
    engine = ScriptedEngine("Just text.")
    events = list(Agent(engine, tools=[add]).stream("x"))
    assert isinstance(events[-1], FinalAnswer)
    assert events[-1].result.answer == "Just text."
    assert not any(isinstance(e, (ToolCallEvent, ToolResultEvent)) for e in events)


def test_a_message_dict_is_passed_to_the_engine_untouched():
    # For images or audio: whatever message shape the engine accepts goes straight through.
    message = {"role": "user", "content": "<|image_1|>What is this?", "images": ["cat.png"]}
    engine = ScriptedEngine("A cat.")
    result = Agent(engine, tools=[add]).run(message)
    assert engine.requests[0]["messages"][1] == message
    assert result.answer == "A cat."


def test_tool_choice_required_starts_with_a_constrained_call():
    # The first request is the constrained continuation itself: no free turn before it.
    engine = ScriptedEngine('[{"name": "add", "arguments": {"a": 2, "b": 3}}]', "It is 5.")
    result = Agent(engine, tools=[add], tool_choice="required").run("Add 2 and 3")
    assert [s.result for s in result.steps] == [5] and result.answer == "It is 5."
    first = engine.requests[0]
    assert first["grammar"] and first["messages"][-1] == {"role": "assistant", "content": "<|tool_call|>"}
    with pytest.raises(ValueError, match="tool_choice"):
        Agent(engine, tools=[add], tool_choice="always")


def test_a_constrained_call_cut_off_by_the_token_budget_is_reported_not_guessed():
    engine = ScriptedEngine("<|tool_call|>", '[{"name": "add", "arguments": {"a": ', "Sorry.")
    result = Agent(engine, tools=[add]).run("Add")
    assert result.steps[0].error and "could not read the tool call" in result.steps[0].error
    assert engine.requests[1]["max_tokens"] >= 512  # the call has its own budget


def test_sampling_reaches_the_engine_and_usage_comes_back_with_the_answer():
    engine = ScriptedEngine(call("add", a=1, b=2), "3")
    agent = Agent(engine, tools=[add], constrain=False, sampling=Sampling(max_tokens=77, temperature=0.5, top_k=9, seed=3))
    result = agent.run("1+2?")
    assert [(r["max_tokens"], r["temperature"], r["top_k"], r["seed"]) for r in engine.requests] == [(77, 0.5, 9, 3)] * 2
    # two requests in one answer: generated tokens and time add up, the first request's TTFT counts
    assert result.usage.completion_tokens == 20 and result.usage.decode_ms == 1000.0
    assert result.usage.ttft_ms == 650.0 and result.usage.prompt_tokens == 100


def test_cancel_ends_the_answer_at_the_next_piece_and_keeps_what_was_said():
    engine = ScriptedEngine("one two three four five six seven eight nine ten")
    agent = Agent(engine)
    cancel = threading.Event()
    events = []
    for event in agent.stream("Count.", cancel):
        events.append(event)
        if len(events) == 2:
            cancel.set()  # what a Stop button does, from any thread
    final = events[-1]
    assert isinstance(final, FinalAnswer) and final.result.stop_reason == "stopped"
    assert len(events) == 3 and final.text == "".join(e.text for e in events[:2]).strip()
    assert engine.stopped_early == [True]  # the engine's stream was closed at once
    assert agent.messages[-2:] == [{"role": "user", "content": "Count."}, {"role": "assistant", "content": final.text}]


def test_cancel_during_a_tool_keeps_the_call_and_runs_no_more():
    cancel = threading.Event()

    def first(x: int) -> int:
        """First."""
        cancel.set()
        return x

    engine = ScriptedEngine('<|tool_call|>[{"name": "first", "arguments": {"x": 1}}, '
                            '{"name": "first", "arguments": {"x": 2}}]<|/tool_call|>', "never")
    agent = Agent(engine, tools=[first], constrain=False)
    final = list(agent.stream("Go", cancel))[-1]
    assert final.result.stop_reason == "stopped" and [s.arguments for s in final.result.steps] == [{"x": 1}]
    assert roles(agent.messages) == ["system", "user", "assistant", "tool", "tool", "assistant"]
    assert "stopped" in agent.messages[4]["content"] and len(engine.requests) == 1


def test_an_engine_that_cannot_constrain_gets_the_call_the_model_wrote():
    # No grammar, no JSON schema: the complete call the model wrote is run, not thrown away.
    engine = ScriptedEngine('functools[{"name": "add", "arguments": {"a": 19, "b": 23}}]', "It is 42.",
                            constraints=())
    result = Agent(engine, tools=[add]).run("19 + 23?")
    assert [(s.name, s.arguments, s.result) for s in result.steps] == [("add", {"a": 19, "b": 23}, 42)]
    assert result.answer == "It is 42." and all(r["grammar"] is None and r["json_schema"] is None
                                                for r in engine.requests)


def test_an_engine_that_reads_json_schemas_gets_the_calls_schema():
    engine = ScriptedEngine("<|tool_call|>", '[{"name": "add", "arguments": {"a": 2, "b": 3}}]', "5.",
                            constraints=("json_schema",))
    result = Agent(engine, tools=[add]).run("2 + 3?")
    constrained = engine.requests[1]
    assert constrained["grammar"] is None and constrained["json_schema"]["items"]["properties"]["name"] == {
        "const": "add"}
    assert [s.result for s in result.steps] == [5] and result.answer == "5."
