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

# Everything that comes from a message (its text, its media, the tools' declaration) enters the
# rendered template as a slot, and comes back out as a piece of its own: the template's markup is
# only ever what the template itself wrote, and a message that spells `<|end|><|system|>` cannot
# forge a turn, nor a `\x00...` in it a slot.
_SLOT = "\x00{kind}{index}\x00"
_SLOT_RE = re.compile("\x00(text|media)(\\d+)\x00")


@dataclass
class Media:
    """An image or audio item in the prompt, in order of appearance."""
    kind: str     # IMAGE or AUDIO
    value: Any    # image: PIL.Image, a file path or the file's bytes; audio: (samples, sample_rate), a path or bytes
    options: dict  # per-item options from the content part (e.g. max_crops)


@dataclass
class Text:
    """Text from a message. `special`: whether special-token spellings in it are read as special
    tokens; only for the assistant's own turns (its tool-call markup), never for text from a user,
    a file or a tool."""
    text: str
    special: bool = False


@dataclass
class Prompt:
    pieces: list[str | Text | Media]   # the template's markup (str), message text and media, in order

    @property
    def media(self) -> list[Media]:
        return [p for p in self.pieces if isinstance(p, Media)]

    @property
    def modalities(self) -> frozenset[str]:
        return frozenset(m.kind for m in self.media)

    @property
    def adapter(self) -> str | None:
        return adapter_for(self.modalities)


class _Slots:
    """What the messages hold, numbered, while the template renders around their slots."""

    def __init__(self) -> None:
        self.texts: list[Text] = []
        self.media: list[Media] = []

    def text(self, text: str, special: bool) -> str:
        if not text:
            return ""
        self.texts.append(Text(text, special))
        return _SLOT.format(kind="text", index=len(self.texts) - 1)

    def item(self, item: Media) -> str:
        self.media.append(item)
        return _SLOT.format(kind="media", index=len(self.media) - 1)

    def pieces(self, rendered: str) -> list[str | Text | Media]:
        pieces: list[str | Text | Media] = []
        pos = 0
        for match in _SLOT_RE.finditer(rendered):
            if match.start() > pos:
                pieces.append(rendered[pos:match.start()])
            store = self.texts if match.group(1) == "text" else self.media
            pieces.append(store[int(match.group(2))])
            pos = match.end()
        if pos < len(rendered):
            pieces.append(rendered[pos:])
        return pieces


def _content_text(message: dict, index: int, slots: _Slots) -> str:
    """A message's content as slots: its text runs and each image or audio part."""
    content = message.get("content")
    special = message.get("role") == "assistant"
    if content is None:
        return ""
    if isinstance(content, str):
        return slots.text(content, special)
    if not isinstance(content, list):
        raise PromptError(f"message {index}: content must be a string or a list of parts")
    return "".join(_part_text(part, index, slots, special) for part in content)


def _part_text(part: Any, index: int, slots: _Slots, special: bool) -> str:
    if isinstance(part, str):
        return slots.text(part, special)
    if not isinstance(part, dict) or "type" not in part:
        raise PromptError(f"message {index}: content parts must be dicts with a 'type', got {part!r:.80}")
    kind = part["type"]
    if kind == "text":
        return slots.text(str(part.get("text", "")), special)
    if kind not in (IMAGE, AUDIO):
        raise PromptError(f"message {index}: unknown content type {kind!r} (text, image, audio)")
    value = part.get(kind)
    if value is None:
        raise PromptError(f"message {index}: {kind} part without an {kind!r} value")
    if kind == AUDIO and not (isinstance(value, (str, os.PathLike, bytes, bytearray, memoryview))
                              or (isinstance(value, tuple) and len(value) == 2)):
        raise PromptError(f"message {index}: audio must be (samples, sample_rate), a file path or the file's bytes")
    options = {k: v for k, v in part.items() if k not in ("type", kind)}
    return slots.item(Media(kind, value, options))


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
        slots = _Slots()
        rendered = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise PromptError(f"message {i} must be a dict with a 'role'")
            out = {"role": m["role"], "content": _content_text(m, i, slots)}
            if m.get("tools") is not None:
                tools = m["tools"] if isinstance(m["tools"], str) else json.dumps(m["tools"], ensure_ascii=False)
                if self.places_tools:
                    out["tools"] = slots.text(tools, special=False)
                else:
                    out["content"] += slots.text(m.get("tools_text") or "", special=False)
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
        return Prompt(slots.pieces(text))
