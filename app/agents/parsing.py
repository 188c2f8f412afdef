"""Reading tool calls out of what the model wrote.

Phi-4-mini calls tools as `<|tool_call|>[{"name": ..., "arguments": {...}}]<|/tool_call|>`
and often leaves out the closing tag; vLLM's prompt for the same model teaches it
`functools[{...}]` instead. Both are read here, and, as a last resort, a bare JSON call
with no markup at all (only if it has both "name" and "arguments", so that an answer
that merely contains JSON is not taken for a call).
"""
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from . import lenient_json

TOOL_CALL_START = "<|tool_call|>"
TOOL_CALL_END = "<|/tool_call|>"
FUNCTOOLS_START = "functools["
CALL_MARKERS = (TOOL_CALL_START, FUNCTOOLS_START)

_BARE_CALL = re.compile(r"""(?:\[\s*)?\{\s*["']?name["']?\s*:""")
_EMPTY_FENCE = re.compile(r"```[\w-]*\s*```")


def _new_id() -> str:
    return "call_" + uuid.uuid4().hex[:12]


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=_new_id)


@dataclass
class ParsedReply:
    calls: list[ToolCall]
    text: str  # what the model wrote around the calls

    def __iter__(self) -> Iterator[Any]:  # allows `calls, text = parse_tool_calls(reply)`
        return iter((self.calls, self.text))


def find_call_start(text: str, start: int = 0) -> int | None:
    """Index of the first tool-call marker in `text` at or after `start`, or None."""
    found = [i for i in (text.find(marker, start) for marker in CALL_MARKERS) if i >= 0]
    return min(found) if found else None


def partial_marker_length(text: str) -> int:
    """Length of the end of `text` that could be the beginning of a call marker.

    A streaming reader holds those characters back until it knows whether a call starts.
    """
    for length in range(min(len(text), max(map(len, CALL_MARKERS)) - 1), 0, -1):
        if any(marker.startswith(text[-length:]) for marker in CALL_MARKERS):
            return length
    return 0


def parse_tool_calls(text: str) -> ParsedReply:
    """Find the tool calls in a model reply. Never raises: garbage gives no calls and the text."""
    try:
        calls, rest = _read_marked_calls(text)
        if not calls and find_call_start(text) is None:
            calls, rest = _read_bare_calls(text)
    except Exception:  # a parser bug must not take the agent down; treat the reply as text
        calls = []
    return ParsedReply(calls, rest) if calls else ParsedReply([], text)


def _read_marked_calls(text: str) -> tuple[list[ToolCall], str]:
    calls: list[ToolCall] = []
    kept: list[str] = []  # the text outside the call markup
    pos = 0
    while (start := find_call_start(text, pos)) is not None:
        kept.append(text[pos:start])
        if text.startswith(FUNCTOOLS_START, start):
            list_start = start + len(FUNCTOOLS_START) - 1  # read from the "["
            values, pos = lenient_json.read_values(text, list_start)
            pos = max(pos, start + len(FUNCTOOLS_START))
        else:
            body = start + len(TOOL_CALL_START)
            # The call ends at its closing tag, or where the next call starts, or with the text.
            ends = [text.find(marker, body) for marker in (TOOL_CALL_END, *CALL_MARKERS)]
            end = min([i for i in ends if i >= 0], default=len(text))
            payload = text[body:end]
            values, used = lenient_json.read_values(payload)
            if text.startswith(TOOL_CALL_END, end):
                pos = end + len(TOOL_CALL_END)
            else:
                kept.append(payload[used:])  # unclosed: what follows the JSON is ordinary text
                pos = end
        calls.extend(_calls_from(values))
    kept.append(text[pos:])
    return calls, _tidy("".join(kept).replace(TOOL_CALL_END, ""))


def _read_bare_calls(text: str) -> tuple[list[ToolCall], str]:
    match = _BARE_CALL.search(text)
    if not match:
        return [], text
    values, end = lenient_json.read_values(text, match.start())
    calls = _calls_from(values, need_arguments=True)
    return calls, _tidy(text[: match.start()] + text[end:])


def _calls_from(values: list[Any], need_arguments: bool = False) -> list[ToolCall]:
    calls = []
    for item in _flatten(values):
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("function"), dict):  # OpenAI shape: {"type": "function", "function": {...}}
            item = {"id": item.get("id"), **item["function"]}
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            continue
        key = next((k for k in ("arguments", "parameters", "args") if k in item), None)
        if key is None and need_arguments:
            continue
        call_id = item.get("id")
        arguments = _as_arguments(item.get(key) if key else None)
        if isinstance(call_id, str) and call_id:
            calls.append(ToolCall(name.strip(), arguments, id=call_id))
        else:
            calls.append(ToolCall(name.strip(), arguments))
    return calls


def _as_arguments(value: Any) -> dict[str, Any]:
    if isinstance(value, str):  # arguments sent as a JSON string, OpenAI style
        try:
            value = lenient_json.loads(value) if value.strip() else {}
        except (ValueError, RecursionError):
            return {}
    # Anything else that is not an object is dropped; validation then names the missing arguments.
    return value if isinstance(value, dict) else {}


def _flatten(values: list[Any]) -> Iterator[Any]:
    for value in values:
        if isinstance(value, list):
            yield from _flatten(value)
        else:
            yield value


def _tidy(text: str) -> str:
    return _EMPTY_FENCE.sub("", text).strip()
