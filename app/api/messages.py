"""OpenAI chat messages -> the engine's messages: media as their files' bytes, tool calls in the model's format.

    messages = engine_messages(request.messages, MediaPolicy(), modalities=engine.modalities)

Images come as `image_url` parts, audio as `input_audio` (base64 + format) or vLLM's `audio_url`;
both as data: URLs. An offline app does not fetch, and never reads a local file for a caller:
http(s) URLs are refused unless the server was started with --allow-remote-media, file: URLs
always. Bad input raises ApiError (400) naming the message and part.
"""
from __future__ import annotations

import base64
import binascii
import json
import urllib.request
from dataclasses import dataclass
from typing import Any

from app import media
from app.agents.messages import call_message
from app.agents.parsing import ToolCall
from app.api.errors import ApiError
from app.api.schemas import AudioPart, AudioURLPart, ImagePart, Message, TextPart
from app.engine_api import AUDIO, IMAGE

# OpenAI's image detail -> the most crops the image is cut into (None: the model's default).
MAX_CROPS_BY_DETAIL = {"low": 1, "auto": None, "high": None, None: None}
REMOTE_TIMEOUT_S = 20


@dataclass(frozen=True)
class MediaPolicy:
    allow_remote: bool = False            # fetch http(s) URLs
    max_bytes: int = 50 * 1024 * 1024     # per item, decoded


def engine_messages(messages: list[Message], policy: MediaPolicy, modalities: frozenset[str]) -> list[dict[str, Any]]:
    """The engine's messages for an OpenAI request's messages."""
    out = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        content = _content(message, i, policy, modalities)
        if message.role == "assistant" and message.tool_calls:
            calls = [ToolCall(c.function.name, _arguments(c.function.arguments, i, k), c.id)
                     for k, c in enumerate(message.tool_calls)]
            text = content if isinstance(content, str) else ""
            out.append(call_message(text, calls))
            continue
        if message.role == "tool" and not isinstance(content, str):
            raise ApiError(f"messages[{i}]: a tool message's content must be text", param=f"messages[{i}].content")
        out.append({"role": role, "content": content})
        if message.tools is not None:
            if role != "system":
                raise ApiError(f"messages[{i}]: only a system message declares tools", param=f"messages[{i}].tools")
            out[-1]["tools"] = message.tools
    return out


def _content(message: Message, i: int, policy: MediaPolicy, modalities: frozenset[str]) -> str | list[dict]:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    if message.role != "user" and any(not isinstance(p, TextPart) for p in message.content):
        raise ApiError(f"messages[{i}]: only user messages can hold images or audio", param=f"messages[{i}].content")
    parts = [_part(part, i, k, policy, modalities) for k, part in enumerate(message.content)]
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _part(part: Any, i: int, k: int, policy: MediaPolicy, modalities: frozenset[str]) -> dict[str, Any]:
    where = f"messages[{i}].content[{k}]"
    if isinstance(part, TextPart):
        return {"type": "text", "text": part.text}
    kind = IMAGE if isinstance(part, ImagePart) else AUDIO
    if kind not in modalities:
        noun = "images" if kind == IMAGE else "audio"
        raise ApiError(f"{where}: this model cannot read {noun}", param=where, code="unsupported_modality")
    # The file's bytes go to the engine, which decodes them once it has counted the prompt against
    # its context (so a request of twelve 64-megapixel images is refused before any is decoded, and
    # decoding happens on the generation's thread, not on the server's event loop). Here only
    # their headers are read: what is not an image or audio file at all is a 400 naming the part.
    try:
        if isinstance(part, ImagePart):
            data = _fetch(part.image_url.url, where, policy)
            media.image_info(data)
            max_crops = part.image_url.max_crops or MAX_CROPS_BY_DETAIL[part.image_url.detail]
            return {"type": IMAGE, IMAGE: data, "max_crops": max_crops}
        if isinstance(part, AudioPart):
            fmt = part.input_audio.format.lower()
            if fmt not in AUDIO_FORMATS:
                raise ApiError(f"{where}: audio format {fmt!r} is not supported (use one of "
                               f"{', '.join(AUDIO_FORMATS)})", param=f"{where}.input_audio.format")
            data = _base64(part.input_audio.data, where, policy)
        else:
            assert isinstance(part, AudioURLPart)
            data = _fetch(part.audio_url.url, where, policy)
        media.audio_duration(data)
        return {"type": AUDIO, AUDIO: data}
    except media.MediaError as e:
        raise ApiError(f"{where}: {e}", param=where) from None


AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")


def _fetch(url: str, where: str, policy: MediaPolicy) -> bytes:
    """The bytes of a data: URL, or of an http(s) URL where the server allows it."""
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if not header.endswith(";base64"):
            raise ApiError(f"{where}: a data: URL must be base64 (data:<type>;base64,...)", param=where)
        return _base64(data, where, policy)
    scheme = url.split(":", 1)[0].lower()
    if scheme in ("http", "https"):
        if not policy.allow_remote:
            raise ApiError(f"{where}: remote URLs are not fetched by this offline server; send the data as a "
                           f"data: URL (or start the server with --allow-remote-media)", param=where,
                           code="remote_media_disabled")
        return _download(url, where, policy)
    raise ApiError(f"{where}: {scheme!r} URLs are not accepted; send the data as a data: URL", param=where)


def _base64(data: str, where: str, policy: MediaPolicy) -> bytes:
    if len(data) * 3 // 4 > policy.max_bytes:
        raise ApiError(f"{where}: the data is over {policy.max_bytes // 2**20} MB", param=where)
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(f"{where}: the data is not valid base64", param=where) from None


def _download(url: str, where: str, policy: MediaPolicy) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=REMOTE_TIMEOUT_S) as response:  # noqa: S310 (http(s) only)
            data = response.read(policy.max_bytes + 1)
    except OSError as e:
        raise ApiError(f"{where}: could not fetch {url}: {e}", param=where) from None
    if len(data) > policy.max_bytes:
        raise ApiError(f"{where}: {url} is over {policy.max_bytes // 2**20} MB", param=where)
    return data


def _arguments(text: str, i: int, k: int) -> dict[str, Any]:
    try:
        arguments = json.loads(text or "{}")
    except json.JSONDecodeError:
        arguments = None
    if not isinstance(arguments, dict):
        raise ApiError(f"messages[{i}].tool_calls[{k}].function.arguments must be a JSON object",
                       param=f"messages[{i}].tool_calls[{k}].function.arguments")
    return arguments
