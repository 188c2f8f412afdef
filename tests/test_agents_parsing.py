"""parse_tool_calls: the markups Phi-4-mini writes, almost-JSON, and garbage."""
import pytest

from app.agents import parse_tool_calls
from app.agents.lenient_json import loads, read_values
from app.agents.parsing import find_call_start, partial_marker_length


def calls_of(text):
    return [(c.name, c.arguments) for c in parse_tool_calls(text).calls]


def test_native_markup_with_closing_tag():
    parsed = parse_tool_calls('<|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris"}}]<|/tool_call|>')
    assert [(c.name, c.arguments) for c in parsed.calls] == [("get_weather", {"city": "Paris"})]
    assert parsed.text == ""
    assert parsed.calls[0].id.startswith("call_")


def test_native_markup_without_closing_tag():
    assert calls_of('<|tool_call|>[{"name": "now", "arguments": {}}]') == [("now", {})]


def test_functools_markup():
    text = 'functools[{"name": "add", "arguments": {"a": 1, "b": 2}}]'
    assert calls_of(text) == [("add", {"a": 1, "b": 2})]


def test_several_calls_in_one_list():
    text = '<|tool_call|>[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {"y": "z"}}]<|/tool_call|>'
    assert calls_of(text) == [("a", {"x": 1}), ("b", {"y": "z"})]


def test_several_tool_call_blocks():
    text = (
        '<|tool_call|>[{"name": "a", "arguments": {}}]<|/tool_call|>'
        '<|tool_call|>[{"name": "b", "arguments": {}}]'
    )
    assert calls_of(text) == [("a", {}), ("b", {})]


def test_comma_separated_objects_without_list():
    text = '<|tool_call|>{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {"x": 2}}<|/tool_call|>'
    assert calls_of(text) == [("a", {"x": 1}), ("b", {"x": 2})]


def test_single_object_without_list():
    assert calls_of('<|tool_call|>{"name": "a", "arguments": {"x": 1}}') == [("a", {"x": 1})]


def test_single_quotes_python_literals_and_trailing_commas():
    text = "<|tool_call|>[{'name': 'f', 'arguments': {'on': True, 'off': False, 'none': None, 'n': -1.5e2,},},]"
    assert calls_of(text) == [("f", {"on": True, "off": False, "none": None, "n": -150.0})]


def test_unbalanced_closing_brackets():
    assert calls_of('<|tool_call|>[{"name": "f", "arguments": {"x": 1}}]]}<|/tool_call|>') == [("f", {"x": 1})]
    # A wrong closer closes whatever is open.
    assert calls_of('<|tool_call|>[{"name": "f", "arguments": {"x": 1}]') == [("f", {"x": 1})]
    # Missing closers at the end of the text.
    assert calls_of('<|tool_call|>[{"name": "f", "arguments": {"x": [1, 2') == [("f", {"x": [1, 2]})]


def test_arguments_given_as_a_json_string():
    text = '<|tool_call|>[{"name": "f", "arguments": "{\\"city\\": \\"Oslo\\"}"}]'
    assert calls_of(text) == [("f", {"city": "Oslo"})]


def test_parameters_key_and_openai_shape_are_understood():
    assert calls_of('<|tool_call|>[{"name": "f", "parameters": {"x": 1}}]') == [("f", {"x": 1})]
    openai = '<|tool_call|>[{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\\"x\\": 2}"}}]'
    parsed = parse_tool_calls(openai)
    assert [(c.name, c.arguments, c.id) for c in parsed.calls] == [("f", {"x": 2}, "c1")]


def test_text_around_the_call_is_kept():
    parsed = parse_tool_calls('Let me check. <|tool_call|>[{"name": "f", "arguments": {}}]<|/tool_call|> One moment.')
    assert [c.name for c in parsed.calls] == ["f"]
    assert parsed.text == "Let me check.  One moment."
    # Unclosed markup: what follows the JSON is ordinary text.
    parsed = parse_tool_calls('<|tool_call|>[{"name": "f", "arguments": {}}] and then some')
    assert parsed.text == "and then some"


def test_result_unpacks_as_a_pair():
    calls, text = parse_tool_calls('Hi <|tool_call|>[{"name": "f", "arguments": {}}]')
    assert [c.name for c in calls] == ["f"]
    assert text == "Hi"


def test_bare_json_call_without_markup():
    assert calls_of('[{"name": "f", "arguments": {"x": 1}}]') == [("f", {"x": 1})]
    parsed = parse_tool_calls('Calling:\n```json\n{"name": "f", "arguments": {"x": 1}}\n```')
    assert [(c.name, c.arguments) for c in parsed.calls] == [("f", {"x": 1})]
    assert parsed.text == "Calling:"


def test_json_in_an_answer_is_not_a_call():
    text = 'Here is your record: {"name": "Bob", "age": 42}'
    parsed = parse_tool_calls(text)
    assert parsed.calls == [] and parsed.text == text


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "Just an answer.",
        "<|tool_call|>",
        "<|tool_call|> }}}} [[[ ",
        "<|tool_call|>[1, 2, 3]",
        '<|tool_call|>[{"arguments": {}}]',
        '<|tool_call|>[{"name": 5, "arguments": {}}]',
        "functools[",
        "\x00\xff<|tool_call|>{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{{",
        "[" * 5000,
    ],
)
def test_garbage_never_raises(garbage):
    parsed = parse_tool_calls(garbage)
    assert isinstance(parsed.calls, list)
    if not parsed.calls:
        assert parsed.text == garbage


def test_garbage_gives_no_calls():
    for text in ["<|tool_call|> }}}} [[[ ", "<|tool_call|>[1, 2, 3]", '<|tool_call|>[{"arguments": {}}]', "[" * 5000]:
        assert parse_tool_calls(text).calls == []


def test_arguments_that_are_not_an_object_become_empty():
    assert calls_of('<|tool_call|>[{"name": "f", "arguments": "not json"}]') == [("f", {})]
    assert calls_of('<|tool_call|>[{"name": "f", "arguments": [1, 2]}]') == [("f", {})]


def test_marker_helpers():
    assert find_call_start("abc <|tool_call|>") == 4
    assert find_call_start("x functools[") == 2
    assert find_call_start("no call") is None
    assert partial_marker_length("Hello <|tool") == len("<|tool")
    assert partial_marker_length("Hello func") == len("func")
    assert partial_marker_length("Hello <") == 1
    assert partial_marker_length("Hello") == 0


def test_lenient_json_reader():
    assert loads('{"a": 1}') == {"a": 1}
    assert loads("{a: 'b', c: celsius, d: None,}") == {"a": "b", "c": "celsius", "d": None}
    assert loads('"line\nbreak \\u00e9"') == "line\nbreak é"
    assert loads("{'unterminated': 'str") == {"unterminated": "str"}
    values, end = read_values('{"a": 1} , [2]] tail')
    assert values == [{"a": 1}, [2]]
    assert '{"a": 1} , [2]] tail'[end:] == " tail"
