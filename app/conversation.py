"""One conversation with the assistant, the core every front end runs on.

    conversation = Conversation(engine, tools=builtin_tools())
    for event in conversation.ask("What is in this picture?", [Attachment(IMAGE, "cat.jpg")]):
        ...   # TextDelta, ToolCallEvent, ToolResultEvent, then one FinalAnswer with the usage

Two views of one conversation live here. `messages` is the history as the model saw it: one list,
shared with the Agent that answers each turn, so a new turn starts with exactly the messages of
the turns before it and the engine reuses their KV cache. `turns` is what the user sees: each
question with its attachments, the answer, the tool steps, what it cost, an error.

`stop()`, from any thread, ends the answer being written at its next token; the question and
what was said of the answer stay in the conversation. A question that fails (an unreadable
file, a full context) ends with a FinalAnswer whose `error` says why; the conversation goes on
and the model never sees the failed question again. Saving and opening live in
app/conversation_store.py.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from app.agents import (
    Agent,
    Event,
    FinalAnswer,
    TextDelta,
    ToolCallEvent,
    ToolResultEvent,
)
from app.agents.events import AgentResult
from app.agents.messages import result_text
from app.engine_api import (
    AUDIO,
    IMAGE,
    ContextFull,
    Engine,
    EngineError,
    Sampling,
    Usage,
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant running locally on the user's computer."


class Unsupported(ValueError):
    """The loaded model cannot read this kind of input; the message says so and why."""


class Busy(RuntimeError):
    """A question is still being answered in this conversation."""


@dataclass
class Attachment:
    """An image or audio item that goes with a question: a file, or media in memory."""
    kind: str                     # IMAGE or AUDIO
    path: str | None = None
    max_crops: int | None = None  # image detail; None = the model's default
    data: Any = None              # in memory instead of a file: a PIL image, or (samples, sample_rate)

    @property
    def name(self) -> str:
        return Path(self.path).name if self.path else f"{self.kind} (in memory)"

    def part(self) -> dict[str, Any]:
        """The content part the engine reads."""
        part = {"type": self.kind, self.kind: self.path if self.data is None else self.data}
        if self.kind == IMAGE and self.max_crops:
            part["max_crops"] = self.max_crops
        return part


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
    """A question and its answer, as the user sees them."""
    text: str
    attachments: list[Attachment] = field(default_factory=list)
    answer: str = ""
    steps: list[Step] = field(default_factory=list)
    usage: Usage | None = None
    error: str | None = None
    stopped: bool = False
    pending: bool = False
    first_message: int = 0        # where this turn's messages start in Conversation.messages (once asked)


@dataclass
class Settings:
    """How the next answer is generated."""
    system: str = DEFAULT_SYSTEM_PROMPT
    temperature: float = 0.0      # greedy by default: reproducible answers, as Phi-4's own examples
    top_p: float = 1.0
    top_k: int = 0
    max_tokens: int = 1024
    seed: int | None = None
    tools: list[str] = field(default_factory=list)  # names of the tools the model may call
    force_tool: bool = False      # start every answer with a (grammar-constrained) tool call
    max_tool_calls: int = 5       # per question

    def sampling(self) -> Sampling:
        return Sampling(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                        top_k=self.top_k, seed=self.seed)


def format_usage(usage: Usage) -> str:
    """'vision LoRA · 1,065 prompt tokens (12 cached) · encoder 850 ms · prefill 45.1 tok/s · ...'"""
    parts = [f"{usage.adapter} LoRA" if usage.adapter else "no LoRA (text)",
             f"{usage.prompt_tokens:,} prompt tokens ({usage.cached_tokens:,} cached)"]
    if usage.encoder_ms:
        parts.append(f"encoder {usage.encoder_ms:,.0f} ms")
    parts += [f"prefill {usage.prefill_tokens_per_s:,.1f} tok/s",
              f"decode {usage.decode_tokens_per_s:,.1f} tok/s",
              f"TTFT {usage.ttft_ms / 1000:,.2f} s"]
    return " · ".join(parts)


def longest_recording_minutes(engine: Engine, headroom: int = 512) -> float | None:
    """Minutes of audio that fit in the engine's context, leaving `headroom` tokens for the
    instruction and the answer; None for a model that cannot hear."""
    try:
        per_minute = engine.count_tokens({"type": AUDIO, AUDIO: (np.zeros(60 * 16_000, np.float32), 16_000)})
    except EngineError:  # a model that cannot hear
        return None
    return max(engine.n_ctx - headroom, 0) / per_minute



class _MediaCopies:
    """A temporary folder of attachment copies, removed with the last conversation that uses it
    (a conversation and its copies share one), or when the process exits."""

    def __init__(self):
        self.folder = Path(tempfile.mkdtemp(prefix="phi4mm-media-"))
        self._lock = threading.Lock()
        weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)

    def copy(self, source: Path) -> str:
        with self._lock:
            target = self.folder / f"{len(os.listdir(self.folder)):03d}-{source.name}"
            shutil.copyfile(source, target)
        return str(target)


class Conversation:
    """A conversation with one engine and a set of tools (name -> function)."""

    def __init__(self, engine: Engine, tools: Mapping[str, Callable[..., Any]] | None = None,
                 settings: Settings | None = None, unsupported_reason: str = ""):
        self.engine = engine
        self.tools = dict(tools or {})
        self.settings = settings or Settings()
        # Why the model cannot read images/audio, when it cannot (e.g. the text-only fallback).
        self.unsupported_reason = unsupported_reason
        self.turns: list[Turn] = []
        self.messages: list[dict[str, Any]] = []
        self.saved_to: str | None = None
        self._copies: _MediaCopies | None = None  # private copies of the attachments (see `keep`)
        self._agent = Agent(engine, messages=self.messages, max_result_chars=8000)
        self._cancel = threading.Event()

    def __deepcopy__(self, memo: dict) -> "Conversation":
        """A copy of the conversation on the same engine and tools (a web framework copies the
        state it starts each session with; an engine is shared, never copied)."""
        twin = Conversation(self.engine, self.tools, copy.deepcopy(self.settings, memo), self.unsupported_reason)
        twin.turns = copy.deepcopy(self.turns, memo)
        twin.messages[:] = copy.deepcopy(self.messages, memo)
        twin.saved_to, twin._copies = self.saved_to, self._copies
        return twin

    # -- state ----------------------------------------------------------------------------

    @property
    def busy(self) -> bool:
        return any(turn.pending for turn in self.turns)

    @property
    def title(self) -> str:
        first = next((t.text for t in self.turns if t.text.strip()), "")
        return first.strip().splitlines()[0][:60] if first else "Conversation"

    @property
    def modalities(self) -> frozenset[str]:
        return self.engine.modalities

    def check(self, attachments: Sequence[Attachment]) -> None:
        """Raise Unsupported for an attachment the model cannot read."""
        for kind, noun in ((IMAGE, "images"), (AUDIO, "audio")):
            if any(a.kind == kind for a in attachments) and kind not in self.modalities:
                why = f" ({self.unsupported_reason})" if self.unsupported_reason else ""
                raise Unsupported(f"This model cannot read {noun}{why}.")

    def keep(self, path: str | os.PathLike) -> str:
        """A private copy of a file to attach. The web server rewrites the files of its own
        cache when it sends the chat to the browser, and the model must never read one of
        those half-written."""
        if self._copies is None or not self._copies.folder.is_dir():
            self._copies = _MediaCopies()
        return self._copies.copy(Path(path))

    # -- asking ---------------------------------------------------------------------------

    def add(self, text: str, attachments: Sequence[Attachment] = ()) -> Turn:
        """Append a question, not yet answered (a page shows it at once, then streams the answer)."""
        self.check(attachments)
        if self.busy:
            raise Busy("the last question is still being answered: wait for it, or press Stop")
        turn = Turn(text=text, attachments=list(attachments), pending=True, first_message=len(self.messages))
        self.turns.append(turn)
        self._cancel = threading.Event()
        return turn

    def ask(self, text: str, attachments: Sequence[Attachment] = (),
            settings: Settings | None = None) -> Iterator[Event]:
        """`add` then `answer`."""
        self.add(text, attachments)
        yield from self.answer(settings)

    def retry(self) -> Turn | None:
        """Make the last question unanswered again (regenerate); None when there is none."""
        if not self.turns:
            return None
        if self.busy:
            raise Busy("the last question is still being answered: wait for it, or press Stop")
        last = self.turns[-1]
        del self.messages[last.first_message:]
        self.turns[-1] = Turn(text=last.text, attachments=last.attachments, pending=True,
                              first_message=last.first_message)
        self._cancel = threading.Event()
        return self.turns[-1]

    def forget_earlier(self) -> None:
        """Drop every turn but the last (and their messages): for a conversation that no longer
        fits in the context."""
        if not self.turns:
            return
        last = self.turns[-1]
        system = self.messages[:1] if self.messages and self.messages[0].get("role") == "system" else []
        self.messages[:] = system + self.messages[last.first_message:]
        last.first_message = len(system)
        self.turns[:] = [last]

    def stop(self) -> bool:
        """End the answer being written (or about to be) at its next token; True if there was one.
        Safe from any thread."""
        if not self.busy:
            return False
        self._cancel.set()
        return True

    def question_message(self, turn: Turn) -> dict[str, Any]:
        """The user message of a turn: its media first, then the text (as Phi-4's examples)."""
        if not turn.attachments:
            return {"role": "user", "content": turn.text}
        parts = [a.part() for a in turn.attachments]
        if turn.text:
            parts.append({"type": "text", "text": turn.text})
        return {"role": "user", "content": parts}

    def answer(self, settings: Settings | None = None) -> Iterator[Event]:
        """Answer the last question, if it awaits one: its events, the Turn updated as they come."""
        if not self.turns or not self.turns[-1].pending:
            return
        if settings is not None:
            self.settings = settings
        turn = self.turns[-1]
        if self._cancel.is_set():  # stopped while it waited in a queue
            turn.pending, turn.stopped = False, True
            yield FinalAnswer("", AgentResult("", [], list(self.messages), "stopped"))
            return
        events = None
        try:
            self._configure()
            turn.first_message = len(self.messages)
            events = self._agent.stream(self.question_message(turn), self._cancel)
            for event in events:
                self._apply(turn, event)
                yield event
        except Exception as e:  # an unreadable file or an engine error ends this answer, not the conversation
            turn.error = str(e) or type(e).__name__
            reason = "context_full" if isinstance(e, ContextFull) else "error"
            yield FinalAnswer(turn.answer, AgentResult(turn.answer, [], list(self.messages), reason),
                              error=turn.error)
        finally:
            if events is not None:
                events.close()
            turn.pending = False

    def _configure(self) -> None:
        """Bring the agent to the current settings (a changed system prompt or tool set changes
        the first message; the rest of the history stays)."""
        s, agent = self.settings, self._agent
        names = [n for n in s.tools if n in self.tools]
        tools = [self.tools[name] for name in names]
        if list(agent.tools) != names or agent.system != (s.system or None):
            before = len(self.messages)
            agent.set_tools(tools, s.system or None)
            for turn in self.turns:  # a system message added or removed moves every turn's messages
                turn.first_message += len(self.messages) - before
        agent.sampling = s.sampling()
        agent.max_steps = s.max_tool_calls
        agent.tool_choice = "required" if s.force_tool and tools else "auto"

    def _apply(self, turn: Turn, event: Event) -> None:
        if isinstance(event, TextDelta):
            turn.answer += event.text
        elif isinstance(event, ToolCallEvent):
            turn.steps.append(Step(event.name, dict(event.arguments)))
        elif isinstance(event, ToolResultEvent):
            step = next((s for s in reversed(turn.steps) if not s.done and s.name == event.name), None)
            if step is None:  # a call the model wrote but nobody could read: shown as a failed step
                step = Step(event.name or "(unreadable call)", {})
                turn.steps.append(step)
            step.result = None if event.error is not None else result_text(event, self._agent.max_result_chars)
            step.error, step.seconds, step.done = event.error, event.seconds, True
        elif isinstance(event, FinalAnswer):
            turn.answer = event.text
            turn.usage = event.usage
            turn.stopped = event.result is not None and event.result.stop_reason == "stopped"

    def reply(self, text: str) -> str:
        """A one-off answer to `text` (the page's `chat` API); raises RuntimeError on failure."""
        final = None
        for event in self.ask(text):
            if isinstance(event, FinalAnswer):
                final = event
        if final is None or final.error:
            raise RuntimeError(final.error if final else "no answer")
        return final.text
