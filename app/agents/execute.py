"""Running one tool call safely: checked arguments, a time limit, errors caught.

Whatever goes wrong becomes `ToolStep.error`, which the model reads as the tool's result,
so that a bad call or a failing tool never ends the conversation.
"""
import threading
import time
from typing import Any, Mapping

from .events import ToolStep
from .parsing import ToolCall
from .schema import Tool
from .validate import validate


def execute(call: ToolCall, tools: Mapping[str, Tool], timeout: float | None) -> ToolStep:
    """Run `call` with the matching tool from `tools`; never raises."""
    tool = tools.get(call.name)
    if tool is None:
        available = ", ".join(tools) or "none"
        return ToolStep(call.name, call.arguments, error=f"unknown tool {call.name!r}; available tools: {available}")
    problems = validate(call.arguments, tool.parameters)
    if problems:
        return ToolStep(call.name, call.arguments, error="invalid arguments: " + "; ".join(problems))
    if tool.function is None:
        return ToolStep(call.name, call.arguments, error=f"tool {call.name!r} has no implementation")
    started = time.monotonic()
    result, error = _call_with_timeout(tool, call.arguments, timeout)
    return ToolStep(call.name, call.arguments, result, error, time.monotonic() - started)


def _call_with_timeout(tool: Tool, arguments: dict[str, Any], timeout: float | None) -> tuple[Any, str | None]:
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = tool.function(**arguments)
        except BaseException as exc:  # the tool's failure is reported to the model, whatever it is
            outcome["error"] = f"{type(exc).__name__}: {exc}"

    # A daemon thread, because a thread cannot be killed: a hung tool is abandoned
    # (it keeps running in the background) but never blocks the agent or interpreter exit.
    worker = threading.Thread(target=target, name=f"tool-{tool.name}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return None, f"tool {tool.name!r} timed out after {timeout:g} seconds"
    return outcome.get("result"), outcome.get("error")
