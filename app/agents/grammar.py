"""A GBNF grammar (llama.cpp's format) that only lets the model write valid tool calls.

The agent sends the conversation ending with an assistant message that stops right
after `<|tool_call|>`, so the model continues inside the call; this grammar then accepts
`[{"name": "<a tool>", "arguments": <that tool's arguments>}, ...]`, optionally followed
by `<|/tool_call|>`. The JSON-schema-to-GBNF translation is llama-cpp-python's own.
"""
import json
from typing import Any, Sequence

from .parsing import TOOL_CALL_END
from .schema import Tool


def tool_calls_schema(tools: Sequence[Tool]) -> dict[str, Any]:
    """JSON schema of a non-empty list of calls, each naming one tool and matching its parameters."""
    if not tools:
        raise ValueError("a tool-call grammar needs at least one tool")
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": tool.parameters},
            "required": ["name", "arguments"],
        }
        for tool in tools
    ]
    return {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}


def tool_call_grammar(tools: Sequence[Tool]) -> str:
    """GBNF for the text after `<|tool_call|>`. Needs llama-cpp-python (imported here, on use)."""
    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(
        prop_order={"name": 0, "arguments": 1}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    # Round-trip through JSON so that tuples and other Python-only values become JSON values.
    schema = converter.resolve_refs(json.loads(json.dumps(tool_calls_schema(tools))), "tools")
    converter.visit(schema, "calls")
    # The closing tag is optional: Phi-4-mini often ends the turn without it.
    return converter.format_grammar() + f'\nroot ::= calls "{TOOL_CALL_END}"?\n'


def json_grammar(schema: dict[str, Any] | None = None) -> str:
    """GBNF for one JSON value: any object (`schema` None), or one that validates against `schema`
    (OpenAI's `response_format` json_object / json_schema). Needs llama-cpp-python."""
    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    schema = {"type": "object"} if schema is None else json.loads(json.dumps(schema))
    schema = converter.resolve_refs(schema, "response")
    converter.visit(schema, "")
    return converter.format_grammar()
