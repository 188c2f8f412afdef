"""One model reply that may call tools: streamed text, then either an answer or the calls.

    reply = yield from model_reply(engine, messages, sampling, tools, constraint={"grammar": gbnf})
    reply.calls      # [ToolCall, ...] when the model called tools, [] for an answer

The reply is generated freely and streamed as TextDeltas. When the model starts a tool call,
the free generation is cut there and the call is generated again under `constraint` (a GBNF
grammar or a JSON schema, whichever the engine honours: app/agents/grammar.py
`call_constraint`), by continuing an assistant message that ends in `<|tool_call|>`, so its
arguments are always valid; without one the call the model wrote is parsed leniently instead.
Markup never shows in the text. The agent loop runs the calls it gets; the HTTP API hands them to its client.
"""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Generator, Mapping

from app.engine_api import Engine, Sampling, Usage

from .events import TextDelta
from .parsing import (
    TOOL_CALL_END,
    TOOL_CALL_START,
    ToolCall,
    find_call_start,
    parse_tool_calls,
    partial_marker_length,
)
from .schema import Tool


class Stopped(Exception):
    """The cancel token was set; `args[0]` is the text shown so far."""


@dataclass
class Reply:
    """What the model wrote in one reply."""
    text: str                       # the visible text: the whole answer, or what came before the calls
    calls: list[ToolCall] = field(default_factory=list)
    call_text: str = ""             # the call markup as written (when the model began a call)
    unreadable: bool = False        # it began a call but wrote nothing readable
    finish_reason: str = "stop"     # of the last request: "stop", "length" or "context"
    usage: Usage | None = None      # every request of the reply together


def _complete_call(text: str) -> bool:
    """Whether a constrained call's JSON list is whole (not cut off by the token budget)."""
    body = text.split(TOOL_CALL_START, 1)[-1].split(TOOL_CALL_END, 1)[0].strip()
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


class _Requests:
    """The usage and finish reason of the engine requests one reply makes."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.finish_reason = "stop"

    def add(self, usage: Usage | None, finish_reason: str | None) -> None:
        if usage is not None:
            self.usage = usage if self.usage is None else self.usage.then(usage)
        if finish_reason is not None:
            self.finish_reason = finish_reason


def model_reply(engine: Engine, messages: list[dict], sampling: Sampling, tools: Mapping[str, Tool], *,
                constraint: dict | None = None, call_first: bool = False, call_max_tokens: int = 512,
                cancel: threading.Event | None = None) -> Generator[TextDelta, None, Reply]:
    """Stream one reply to `messages`; return it. `call_first` skips the free text and makes the
    reply a (constrained) call at once. Raises Stopped when `cancel` is set."""
    cancel = cancel or threading.Event()
    requests = _Requests()
    if call_first and constraint is not None:
        text, call_at = "", 0
    else:
        text, call_at = yield from _free_text(engine, messages, sampling, bool(tools), constraint is not None, cancel,
                                              requests)
    if call_at is None:
        parsed = parse_tool_calls(text) if tools else None
        if parsed is None or not parsed.calls:
            return Reply(text, finish_reason=requests.finish_reason, usage=requests.usage)
        # a bare JSON call, without markup
        return Reply(parsed.text, parsed.calls, text, finish_reason="stop", usage=requests.usage)
    before = text[:call_at]
    if constraint is not None:
        call_text = _constrained_call(engine, messages, before, sampling, constraint, call_max_tokens, requests)
    else:
        call_text = text[call_at:]
    if cancel.is_set():
        raise Stopped(before)
    parsed = parse_tool_calls(call_text)
    # Under the constraint only the token budget can stop a call early; a lenient reading of the
    # cut-off JSON would invent arguments, so it is reported as unreadable instead.
    if not parsed.calls or (constraint is not None and not _complete_call(call_text)):
        return Reply(before, [], call_text, unreadable=True, finish_reason=requests.finish_reason,
                     usage=requests.usage)
    return Reply(before, parsed.calls, call_text, finish_reason="stop", usage=requests.usage)


def _free_text(engine: Engine, messages: list[dict], sampling: Sampling, watch: bool, cut_at_call: bool,
               cancel: threading.Event, requests: _Requests) -> Generator[TextDelta, None, tuple[str, int | None]]:
    """Stream the reply as TextDeltas; return (text, index where a tool call starts or None).

    Text that might be the beginning of a call marker is held back until it is clear, so the
    call markup never shows. When the call will be generated again under a constraint,
    generation stops as soon as the call starts.
    """
    chunks = engine.stream(messages, sampling.but(stop=(*sampling.stop, TOOL_CALL_END)) if watch else sampling)
    text, shown, call_at = "", 0, None
    try:
        for chunk in chunks:
            requests.add(chunk.usage, chunk.finish_reason)
            if cancel.is_set():
                raise Stopped(text[:shown] if call_at is None else text[:call_at])
            text += chunk.text
            if watch and call_at is None:
                call_at = find_call_start(text, shown)
            if call_at is not None:
                if call_at > shown:
                    yield TextDelta(text[shown:call_at])
                    shown = call_at
                if cut_at_call:
                    break
                continue
            visible = len(text) - (partial_marker_length(text) if watch else 0)
            if visible > shown:
                yield TextDelta(text[shown:visible])
                shown = visible
    finally:
        chunks.close()  # stops the engine at once when we leave early
    if call_at is None and len(text) > shown:
        yield TextDelta(text[shown:])
    return text, call_at


def _constrained_call(engine: Engine, messages: list[dict], before: str, sampling: Sampling, constraint: dict,
                      call_max_tokens: int, requests: _Requests) -> str:
    """Generate the tool call again under the constraint, continuing `before<|tool_call|>`."""
    continued = [*messages, {"role": "assistant", "content": before + TOOL_CALL_START}]
    call_sampling = sampling.but(max_tokens=max(call_max_tokens, sampling.max_tokens), stop=(),
                                 **{"grammar": None, "json_schema": None, **constraint})
    completion = engine.generate(continued, call_sampling)
    requests.add(completion.usage, completion.finish_reason)
    generated = completion.text
    # An engine that ignores the continuation may repeat the marker; don't add a second one.
    return generated if find_call_start(generated) is not None else TOOL_CALL_START + generated
