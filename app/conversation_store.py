"""Saving and opening conversations: a folder per conversation, JSON plus copies of its media.

    folder/conversation.json   the turns (what the user saw) and the messages (what the model saw)
    folder/media/...           every image and audio file of the conversation

A conversation opened again continues where it stopped: its messages are the model's history
as it was, so the first new question reuses nothing but pays for nothing twice either. The file
is written under a temporary name and renamed, so a save never leaves a half-written file.
"""
from __future__ import annotations

import dataclasses
import filecmp
import hashlib
import json
import os
import re
import shutil
import time
import wave
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from app.conversation import Attachment, Conversation, Settings, Step, Turn
from app.engine_api import AUDIO, IMAGE, Engine, Usage

CONVERSATION_FILE = "conversation.json"
FORMAT_VERSION = 2  # 1: turns only, each with the tool messages between question and answer


def conversations_dir() -> Path:
    """$XDG_DATA_HOME/phi4mm/conversations (~/.local/share/... without it)."""
    base = os.environ.get("XDG_DATA_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".local" / "share") / "phi4mm" / "conversations"


def new_conversation_folder(root: str | os.PathLike, conversation: Conversation) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", conversation.title.lower()).strip("-")[:40] or "conversation"
    return Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"


def saved_conversations(root: str | os.PathLike) -> list[tuple[str, str]]:
    """(label, folder) of each saved conversation under `root`, newest first. A damaged file is
    listed as such (opening it says what is wrong), and never overwritten."""
    found = []
    for path in Path(root).glob(f"*/{CONVERSATION_FILE}"):
        try:
            mtime = path.stat().st_mtime
            document = json.loads(path.read_text(encoding="utf-8"))
            label = f"{document.get('saved', '')}  {document.get('title', '')}"
        except (OSError, ValueError):
            label = f"damaged, cannot be opened: {path.parent.name}"
        found.append((mtime, label, str(path.parent)))
    return [(label, folder) for _, label, folder in sorted(found, reverse=True)]


# -- saving ---------------------------------------------------------------------------------

class _MediaFolder:
    """Copies media into folder/media once each, and names them relative to the folder.

    Every file is written under a temporary name and renamed when complete, and a file already
    there whole is not written again: a save that is killed halfway leaves the last saved version
    whole, media included. Media held in memory (a webcam frame, a recorded clip) are named by
    their content, so a second save finds them."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.media = folder / "media"
        self.media.mkdir(parents=True, exist_ok=True)
        self.saved: dict[Any, str] = {}  # a source path, or id() of media in memory -> relative name

    def file_for(self, value: Any, kind: str, hint: str) -> str:
        key = str(value) if isinstance(value, (str, os.PathLike)) else id(value)
        if key in self.saved:
            return self.saved[key]
        if isinstance(value, (str, os.PathLike)):
            source = Path(value)
            target = source if source.parent.resolve() == self.media.resolve() else self.media / f"{hint}-{source.name}"
            if target != source and not (target.exists() and filecmp.cmp(source, target, shallow=False)):
                _write_whole(target, lambda tmp: shutil.copyfile(source, tmp))
        elif kind == IMAGE:
            digest = hashlib.sha1(repr((value.mode, value.size)).encode() + value.tobytes()).hexdigest()[:20]
            target = self.media / f"image-{digest}.png"
            if not target.exists():
                _write_whole(target, lambda tmp: value.save(tmp, format="PNG"))
        else:
            samples, rate = value
            pcm = np.ascontiguousarray(samples, dtype=np.float32)
            digest = hashlib.sha1(repr((pcm.shape, int(rate))).encode() + pcm.tobytes()).hexdigest()[:20]
            target = self.media / f"audio-{digest}.wav"
            if not target.exists():
                _write_whole(target, lambda tmp: _write_wav(tmp, pcm, rate))
        self.saved[key] = str(target.relative_to(self.folder))
        return self.saved[key]


def _write_whole(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` to a temporary name beside `path`, then flushed to disk and renamed to `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    """16-bit PCM WAV of float samples in [-1, 1] ((n,) or (n, channels))."""
    x = np.asarray(samples, dtype=np.float32)
    pcm = np.clip(np.round(x * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1 if x.ndim == 1 else x.shape[1])
        w.setsampwidth(2)
        w.setframerate(int(rate))
        w.writeframes(pcm.tobytes())


def save(conversation: Conversation, folder: str | os.PathLike) -> Path:
    """Write conversation.json and copy every image and audio item into folder/media."""
    folder = Path(folder)
    media = _MediaFolder(folder)
    turns = []
    for i, turn in enumerate(conversation.turns):
        data = dataclasses.asdict(turn)
        data.pop("pending")
        data["usage"] = turn.usage.to_dict() if turn.usage else None
        data["attachments"] = []
        for j, att in enumerate(turn.attachments):
            name = media.file_for(att.path if att.data is None else att.data, att.kind, f"{i:03d}-{j}")
            data["attachments"].append({"kind": att.kind, "file": name, "max_crops": att.max_crops})
        turns.append(data)
    messages = [_message_to_json(m, media, k) for k, m in enumerate(conversation.messages)]
    document = {"version": FORMAT_VERSION, "title": conversation.title, "saved": time.strftime("%Y-%m-%d %H:%M:%S"),
                "system": conversation.settings.system, "turns": turns, "messages": messages}
    # A lone surrogate (text pasted from a broken source) is no UTF-8: it is written as its JSON
    # escape, which reads back as the same string.
    data = json.dumps(document, ensure_ascii=False, indent=1).encode("utf-8", "backslashreplace")
    tmp = folder / (CONVERSATION_FILE + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(folder / CONVERSATION_FILE)  # never a half-written file under the real name
    # From now on the conversation reads the saved copies.
    for turn in conversation.turns:
        for att in turn.attachments:
            if att.data is None:
                att.path = str(folder / media.file_for(att.path, att.kind, ""))
    conversation.saved_to = str(folder)
    return folder


def _message_to_json(message: dict[str, Any], media: _MediaFolder, index: int) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return dict(message)
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in (IMAGE, AUDIO):
            part = {**part, kind: {"file": media.file_for(part[kind], kind, f"m{index:03d}-{j}")}}
        parts.append(part)
    return {**message, "content": parts}


# -- opening --------------------------------------------------------------------------------

def load(folder: str | os.PathLike, engine: Engine, tools: Mapping[str, Callable[..., Any]] | None = None,
         unsupported_reason: str = "") -> Conversation:
    """A saved conversation, ready to go on with `engine`. ValueError for a file it cannot read."""
    folder = Path(folder)
    try:
        document = json.loads((folder / CONVERSATION_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{folder}: cannot read {CONVERSATION_FILE} ({e})") from None
    version = document.get("version") if isinstance(document, dict) else None
    if version not in (1, FORMAT_VERSION):
        raise ValueError(f"{folder}: unknown conversation format {version!r}")
    try:
        conversation = _parse(document, version, folder, engine, tools, unsupported_reason)
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise ValueError(f"{folder}: {CONVERSATION_FILE} is damaged ({type(e).__name__}: {e})") from None
    conversation.saved_to = str(folder)
    return conversation


def _parse(document: dict[str, Any], version: int, folder: Path, engine: Engine,
           tools: Mapping[str, Callable[..., Any]] | None, unsupported_reason: str) -> Conversation:
    system = document.get("system", Settings().system)
    conversation = Conversation(engine, tools, Settings(system=system), unsupported_reason)
    for data in document["turns"]:
        data = dict(data)
        attachments = [Attachment(a["kind"], str(folder / a["file"]), a.get("max_crops"))
                       for a in data.pop("attachments")]
        steps = [Step(**s) for s in data.pop("steps")]
        usage = data.pop("usage", None) if version > 1 else _usage_of_v1(data.pop("stats", None))
        data.pop("tool_messages", None)
        conversation.turns.append(Turn(attachments=attachments, steps=steps,
                                       usage=Usage.from_dict(usage) if usage else None, **data))
    if version == 1:
        conversation.messages[:] = _messages_of_v1(document, conversation)
    else:
        conversation.messages[:] = [_message_from_json(m, folder) for m in document["messages"]]
    return conversation


def _message_from_json(message: dict[str, Any], folder: Path) -> dict[str, Any]:
    content = message.get("content")
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in (IMAGE, AUDIO) and isinstance(part.get(kind), dict):
            part = {**part, kind: str(folder / part[kind]["file"])}
        parts.append(part)
    return {**message, "content": parts}


def _usage_of_v1(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    if not stats:
        return None
    renamed = {"reused_tokens": "cached_tokens", "decode_tokens": "completion_tokens"}
    return {renamed.get(k, k): v for k, v in stats.items()}


def _messages_of_v1(document: dict[str, Any], conversation: Conversation) -> list[dict[str, Any]]:
    """A version-1 file kept no history: the model's messages are rebuilt from its turns, once.
    The system message comes back at the next question, from the settings."""
    messages: list[dict[str, Any]] = []
    for data, turn in zip(document["turns"], conversation.turns):
        turn.first_message = len(messages)
        if turn.error and not turn.answer:
            continue  # a failed question is shown, but the model never saw it
        messages.append(conversation.question_message(turn))
        messages.extend(data.get("tool_messages", []))
        messages.append({"role": "assistant", "content": turn.answer})
    return messages
