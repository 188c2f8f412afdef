"""The agent loop: ask the model, run the tools it calls, hand it the results, repeat.

Each model turn is generated freely and streamed. When the model starts a tool call, the
free generation is cut there and the call is generated again under a grammar built from
the tools' schemas (by continuing an assistant message that ends in `<|tool_call|>`), so
its arguments are always valid. With `constrain=False`, or without llama-cpp-python, the
free call is parsed leniently and checked against the schema instead; errors go back to
the model as tool results either way.
"""
import json
import threading
import warnings
from typing import Any, Callable, Generator, Iterator, Sequence

from app.engine_api import Chunk, Engine, Sampling, Usage

from .events import AgentResult, Event, FinalAnswer, TextDelta, ToolCallEvent, ToolResultEvent, ToolStep
from .execute import execute
from .grammar import tool_call_grammar
from .messages import call_message, result_message, system_message, user_message
from .parsing import (
    TOOL_CALL_END,
    TOOL_CALL_START,
    ParsedReply,
    find_call_start,
    parse_tool_calls,
    partial_marker_length,
)
from .schema import Tool, tool_from_function

UNREADABLE_CALL = (
    "could not read the tool call; write it as "
    '<|tool_call|>[{"name": "<tool name>", "arguments": {...}}]<|/tool_call|>'
)
STOPPED_CALL = "not run: the user stopped the answer"
TOOL_CHOICES = ("auto", "required")


def _complete_call(text: str) -> bool:
    """Whether a constrained call's JSON list is whole (not cut off by the token budget)."""
    body = text.split(TOOL_CALL_START, 1)[-1].split(TOOL_CALL_END, 1)[0].strip()
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


class _Stopped(Exception):
    """The cancel token was set: the turn ends with what was said so far."""


class Agent:
    """A conversation with a model that can call tools. Each `run`/`stream` adds one turn.

    `messages` is the conversation's history: pass a list to share it (the agent appends the
    turns to it and keeps its first message the system message of the current tools).
    """

    def __init__(
        self,
        engine: Engine,
        tools: Sequence[Tool | Callable[..., Any]] = (),
        system: str | None = None,
        *,
        sampling: Sampling = Sampling(max_tokens=1024),
        max_steps: int = 10,
        tool_timeout: float | None = 30.0,
        constrain: bool = True,
        max_result_chars: int | None = 8000,
        tool_choice: str = "auto",
        call_max_tokens: int = 512,
        messages: list[dict[str, Any]] | None = None,
    ):
        self.engine = engine
        self.sampling = sampling
        self.max_steps = max_steps  # tool calls run per question
        self.tool_timeout = tool_timeout
        self.max_result_chars = max_result_chars
        self.constrain = constrain
        self.call_max_tokens = call_max_tokens  # budget of one constrained call, apart from the answer's
        self.tool_choice = tool_choice
        self.messages: list[dict[str, Any]] = messages if messages is not None else []
        self.tools: dict[str, Tool] = {}
        self.system = system
        self.grammar: str | None = None
        self._cancel = threading.Event()
        self._usage: Usage | None = None
        self.set_tools(tools, system)

    @property
    def tool_choice(self) -> str:
        return self._tool_choice

    @tool_choice.setter
    def tool_choice(self, choice: str) -> None:
        if choice not in TOOL_CHOICES:
            raise ValueError(f"tool_choice must be 'auto' or 'required', got {choice!r}")
        # "required": each question starts with a (grammar-constrained) call, as OpenAI's tool_choice.
        self._tool_choice = choice

    def set_tools(self, tools: Sequence[Tool | Callable[..., Any]], system: str | None) -> None:
        """Use these tools and this system prompt from the next question on (the history stays)."""
        named: dict[str, Tool] = {}
        for item in tools:
            tool = item if isinstance(item, Tool) else tool_from_function(item)
            if tool.name in named:
                raise ValueError(f"two tools are named {tool.name!r}")
            named[tool.name] = tool
        if list(named.values()) != list(self.tools.values()):
            self.grammar = self._build_grammar(named) if self.constrain and named else None
        self.tools, self.system = named, system
        first = system_message(system, list(named.values()))
        has_system = bool(self.messages) and self.messages[0].get("role") == "system"
        if first is None:
            if has_system:
                del self.messages[0]
        elif has_system:
            self.messages[0] = first
        else:
            self.messages.insert(0, first)

    def reset(self) -> None:
        """Forget the conversation, keeping the system prompt and tools."""
        del self.messages[:]
        self.set_tools(list(self.tools.values()), self.system)

    def run(self, prompt: str | dict[str, Any]) -> AgentResult:
        """Ask one question (continuing the conversation) and return the answer and the tool steps."""
        result = None
        for event in self.stream(prompt):
            if isinstance(event, FinalAnswer):
                result = event.result
        assert result is not None  # stream always ends with a FinalAnswer
        return result

    def stream(self, prompt: str | dict[str, Any], cancel: threading.Event | None = None) -> Iterator[Event]:
        """Like `run`, as events: TextDelta, ToolCallEvent, ToolResultEvent, then one FinalAnswer.

        Setting `cancel` ends the turn at the next token (or after the running tool): the
        question, the calls made and what was written of the answer stay in the conversation,
        and the FinalAnswer's stop_reason is "stopped". A turn that does not reach its
        FinalAnswer (an error, or the caller closing the stream) is taken out again.
        """
        start = len(self.messages)
        self.messages.append(user_message(prompt))
        self._cancel = cancel or threading.Event()
        self._usage: Usage | None = None
        finished = False
        try:
            for event in self._turn():
                finished = isinstance(event, FinalAnswer)
                yield event
        finally:
            if not finished:
                del self.messages[start:]

    def _turn(self) -> Iterator[Event]:
        steps: list[ToolStep] = []
        try:
            yield from self._steps(steps)
        except _Stopped as stopped:
            yield self._finish(str(stopped.args[0]) if stopped.args else "", steps, "stopped")

    def _steps(self, steps: list[ToolStep]) -> Iterator[Event]:
        told_limit = False  # the model was told that no more tools will run
        while True:
            # Past the limit calls are not run, so there is no point constraining them.
            constrain = self.grammar is not None and len(steps) < self.max_steps
            if constrain and not steps and self.tool_choice == "required":
                text, call_at = "", 0  # go straight to the constrained call
            else:
                text, call_at = yield from self._reply(constrain)
            if call_at is None:
                parsed = parse_tool_calls(text) if self.tools else ParsedReply([], text)
                if not parsed.calls:
                    yield self._finish(text, steps, "max_steps" if told_limit else "answer")
                    return
                before = parsed.text  # a bare JSON call, without markup
            else:
                before = text[:call_at]
                call_text = self._constrained_call(before) if constrain else text[call_at:]
                if self._cancel.is_set():
                    raise _Stopped(before)
                parsed = parse_tool_calls(call_text)
                if constrain and not _complete_call(call_text):
                    # Under the grammar only the token budget can stop a call early; a lenient
                    # reading of the cut-off JSON would invent arguments, so report it instead.
                    parsed = ParsedReply([], call_text)
                if not parsed.calls:
                    # The model began a call but wrote nothing readable: tell it, and let it retry.
                    self.messages.append({"role": "assistant", "content": before + call_text})
                    step = ToolStep("", {}, error=UNREADABLE_CALL)
                    steps.append(step)
                    self.messages.append(result_message(step))
                    yield ToolResultEvent("", None, step.error)
                    continue

            self.messages.append(call_message(before, parsed.calls))
            skipped_any = False
            for call in parsed.calls:
                if self._cancel.is_set():  # every call gets its result, so the history stays well formed
                    self.messages.append(result_message(ToolStep(call.name, call.arguments, error=STOPPED_CALL)))
                    continue
                if len(steps) >= self.max_steps:
                    skipped_any = True
                    skipped = ToolStep(call.name, call.arguments, error=self._limit_message())
                    self.messages.append(result_message(skipped))
                    continue
                yield ToolCallEvent(call.name, call.arguments, call.id)
                step = execute(call, self.tools, self.tool_timeout)
                steps.append(step)
                self.messages.append(result_message(step, self.max_result_chars))
                yield ToolResultEvent(step.name, step.result, step.error, call.id, step.seconds)
            if self._cancel.is_set():
                raise _Stopped("")
            if skipped_any:
                if told_limit:
                    # Told once that the limit was reached, the model still calls tools: stop.
                    yield self._finish(before, steps, "max_steps", record=False)
                    return
                told_limit = True  # one more turn, in which it can answer

    def _reply(self, constrain: bool) -> Generator[TextDelta, None, tuple[str, int | None]]:
        """Stream one model reply as TextDeltas; return (text, index where a tool call starts or None).

        Text that might be the beginning of a call marker is held back until it is clear,
        so the call markup never shows. When the call will be regenerated under the
        grammar, generation stops as soon as the call starts.
        """
        watch = bool(self.tools)
        chunks = self.engine.stream(self.messages, self.sampling.but(stop=(TOOL_CALL_END,)))
        text, shown, call_at = "", 0, None
        try:
            for chunk in chunks:
                self._count(chunk)
                if self._cancel.is_set():
                    raise _Stopped(text[:shown] if call_at is None else text[:call_at])
                text += chunk.text
                if watch and call_at is None:
                    call_at = find_call_start(text, shown)
                if call_at is not None:
                    if call_at > shown:
                        yield TextDelta(text[shown:call_at])
                        shown = call_at
                    if constrain:
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

    def _constrained_call(self, before: str) -> str:
        """Generate the tool call again under the grammar, continuing `before<|tool_call|>`."""
        messages = [*self.messages, {"role": "assistant", "content": before + TOOL_CALL_START}]
        sampling = self.sampling.but(max_tokens=max(self.call_max_tokens, self.sampling.max_tokens),
                                     grammar=self.grammar)
        completion = self.engine.generate(messages, sampling)
        self._count(Chunk("", completion.finish_reason, completion.usage))
        generated = completion.text
        # An engine that ignores the continuation may repeat the marker; don't add a second one.
        return generated if find_call_start(generated) is not None else TOOL_CALL_START + generated

    def _count(self, chunk: Chunk) -> None:
        """Add a finished request's usage to the turn's."""
        if chunk.usage is not None:
            self._usage = chunk.usage if self._usage is None else self._usage.then(chunk.usage)

    def _finish(self, text: str, steps: list[ToolStep], reason: str, record: bool = True) -> FinalAnswer:
        answer = text.strip()
        if record:
            self.messages.append({"role": "assistant", "content": answer})
        return FinalAnswer(answer, AgentResult(answer, steps, list(self.messages), reason, self._usage))

    def _limit_message(self) -> str:
        return (
            f"not run: the limit of {self.max_steps} tool calls for one question was reached; "
            "answer with the information you have"
        )

    @staticmethod
    def _build_grammar(tools: dict[str, Tool]) -> str | None:
        try:
            return tool_call_grammar(list(tools.values()))
        except Exception as exc:  # e.g. llama-cpp-python missing, or a schema its converter rejects
            warnings.warn(f"tool calls will not be constrained by a grammar: {exc}", stacklevel=4)
            return None
