"""A GBNF grammar (llama.cpp's format) that only lets the model write valid tool calls.

The agent sends the conversation ending with an assistant message that stops right
after `<|tool_call|>`, so the model continues inside the call; this grammar then accepts
`[{"name": "<a tool>", "arguments": <that tool's arguments>}, ...]`, optionally followed
by `<|/tool_call|>`. The JSON-schema-to-GBNF translation is llama-cpp-python's own.
"""
import json
from typing import Any, Sequence

from app.engine_api import GBNF, JSON_SCHEMA

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



def call_constraint(constraints: frozenset[str], tools: Sequence[Tool]) -> dict[str, Any] | None:
    """How an engine that honours `constraints` (app/engine_api.py) is made to write valid calls:
    the Sampling fields for the call. A llama.cpp grammar where it reads GBNF (the closing tag
    optional), a JSON schema where it reads those (vLLM's guided decoding, OpenAI's structured
    outputs), None where it reads neither: the call the model writes is then parsed leniently
    and checked against the schemas instead."""
    if GBNF in constraints:
        return {"grammar": tool_call_grammar(tools)}
    if JSON_SCHEMA in constraints:
        return {"json_schema": tool_calls_schema(tools)}
    return None
