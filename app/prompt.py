"""Messages -> the prompt the model reads: text pieces with media slots, and the LoRA to use.

Messages have the shape of the engine contract (app/engine_api.py) and are rendered with the
model's own chat template (Phi-4: `<|user|>...<|end|><|assistant|>`). A system message may carry
`tools` (JSON text, or a list that is dumped) for the template's own place for them, and
`tools_text`, what to append to its content where the template has no such place (both written
by app.agents, the one owner of the tool-call format). A last message from the assistant is
continued, not closed.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from app.engine_api import AUDIO, IMAGE, PromptError, adapter_for

_SLOT = "\x00slot{}\x00"
_SLOT_RE = re.compile("\x00slot(\\d+)\x00")


@dataclass
class Media:
    """An image or audio item in the prompt, in order of appearance."""
    kind: str     # IMAGE or AUDIO
    value: Any    # image: PIL.Image or a file path; audio: (samples, sample_rate) or a file path
    options: dict  # per-item options from the content part (e.g. max_crops)


@dataclass
class Prompt:
    pieces: list[str | Media]   # rendered text and media, alternating as they appear

    @property
    def media(self) -> list[Media]:
        return [p for p in self.pieces if isinstance(p, Media)]

    @property
    def modalities(self) -> frozenset[str]:
        return frozenset(m.kind for m in self.media)

    @property
    def adapter(self) -> str | None:
        return adapter_for(self.modalities)


def _content_text(message: dict, index: int, media: list[Media]) -> str:
    """A message's content as text, each image or audio part a slot (appended to `media`)."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise PromptError(f"message {index}: content must be a string or a list of parts")
    return "".join(_part_text(part, index, media) for part in content)


def _part_text(part: Any, index: int, media: list[Media]) -> str:
    if isinstance(part, str):
        return part
    if not isinstance(part, dict) or "type" not in part:
        raise PromptError(f"message {index}: content parts must be dicts with a 'type', got {part!r:.80}")
    kind = part["type"]
    if kind == "text":
        return str(part.get("text", ""))
    if kind not in (IMAGE, AUDIO):
        raise PromptError(f"message {index}: unknown content type {kind!r} (text, image, audio)")
    value = part.get(kind)
    if value is None:
        raise PromptError(f"message {index}: {kind} part without an {kind!r} value")
    if kind == AUDIO and not (isinstance(value, (str, os.PathLike)) or (isinstance(value, tuple) and len(value) == 2)):
        raise PromptError(f"message {index}: audio must be (samples, sample_rate) or a file path")
    options = {k: v for k, v in part.items() if k not in ("type", kind)}
    media.append(Media(kind, value, options))
    return _SLOT.format(len(media) - 1)


class ChatTemplate:
    """The model's Jinja chat template, rendered as transformers does (sandboxed)."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = self._raise
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise PromptError(f"the model's chat template does not parse: {e}") from None
        self.bos_token, self.eos_token = bos_token, eos_token
        # Phi-4's template places a system message's `tools`; other models' templates drop them.
        self.places_tools = "tools" in source

    @staticmethod
    def _raise(message: str):
        raise PromptError(f"chat template: {message}")

    def build(self, messages: list[dict]) -> Prompt:
        if not isinstance(messages, list) or not messages:
            raise PromptError("messages must be a non-empty list")
        media: list[Media] = []
        rendered = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise PromptError(f"message {i} must be a dict with a 'role'")
            out = {"role": m["role"], "content": _content_text(m, i, media)}
            if m.get("tools") is not None:
                tools = m["tools"] if isinstance(m["tools"], str) else json.dumps(m["tools"], ensure_ascii=False)
                if self.places_tools:
                    out["tools"] = tools
                else:
                    out["content"] += m.get("tools_text") or ""
            rendered.append(out)
        continue_last = rendered[-1]["role"] == "assistant"
        history = rendered[:-1] if continue_last else rendered
        try:
            text = self._template.render(messages=history, add_generation_prompt=True,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as e:
            raise PromptError(f"chat template failed: {e}") from None
        if continue_last:
            text += rendered[-1]["content"]
        pieces: list[str | Media] = []
        pos = 0
        for match in _SLOT_RE.finditer(text):
            if match.start() > pos:
                pieces.append(text[pos:match.start()])
            pieces.append(media[int(match.group(1))])
            pos = match.end()
        if pos < len(text):
            pieces.append(text[pos:])
        return Prompt(pieces)
