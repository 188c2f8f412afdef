"""Function calling for Phi-4-mini: tools from Python functions, a robust call parser,
grammar-constrained arguments, and the agent loop.

    agent = Agent(engine, tools=[calculate])
    result = agent.run("What is 17 * 23?")
    result.answer, result.steps

The engine is passed in and used only through the engine contract (app/engine_api.py):
`engine.stream(messages, sampling)` for answers, `engine.generate` for constrained calls.
"""
from .events import AgentResult, Event, FinalAnswer, TextDelta, ToolCallEvent, ToolResultEvent, ToolStep
from .grammar import tool_call_grammar, tool_calls_schema
from .loop import Agent
from .messages import DEFAULT_SYSTEM
from .parsing import ParsedReply, ToolCall, parse_tool_calls
from .schema import Tool, tool_from_function
from .validate import validate

__all__ = [
    "Agent",
    "AgentResult",
    "DEFAULT_SYSTEM",
    "Event",
    "FinalAnswer",
    "ParsedReply",
    "TextDelta",
    "Tool",
    "ToolCall",
    "ToolCallEvent",
    "ToolResultEvent",
    "ToolStep",
    "parse_tool_calls",
    "tool_call_grammar",
    "tool_calls_schema",
    "tool_from_function",
    "validate",
]
