"""The messages the agent sends to the engine, in the shape its Phi-4 chat template renders.

- system: {"role": "system", "content": ..., "tools": "<JSON list>", "tools_text": ...}
  -> <|system|>content<|tool|>[{"name", "description", "parameters"}, ...]<|/tool|><|end|>
  (`tools_text` is what a chat template without a place for tools appends to the content)
- assistant calling tools: {"role": "assistant", "content": "<|tool_call|>[...]<|/tool_call|>"}
- tool result: {"role": "tool", "content": "<result as text or JSON>"} -> <|tool|>...<|end|>
- a last assistant message is continued by the engine (no end tag, no new header).
"""
import json
from typing import Any, Sequence

from .events import ToolResultEvent, ToolStep
from .parsing import TOOL_CALL_END, TOOL_CALL_START, ToolCall
from .schema import Tool

# Ollama's phi4-mini template uses this when tools are given without a system prompt.
DEFAULT_SYSTEM = "You are a helpful assistant with some tools."
# How tools reach a model whose chat template has no place for them (Phi-4's has one).
TOOLS_IN_TEXT = ("\n\nYou can call these tools:\n{tools}\nTo call tools, answer with "
                 f'{TOOL_CALL_START}[{{{{"name": "<tool name>", "arguments": {{{{...}}}}}}}}]{TOOL_CALL_END}')


def system_message(system: str | None, tools: Sequence[Tool]) -> dict[str, Any] | None:
    """The system message declaring `tools`, or None when there is neither prompt nor tool."""
    if not tools:
        return {"role": "system", "content": system} if system else None
    tools_json = json.dumps([tool.to_phi() for tool in tools], ensure_ascii=False)
    return {"role": "system", "content": system or DEFAULT_SYSTEM, "tools": tools_json,
            "tools_text": TOOLS_IN_TEXT.format(tools=tools_json)}


def user_message(prompt: str | dict[str, Any]) -> dict[str, Any]:
    # A dict passes through untouched, so callers can send whatever the engine accepts
    # for images or audio.
    return prompt if isinstance(prompt, dict) else {"role": "user", "content": prompt}


def call_message(text_before: str, calls: Sequence[ToolCall]) -> dict[str, Any]:
    """The assistant turn that made `calls`, written back in the model's own markup."""
    listed = json.dumps([{"name": c.name, "arguments": c.arguments} for c in calls], ensure_ascii=False)
    return {"role": "assistant", "content": f"{text_before}{TOOL_CALL_START}{listed}{TOOL_CALL_END}"}


def result_message(step: ToolStep, max_chars: int | None = None) -> dict[str, Any]:
    return {"role": "tool", "content": result_text(step, max_chars)}


def result_text(step: ToolStep | ToolResultEvent, max_chars: int | None = None) -> str:
    """What the model reads as the tool's result: text as is, anything else as JSON."""
    if step.error is not None:
        text = json.dumps({"error": step.error}, ensure_ascii=False)
    elif isinstance(step.result, str):
        text = step.result
    else:
        text = json.dumps(step.result, ensure_ascii=False, default=str)
    if max_chars is not None and len(text) > max_chars:
        # A huge result would push the question out of the context window.
        text = text[:max_chars] + f"\n[... cut: {len(text) - max_chars} more characters]"
    return text
