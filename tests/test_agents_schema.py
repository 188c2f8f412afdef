"""Tool schemas derived from Python functions, explicit OpenAI specs, and argument validation."""
import enum
from typing import Literal, Optional, Union

import pytest

from app.agents import Tool, tool_from_function, validate
from app.agents.schema import parse_docstring
from tools import calculator


def search(
    query: str,
    limit: int = 5,
    threshold: float = 0.5,
    exact: bool = False,
    sort: Literal["date", "relevance"] = "relevance",
    tags: list[str] | None = None,
    language: Optional[str] = None,
) -> list[str]:
    """Search the notes for a query.

    The second paragraph is not part of the description.

    Args:
        query: Words to look for.
        limit (int): How many results
            to return at most.
        threshold: Minimum score.
        exact: Match whole words only.
        sort: Order of the results.
        tags: Only notes with all these tags.

    Returns:
        The matching note titles.
    """
    return []


def test_schema_from_function():
    tool = tool_from_function(search)
    assert tool.name == "search"
    assert tool.description == "Search the notes for a query."
    assert tool.function is search
    assert tool.parameters == {
        "type": "object",
        "properties": {
            "query": {"description": "Words to look for.", "type": "string"},
            "limit": {"description": "How many results to return at most.", "type": "integer", "default": 5},
            "threshold": {"description": "Minimum score.", "type": "number", "default": 0.5},
            "exact": {"description": "Match whole words only.", "type": "boolean", "default": False},
            "sort": {
                "description": "Order of the results.",
                "type": "string",
                "enum": ["date", "relevance"],
                "default": "relevance",
            },
            "tags": {"description": "Only notes with all these tags.", "type": "array", "items": {"type": "string"}},
            "language": {"type": "string"},
        },
        "required": ["query"],
    }


def test_phi_tool_entry():
    entry = tool_from_function(search).to_phi()
    assert list(entry) == ["name", "description", "parameters"]


def test_more_types():
    class Color(enum.Enum):
        RED = "red"
        BLUE = "blue"

    def f(
        color: Color,
        number: Union[int, float],
        maybe: Optional[int],
        matrix: list[list[int]],
        options: dict[str, int],
        anything,
        level: Literal[1, 2, 3] = 1,
    ):
        """Many types."""

    props = tool_from_function(f).parameters["properties"]
    assert props["color"] == {"type": "string", "enum": ["red", "blue"]}
    assert props["number"] == {"type": "number"}
    # Optional without a default: the model must send it, maybe as null.
    assert props["maybe"] == {"anyOf": [{"type": "integer"}, {"type": "null"}]}
    assert props["matrix"] == {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}
    assert props["options"] == {"type": "object"}
    assert props["anything"] == {"type": "string"}
    assert props["level"] == {"type": "integer", "enum": [1, 2, 3], "default": 1}
    assert tool_from_function(f).parameters["required"] == ["color", "number", "maybe", "matrix", "options", "anything"]


def test_string_annotations_are_resolved():
    namespace = {}
    exec("from __future__ import annotations\ndef g(x: int, y: list[str]):\n    '''G.'''", namespace)
    props = tool_from_function(namespace["g"]).parameters["properties"]
    assert props == {"x": {"type": "integer"}, "y": {"type": "array", "items": {"type": "string"}}}


def test_no_parameters_and_no_docstring():
    def ping():
        pass

    tool = tool_from_function(ping)
    assert tool.description == ""
    assert tool.parameters == {"type": "object", "properties": {}}


def test_args_kwargs_are_skipped_and_names_can_be_overridden():
    def f(a: str, *rest, **extra):
        """F."""

    tool = tool_from_function(f, name="other", description="Custom.")
    assert (tool.name, tool.description) == ("other", "Custom.")
    assert list(tool.parameters["properties"]) == ["a"]


def test_unsupported_type_and_lambda_give_clear_errors():
    class Thing:
        pass

    def f(x: Thing):
        """F."""

    with pytest.raises(TypeError, match="parameter 'x'"):
        tool_from_function(f)
    with pytest.raises(ValueError, match="name="):
        tool_from_function(lambda x: x)


def test_real_builtin_tool():
    tool = tool_from_function(calculator.calculate)
    assert tool.parameters["required"] == ["expression"]
    assert tool.parameters["properties"]["expression"]["type"] == "string"
    assert tool.description


def test_from_openai_shape():
    spec = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    tool = Tool.from_openai(spec, function=lambda city: f"sunny in {city}")
    assert tool.name == "get_weather"
    assert tool.to_phi() == {
        "name": "get_weather",
        "description": "Weather for a city.",
        "parameters": spec["function"]["parameters"],
    }
    assert tool.function(city="Oslo") == "sunny in Oslo"
    assert Tool.from_openai({"name": "bare"}).parameters == {"type": "object", "properties": {}}
    with pytest.raises(ValueError):
        Tool.from_openai({"type": "function", "function": {}})


def test_docstring_parsing():
    summary, args = parse_docstring(
        """Do a thing
        over two lines.

        Args:
            x (int): First.
            y: Second,
                continued.
        Returns:
            nothing: not an argument.
        """
    )
    assert summary == "Do a thing over two lines."
    assert args == {"x": "First.", "y": "Second, continued."}


def test_validation_accepts_valid_arguments():
    schema = tool_from_function(search).parameters
    assert validate({"query": "x"}, schema) == []
    assert validate({"query": "x", "limit": 3, "threshold": 1, "tags": ["a"], "sort": "date"}, schema) == []


def test_validation_errors_are_readable():
    schema = tool_from_function(search).parameters
    errors = validate({"limit": "3", "exact": 1, "sort": "size", "tags": ["a", 2]}, schema)
    assert "arguments: missing required argument 'query'" in errors
    assert 'arguments.limit: expected integer, got "3"' in errors
    assert "arguments.exact: expected boolean, got 1" in errors
    assert 'arguments.sort: must be one of "date", "relevance"; got "size"' in errors
    assert "arguments.tags[1]: expected string, got 2" in errors
    assert validate(True, {"type": "integer"}) == ["arguments: expected integer, got true"]
    assert validate(None, {"anyOf": [{"type": "integer"}, {"type": "null"}]}) == []
    assert validate({"x": 1}, {"type": "object", "properties": {}, "additionalProperties": False}) == [
        "arguments: unexpected argument 'x' (allowed: none)"
    ]
    assert validate([], {"type": "array", "minItems": 1}) == ["arguments: needs at least 1 items"]
    assert validate(7, {"type": "integer", "maximum": 5}) == ["arguments: must be <= 5, got 7"]
