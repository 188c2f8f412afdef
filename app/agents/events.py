"""What an agent run reports: streamed events, and the result of a whole run."""
from dataclasses import dataclass, field
from typing import Any


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
    stop_reason: str = "answer"  # "answer", or "max_steps" when the tool-call limit ended the run


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
    """The last event of a run. `result` holds the steps and messages too."""

    text: str
    result: AgentResult | None = field(default=None, repr=False)


Event = TextDelta | ToolCallEvent | ToolResultEvent | FinalAnswer
