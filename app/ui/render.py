"""A Conversation as the messages of Gradio's Chatbot (plain dicts: no Gradio import needed).

Each turn becomes the user's message (text, then image thumbnails and audio players), one
collapsible step per tool call (Chatbot `metadata`: title, status, duration), and the answer
with a small line under it: the LoRA the prompt used and what the answer cost.
"""
from __future__ import annotations

import json
from typing import Any

from app.conversation import Conversation, Step, Turn, format_usage


def chat_messages(conversation: Conversation) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    for turn in conversation.turns:
        messages.append(user_message(turn))
        messages += [step_message(step) for step in turn.steps]
        answer = answer_message(turn)
        if answer is not None:
            messages.append(answer)
    return messages


def user_message(turn: Turn) -> dict[str, Any]:
    content: list[Any] = [turn.text] if turn.text else []
    content += [{"path": att.path} for att in turn.attachments if att.path]
    return {"role": "user", "content": content}


def step_message(step: Step) -> dict[str, Any]:
    arguments = json.dumps(step.arguments, ensure_ascii=False, indent=1)
    body = f"**Arguments**\n```json\n{arguments}\n```\n"
    if step.error is not None:
        body += f"**Error**\n```\n{step.error}\n```"
    elif step.done:
        body += f"**Result**\n```\n{step.result}\n```"
    metadata: dict[str, Any] = {"title": f"Tool call: {step.name}", "status": "done" if step.done else "pending"}
    if step.done:
        metadata["duration"] = round(step.seconds, 3)
    return {"role": "assistant", "content": body, "metadata": metadata}


def answer_message(turn: Turn) -> dict[str, Any] | None:
    text = turn.answer
    if turn.stopped:
        text += " *(stopped)*"
    if turn.error:
        text += ("\n\n" if text else "") + f"⚠️ {turn.error}"
    if not text.strip():
        if not turn.pending or turn.steps:
            return None
        text = "…"  # the question is queued or prefilling: show that something is under way
    if turn.usage and not turn.pending:
        text += f'\n\n<div class="turn-stats">{format_usage(turn.usage)}</div>'
    return {"role": "assistant", "content": text}
