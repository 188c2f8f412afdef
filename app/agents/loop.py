"""The agent loop: ask the model, run the tools it calls, hand it the results, repeat.

Each model reply comes from `model_reply` (app/agents/reply.py): streamed text, and tool calls
generated again under a grammar built from the tools' schemas, so their arguments are always
valid. With `constrain=False`, or without llama-cpp-python, the call the model wrote is parsed
leniently and checked against the schema instead; errors go back to the model as tool results
either way.
"""
import threading
import warnings
from typing import Any, Callable, Iterator, Sequence

from app.engine_api import Engine, Sampling, Usage

from .events import AgentResult, Event, FinalAnswer, ToolCallEvent, ToolResultEvent, ToolStep
from .execute import execute
from .grammar import call_constraint
from .messages import call_message, result_message, system_message, user_message
from .reply import Stopped, model_reply
from .schema import Tool, tool_from_function

UNREADABLE_CALL = (
    "could not read the tool call; write it as "
    '<|tool_call|>[{"name": "<tool name>", "arguments": {...}}]<|/tool_call|>'
)
STOPPED_CALL = "not run: the user stopped the answer"
TOOL_CHOICES = ("auto", "required")


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
        self.constraint: dict | None = None  # how calls are constrained: app/agents/grammar.py call_constraint
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
            self.constraint = self._build_constraint(named) if self.constrain and named else None
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
        except Stopped as stopped:
            yield self._finish(str(stopped.args[0]) if stopped.args else "", steps, "stopped")

    def _steps(self, steps: list[ToolStep]) -> Iterator[Event]:
        told_limit = False  # the model was told that no more tools will run
        while True:
            # Past the limit calls are not run, so there is no point constraining them.
            constrain = self.constraint is not None and len(steps) < self.max_steps
            reply = yield from model_reply(
                self.engine, self.messages, self.sampling, self.tools, constraint=self.constraint if constrain else None,
                call_first=constrain and not steps and self.tool_choice == "required",
                call_max_tokens=self.call_max_tokens, cancel=self._cancel)
            if reply.usage is not None:
                self._usage = reply.usage if self._usage is None else self._usage.then(reply.usage)
            if reply.unreadable:
                # The model began a call but wrote nothing readable: tell it, and let it retry.
                self.messages.append({"role": "assistant", "content": reply.text + reply.call_text})
                step = ToolStep("", {}, error=UNREADABLE_CALL)
                steps.append(step)
                self.messages.append(result_message(step))
                yield ToolResultEvent("", None, step.error)
                continue
            if not reply.calls:
                yield self._finish(reply.text, steps, "max_steps" if told_limit else "answer")
                return

            self.messages.append(call_message(reply.text, reply.calls))
            skipped_any = False
            for call in reply.calls:
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
                raise Stopped("")
            if skipped_any:
                if told_limit:
                    # Told once that the limit was reached, the model still calls tools: stop.
                    yield self._finish(reply.text, steps, "max_steps", record=False)
                    return
                told_limit = True  # one more turn, in which it can answer

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

    @property
    def grammar(self) -> str | None:
        """The GBNF grammar calls are generated under, where the engine reads GBNF."""
        return (self.constraint or {}).get("grammar")

    def _build_constraint(self, tools: dict[str, Tool]) -> dict | None:
        try:
            return call_constraint(self.engine.constraints, list(tools.values()))
        except Exception as exc:  # e.g. llama-cpp-python missing, or a schema its converter rejects
            warnings.warn(f"tool calls will not be constrained by a grammar: {exc}", stacklevel=4)
            return None
