"""The agent loop: ask the model, run the tools it calls, hand it the results, repeat.

Each model turn is generated freely and streamed. When the model starts a tool call, the
free generation is cut there and the call is generated again under a grammar built from
the tools' schemas (by continuing an assistant message that ends in `<|tool_call|>`), so
its arguments are always valid. With `constrain=False`, or without llama-cpp-python, the
free call is parsed leniently and checked against the schema instead; errors go back to
the model as tool results either way.
"""
import json
import warnings
from typing import Any, Callable, Generator, Iterator, Protocol, Sequence

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


def _complete_call(text: str) -> bool:
    """Whether a constrained call's JSON list is whole (not cut off by the token budget)."""
    body = text.split(TOOL_CALL_START, 1)[-1].split(TOOL_CALL_END, 1)[0].strip()
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


class Engine(Protocol):
    def generate(
        self,
        messages: list[dict[str, Any]],
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        stream: bool = False,
        grammar: str | None = None,
    ) -> str | Iterator[str]: ...


class Agent:
    """A conversation with a model that can call tools. Each `run`/`stream` adds one turn."""

    def __init__(
        self,
        engine: Engine,
        tools: Sequence[Tool | Callable[..., Any]] = (),
        system: str | None = None,
        *,
        max_steps: int = 10,
        tool_timeout: float | None = 30.0,
        constrain: bool = True,
        max_tokens: int = 1024,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_result_chars: int | None = 8000,
        tool_choice: str = "auto",
        call_max_tokens: int = 512,
    ):
        self.engine = engine
        self.tools: dict[str, Tool] = {}
        for item in tools:
            tool = item if isinstance(item, Tool) else tool_from_function(item)
            if tool.name in self.tools:
                raise ValueError(f"two tools are named {tool.name!r}")
            self.tools[tool.name] = tool
        self.system = system
        self.max_steps = max_steps  # tool calls run per question
        self.tool_timeout = tool_timeout
        self.max_result_chars = max_result_chars
        if tool_choice not in ("auto", "required"):
            raise ValueError(f"tool_choice must be 'auto' or 'required', got {tool_choice!r}")
        # "required": each question starts with a (grammar-constrained) call, as OpenAI's tool_choice.
        self.tool_choice = tool_choice
        self.call_max_tokens = call_max_tokens  # budget of one constrained call, apart from the answer's
        self.sampling = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p}
        self.grammar = self._build_grammar() if constrain and self.tools else None
        self.messages: list[dict[str, Any]] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation, keeping the system prompt and tools."""
        first = system_message(self.system, list(self.tools.values()))
        self.messages = [first] if first else []

    def run(self, prompt: str | dict[str, Any]) -> AgentResult:
        """Ask one question (continuing the conversation) and return the answer and the tool steps."""
        result = None
        for event in self.stream(prompt):
            if isinstance(event, FinalAnswer):
                result = event.result
        assert result is not None  # stream always ends with a FinalAnswer
        return result

    def stream(self, prompt: str | dict[str, Any]) -> Iterator[Event]:
        """Like `run`, as events: TextDelta, ToolCallEvent, ToolResultEvent, then one FinalAnswer.

        A turn that does not reach its FinalAnswer (an error, or the caller stopping early)
        is taken out of the conversation again.
        """
        start = len(self.messages)
        self.messages.append(user_message(prompt))
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
        pieces = self.engine.generate(self.messages, stop=[TOOL_CALL_END], stream=True, **self.sampling)
        if isinstance(pieces, str):
            pieces = iter([pieces])
        text, shown, call_at = "", 0, None
        try:
            for piece in pieces:
                text += piece
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
            close = getattr(pieces, "close", None)
            if close is not None:
                close()  # stops the engine's generator when we leave early
        if call_at is None and len(text) > shown:
            yield TextDelta(text[shown:])
        return text, call_at

    def _constrained_call(self, before: str) -> str:
        """Generate the tool call again under the grammar, continuing `before<|tool_call|>`."""
        messages = [*self.messages, {"role": "assistant", "content": before + TOOL_CALL_START}]
        sampling = {**self.sampling, "max_tokens": max(self.call_max_tokens, self.sampling["max_tokens"])}
        generated = self.engine.generate(messages, grammar=self.grammar, stream=False, **sampling)
        if not isinstance(generated, str):
            generated = "".join(generated)
        # An engine that ignores the continuation may repeat the marker; don't add a second one.
        return generated if find_call_start(generated) is not None else TOOL_CALL_START + generated

    def _finish(self, text: str, steps: list[ToolStep], reason: str, record: bool = True) -> FinalAnswer:
        answer = text.strip()
        if record:
            self.messages.append({"role": "assistant", "content": answer})
        return FinalAnswer(answer, AgentResult(answer, steps, list(self.messages), reason))

    def _limit_message(self) -> str:
        return (
            f"not run: the limit of {self.max_steps} tool calls for one question was reached; "
            "answer with the information you have"
        )

    def _build_grammar(self) -> str | None:
        try:
            return tool_call_grammar(list(self.tools.values()))
        except Exception as exc:  # e.g. llama-cpp-python missing, or a schema its converter rejects
            warnings.warn(f"tool calls will not be constrained by a grammar: {exc}", stacklevel=3)
            return None
