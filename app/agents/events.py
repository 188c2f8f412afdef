"""What an agent run reports: streamed events, and the result of a whole run."""
from dataclasses import dataclass, field
from typing import Any

from app.engine_api import Usage


@dataclass
class ToolStep:
    """One tool call the agent ran, and how it went."""

    name: str
    arguments: dict[str, Any]
    result: Any = None  # what the function returned (None when it failed)
    error: str | None = None  # why it failed, as told to the model
    seconds: float = 0.0


@dataclass
class AgentResult:
    answer: str
    steps: list[ToolStep]
    messages: list[dict[str, Any]]  # the whole conversation so far, as sent to the engine
    # "answer"; "max_steps" when the tool-call limit ended the run; "stopped" by the cancel token;
    # "error" when the engine failed (see FinalAnswer.error)
    stop_reason: str = "answer"
    usage: Usage | None = None  # every request of the turn together (Usage.then)


@dataclass
class TextDelta:
    """A piece of the model's visible text (tool-call markup is never included)."""

    text: str


@dataclass
class ToolCallEvent:
    name: str
    arguments: dict[str, Any]
    id: str = ""


@dataclass
class ToolResultEvent:
    name: str
    result: Any
    error: str | None
    id: str = ""
    seconds: float = 0.0


@dataclass
class FinalAnswer:
    """The last event of a turn: the answer, and in `result` the steps, messages and usage."""

    text: str
    result: AgentResult | None = field(default=None, repr=False)
    error: str | None = None  # why the turn failed, when it did (the conversation goes on)

    @property
    def usage(self) -> Usage | None:
        return self.result.usage if self.result is not None else None


Event = TextDelta | ToolCallEvent | ToolResultEvent | FinalAnswer
