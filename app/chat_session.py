"""A conversation with the assistant, with no UI in it: history, engine messages, streaming, save/open.

    assistant = Assistant(engine, tools=builtin_tools())
    conversation = Conversation()
    for turn in assistant.ask(conversation, "What is in this picture?", [Attachment(IMAGE, "cat.jpg")]):
        print(turn.answer)      # grows as the answer streams; turn.steps lists the tool calls

A Conversation is plain data: the web page keeps one per browser tab, and it is saved as JSON
with its images and audio copied beside it. The Assistant holds the engine and the tools and
turns a conversation into the engine's messages, so each new turn starts with exactly the
messages of the turns before it and the engine reuses their KV cache.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from app.agents import Agent, FinalAnswer, TextDelta, ToolCallEvent, ToolResultEvent
from app.agents.messages import result_text
from app.prompt import AUDIO, IMAGE, PromptError
from app.voice.wav_file import WavError, read_wav

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant running locally on the user's computer."
# What the model is asked when the user speaks without typing anything (Phi-4-multimodal's
# speech prompts are short instructions like these).
SPOKEN_QUESTION = "Answer the question in the audio."
QUICK_ACTIONS = {
    "transcribe": "Transcribe the audio clip into text.",
    "translate": "Translate the audio to {language}.",
    "summarize": "Summarize the audio.",
}
# Detail (max crops) of an image: a 640x480 webcam frame is 477 tokens at 1 crop, 1,065 from 4 up
# (model.image_crops.num_image_tokens). On a CPU the prefill of those tokens dominates the wait.
WEBCAM_MAX_CROPS = 1
UPLOAD_MAX_CROPS = 4
CONVERSATION_FILE = "conversation.json"
FORMAT_VERSION = 1


class Unsupported(ValueError):
    """The loaded model cannot read this kind of input; the message says so and why."""


class Busy(RuntimeError):
    """A question is still being answered in this conversation."""


class AudioUnreadable(ValueError):
    pass


@dataclass
class Attachment:
    """An image or audio file that goes with a question."""
    kind: str                     # IMAGE or AUDIO
    path: str
    max_crops: int | None = None  # image detail; None = the model's default

    @property
    def name(self) -> str:
        return Path(self.path).name


@dataclass
class Step:
    """One tool call shown in the conversation."""
    name: str
    arguments: dict[str, Any]
    result: str | None = None     # as the model read it
    error: str | None = None
    seconds: float = 0.0
    done: bool = False


@dataclass
class Turn:
    """A question and its answer."""
    text: str
    attachments: list[Attachment] = field(default_factory=list)
    answer: str = ""
    steps: list[Step] = field(default_factory=list)
    # The assistant's tool calls and the tool results between question and answer, as the
    # model saw them: later turns send them again so the KV cache stays valid.
    tool_messages: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] | None = None
    error: str | None = None
    stopped: bool = False
    pending: bool = False


@dataclass
class Settings:
    """How the next answer is generated."""
    system: str = DEFAULT_SYSTEM_PROMPT
    temperature: float = 0.0      # greedy by default: reproducible answers, as Phi-4's own examples
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 1024
    seed: int | None = None
    tools: list[str] = field(default_factory=list)
    force_tool: bool = False      # start every answer with a (grammar-constrained) tool call
    max_tool_calls: int = 5       # per question


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)
    system: str = DEFAULT_SYSTEM_PROMPT
    saved_to: str | None = None
    # Set from another thread (the stop button); the streaming loop checks it between pieces.
    stop_requested: bool = False
    media_dir: str | None = None  # private copies of the attachments (see `keep`)

    @property
    def busy(self) -> bool:
        return any(turn.pending for turn in self.turns)

    @property
    def title(self) -> str:
        first = next((t.text for t in self.turns if t.text.strip()), "")
        return first.strip().splitlines()[0][:60] if first else "Conversation"

    def keep(self, path: str | os.PathLike) -> str:
        """A private copy of a file to attach. The web server rewrites the files of its own
        cache when it sends the chat to the browser, and the model must never read one of
        those half-written."""
        if self.media_dir is None or not Path(self.media_dir).is_dir():
            self.media_dir = tempfile.mkdtemp(prefix="phi4mm-media-")
        source = Path(path)
        target = Path(self.media_dir) / f"{len(os.listdir(self.media_dir)):03d}-{source.name}"
        shutil.copyfile(source, target)
        return str(target)

    # -- saving -------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike) -> Path:
        """Write conversation.json and copy every attachment into folder/media; return the folder."""
        folder = Path(folder)
        media = folder / "media"
        media.mkdir(parents=True, exist_ok=True)
        turns = []
        for i, turn in enumerate(self.turns):
            data = dataclasses.asdict(turn)
            data.pop("pending")
            data["attachments"] = []
            for j, att in enumerate(turn.attachments):
                source = Path(att.path)
                target = source if source.parent.resolve() == media.resolve() else media / f"{i:03d}-{j}-{source.name}"
                if target != source:
                    shutil.copyfile(source, target)
                att.path = str(target)  # from now on the turn points at the saved copy
                data["attachments"].append({"kind": att.kind, "file": str(target.relative_to(folder)),
                                            "max_crops": att.max_crops})
            turns.append(data)
        document = {"version": FORMAT_VERSION, "title": self.title, "saved": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "system": self.system, "turns": turns}
        tmp = folder / (CONVERSATION_FILE + ".tmp")
        tmp.write_text(json.dumps(document, ensure_ascii=False, indent=1))
        tmp.replace(folder / CONVERSATION_FILE)  # never a half-written file under the real name
        self.saved_to = str(folder)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "Conversation":
        folder = Path(folder)
        document = json.loads((folder / CONVERSATION_FILE).read_text())
        if document.get("version") != FORMAT_VERSION:
            raise ValueError(f"{folder}: unknown conversation format {document.get('version')!r}")
        turns = []
        for data in document["turns"]:
            attachments = [Attachment(a["kind"], str(folder / a["file"]), a.get("max_crops"))
                           for a in data.pop("attachments")]
            steps = [Step(**s) for s in data.pop("steps")]
            turns.append(Turn(attachments=attachments, steps=steps, **data))
        return cls(turns=turns, system=document.get("system", DEFAULT_SYSTEM_PROMPT), saved_to=str(folder))


def conversations_dir() -> Path:
    """$XDG_DATA_HOME/phi4mm/conversations (~/.local/share/... without it)."""
    base = os.environ.get("XDG_DATA_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".local" / "share") / "phi4mm" / "conversations"


def saved_conversations(root: str | os.PathLike) -> list[tuple[str, str]]:
    """(label, folder) of each saved conversation under `root`, newest first."""
    found = []
    for path in Path(root).glob(f"*/{CONVERSATION_FILE}"):
        try:
            document = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a damaged file is skipped, never overwritten
        found.append((path.stat().st_mtime, f"{document.get('saved', '')}  {document.get('title', '')}",
                      str(path.parent)))
    return [(label, folder) for _, label, folder in sorted(found, reverse=True)]


def new_conversation_folder(root: str | os.PathLike, conversation: Conversation) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", conversation.title.lower()).strip("-")[:40] or "conversation"
    return Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"


# -- reading attachments --------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _load_image(path: str):
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.copy()


@functools.lru_cache(maxsize=16)
def read_audio(path: str) -> tuple[np.ndarray, int]:
    """(samples, sample_rate) of an audio file: PCM or float WAV natively, other formats (and
    WAV codecs the reader does not know) through pydub + ffmpeg."""
    try:
        samples, rate = read_wav(path)
    except WavError:
        samples, rate = _read_with_pydub(path)
    samples.setflags(write=False)  # cached: shared by every caller
    return samples, rate


def _read_with_pydub(path: str) -> tuple[np.ndarray, int]:
    try:
        from pydub import AudioSegment

        audio = AudioSegment.from_file(path)
    except Exception as e:  # pydub raises many kinds; ffmpeg missing is the usual one
        raise AudioUnreadable(f"cannot read the audio file {Path(path).name}: PCM and float WAV files always "
                              f"work; other formats need ffmpeg ({type(e).__name__}: {e})") from None
    samples = np.array(audio.get_array_of_samples())
    return (samples.reshape(-1, audio.channels) if audio.channels > 1 else samples), audio.frame_rate


# -- stats ----------------------------------------------------------------------------------

def timings_stats(timings: Any) -> dict[str, Any]:
    """The engine's Timings as plain data (saved with the turn)."""
    stats = dataclasses.asdict(timings)
    stats["prefill_tokens_per_s"] = timings.prefill_tokens_per_s
    stats["decode_tokens_per_s"] = timings.decode_tokens_per_s
    return stats


def format_stats(stats: Mapping[str, Any]) -> str:
    """'vision LoRA · 1,065 prompt tokens (12 cached) · encoder 850 ms · prefill 45.1 tok/s · ...'"""
    adapter = stats.get("adapter")
    parts = [f"{adapter} LoRA" if adapter else "no LoRA (text)",
             f"{stats.get('prompt_tokens', 0):,} prompt tokens ({stats.get('reused_tokens', 0):,} cached)"]
    if stats.get("encoder_ms"):
        parts.append(f"encoder {stats['encoder_ms']:,.0f} ms")
    parts += [f"prefill {stats.get('prefill_tokens_per_s', 0):,.1f} tok/s",
              f"decode {stats.get('decode_tokens_per_s', 0):,.1f} tok/s",
              f"TTFT {stats.get('ttft_ms', 0) / 1000:,.2f} s"]
    return " · ".join(parts)


# -- the assistant --------------------------------------------------------------------------

class _WithSampling:
    """The engine as the Agent sees it, with the sampling settings the Agent does not pass."""

    def __init__(self, engine: Any, **extra: Any):
        self.engine, self.extra = engine, extra

    def generate(self, messages: list[dict], **kwargs: Any):
        return self.engine.generate(messages, **{**self.extra, **kwargs})


class Assistant:
    """Answers conversations with one engine and a set of tools (name -> function)."""

    def __init__(self, engine: Any, tools: Mapping[str, Callable[..., Any]] | None = None,
                 unsupported_reason: str = ""):
        self.engine = engine
        self.tools = dict(tools or {})
        # Why the model cannot read images/audio, when it cannot (e.g. the text-only fallback).
        self.unsupported_reason = unsupported_reason

    @property
    def modalities(self) -> set[str]:
        return set(getattr(self.engine, "modalities", set()))

    def check(self, attachments: Sequence[Attachment]) -> None:
        """Raise Unsupported for an attachment the model cannot read."""
        for kind, noun in ((IMAGE, "images"), (AUDIO, "audio")):
            if any(a.kind == kind for a in attachments) and kind not in self.modalities:
                why = f" ({self.unsupported_reason})" if self.unsupported_reason else ""
                raise Unsupported(f"This model cannot read {noun}{why}.")

    # -- messages -----------------------------------------------------------------------

    def user_message(self, turn: Turn) -> dict[str, Any]:
        if not turn.attachments:
            return {"role": "user", "content": turn.text}
        parts: list[dict[str, Any]] = []
        for att in turn.attachments:  # media first, then the question, as Phi-4's examples
            if att.kind == IMAGE:
                part = {"type": IMAGE, IMAGE: _load_image(att.path)}
                if att.max_crops:
                    part["max_crops"] = att.max_crops
            else:
                part = {"type": AUDIO, AUDIO: read_audio(att.path)}
            parts.append(part)
        parts.append({"type": "text", "text": turn.text})
        return {"role": "user", "content": parts}

    def messages(self, turns: Sequence[Turn]) -> list[dict[str, Any]]:
        """The engine's messages for these turns (no system message: the Agent adds it)."""
        out: list[dict[str, Any]] = []
        for turn in turns:
            if turn.error and not turn.answer:
                continue  # a failed question is shown, but the model never sees it again
            out.append(self.user_message(turn))
            out.extend(turn.tool_messages)
            out.append({"role": "assistant", "content": turn.answer})
        return out

    # -- answering ----------------------------------------------------------------------

    def add(self, conversation: Conversation, text: str, attachments: Sequence[Attachment] = ()) -> Turn:
        """Append a question, not yet answered (the page shows it at once, then streams the answer)."""
        self.check(attachments)
        if conversation.busy:
            raise Busy("the last question is still being answered: wait for it, or press Stop")
        turn = Turn(text=text, attachments=list(attachments), pending=True)
        conversation.turns.append(turn)
        conversation.stop_requested = False
        return turn

    def answer(self, conversation: Conversation, settings: Settings | None = None) -> Iterator[Turn]:
        """Stream the answer to the last question, if it awaits one: yields that Turn as it grows."""
        if not conversation.turns or not conversation.turns[-1].pending:
            return
        turn = conversation.turns[-1]
        yield from self._answer(conversation, turn, settings or Settings(system=conversation.system))

    def ask(self, conversation: Conversation, text: str, attachments: Sequence[Attachment] = (),
            settings: Settings | None = None) -> Iterator[Turn]:
        """`add` then `answer`."""
        self.add(conversation, text, attachments)
        yield from self.answer(conversation, settings)

    def retry(self, conversation: Conversation) -> Turn | None:
        """Make the last question unanswered again (regenerate); None when there is none."""
        if not conversation.turns:
            return None
        if conversation.busy:
            raise Busy("the last question is still being answered: wait for it, or press Stop")
        last = conversation.turns[-1]
        conversation.turns[-1] = Turn(text=last.text, attachments=last.attachments, pending=True)
        conversation.stop_requested = False
        return conversation.turns[-1]

    def reply(self, text: str, settings: Settings | None = None) -> str:
        """A one-off answer to `text` in a fresh conversation (the app's `chat` API)."""
        turn = None
        for turn in self.ask(Conversation(), text, (), settings):
            pass
        if turn is None or turn.error:
            raise RuntimeError(turn.error if turn else "no answer")
        return turn.answer

    def _agent(self, settings: Settings) -> Agent:
        tools = [self.tools[name] for name in settings.tools if name in self.tools]
        return Agent(_WithSampling(self.engine, top_k=settings.top_k, seed=settings.seed), tools=tools,
                     system=settings.system or None, max_steps=settings.max_tool_calls, max_tokens=settings.max_tokens,
                     temperature=settings.temperature, top_p=settings.top_p,
                     tool_choice="required" if settings.force_tool and tools else "auto")

    def _answer(self, conversation: Conversation, turn: Turn, settings: Settings) -> Iterator[Turn]:
        conversation.system = settings.system
        turn.pending = True
        if conversation.stop_requested:  # stopped while it waited in the queue
            turn.pending = conversation.stop_requested = False
            turn.stopped = True
            yield turn
            return
        yield turn
        events = None
        try:
            agent = self._agent(settings)
            agent.messages += self.messages(conversation.turns[:-1])
            start = len(agent.messages)
            events = agent.stream(self.user_message(turn))
            for event in events:
                self._apply(turn, event, agent.max_result_chars)
                if isinstance(event, FinalAnswer):
                    turn.tool_messages = _between(event.result.messages, start, turn.answer)
                yield turn
                if conversation.stop_requested:
                    turn.stopped = True
                    # Keep the calls made so far, as the model saw them, before the agent drops them.
                    turn.tool_messages = _between(agent.messages, start, None)
                    turn.answer = turn.answer.strip()
                    break
            turn.stats = timings_stats(self.engine.last) if hasattr(self.engine, "last") else None
        except Exception as e:  # an unreadable file or an engine error ends this answer, not the app
            turn.error = str(e) or type(e).__name__
        finally:
            if events is not None:
                events.close()
            turn.pending = False
            conversation.stop_requested = False
        yield turn

    @staticmethod
    def _apply(turn: Turn, event: Any, max_result_chars: int | None) -> None:
        if isinstance(event, TextDelta):
            turn.answer += event.text
        elif isinstance(event, ToolCallEvent):
            turn.steps.append(Step(event.name, dict(event.arguments)))
        elif isinstance(event, ToolResultEvent):
            step = next((s for s in reversed(turn.steps) if not s.done and s.name == event.name), None)
            if step is None:  # a call the model wrote but nobody could read: shown as a failed step
                step = Step(event.name or "(unreadable call)", {})
                turn.steps.append(step)
            step.result = None if event.error is not None else result_text(event, max_result_chars)
            step.error, step.seconds, step.done = event.error, event.seconds, True
        elif isinstance(event, FinalAnswer):
            turn.answer = event.text


def _between(messages: list[dict[str, Any]], start: int, answer: str | None) -> list[dict[str, Any]]:
    """The messages after the user's (at `start`) and before the final answer."""
    between = [dict(m) for m in messages[start + 1:]]
    if answer is not None and between and between[-1] == {"role": "assistant", "content": answer}:
        between.pop()
    return between
