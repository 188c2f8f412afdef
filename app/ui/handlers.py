"""What the page's events do: each handler takes the values of components and returns new ones.

The conversation of a browser tab (app.conversation) does the work; the handlers only turn
what the page sends into questions, and the conversation back into the chat it shows. Nothing
here builds components (app/ui/layout.py) or connects events (app/ui/page.py).
"""
from __future__ import annotations

import mimetypes
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import gradio as gr
from PIL import Image

from app import conversation_store, media, speech_out
from app.conversation import (
    Attachment,
    Busy,
    Conversation,
    Settings,
    Unsupported,
    longest_recording_minutes,
)
from app.engine_api import AUDIO, IMAGE, Engine, EngineError
from app.ui.one_thread import run_in_thread
from app.ui.render import chat_messages

# What the model is asked when the user speaks or shows without typing anything (Phi-4-multimodal's
# speech prompts are short instructions like these).
SPOKEN_QUESTION = "Answer the question in the audio."
DESCRIBE_IMAGE = "Describe the image."
QUICK_ACTIONS = {
    "transcribe": "Transcribe the audio clip into text.",
    "translate": "Translate the audio to {language}.",
    "summarize": "Summarize the audio.",
}
# Detail (max crops) of an image: a 640x480 webcam frame is 477 tokens at 1 crop, 1,065 from 4 up.
# On a CPU the prefill of those tokens dominates the wait.
WEBCAM_MAX_CROPS = 1
UPLOAD_MAX_CROPS = 4
MAX_CROPS_LIMIT = 36  # the model's own default: the most detail it was trained with
WEBCAM_EXAMPLE, UPLOAD_EXAMPLE = (640, 480), (1920, 1080)


@dataclass
class PageInfo:
    """What the page says about the model, and where conversations are saved."""
    model_name: str
    notice: str | None = None            # a banner: e.g. the text-only fallback and how to get the full model
    details: str = ""                    # threads, context size...
    conversations_root: Path = field(default_factory=conversation_store.conversations_dir)


def attachment_for(path: str, max_crops: int) -> Attachment:
    """An uploaded file as an Attachment, by its type; Unsupported for anything but images and audio."""
    kind = _kind_of(path)
    if kind not in (IMAGE, AUDIO):
        raise Unsupported(f"{Path(path).name}: only images and audio files can go with a question")
    return Attachment(kind, path, int(max_crops) if kind == IMAGE else None)


def _kind_of(path: str) -> str:
    return (mimetypes.guess_type(path)[0] or "").split("/")[0]


def settings_from(system: str, temperature: float, top_p: float, top_k: int, max_tokens: int,
                  seed: float | None, tools: list[str], force_tool: bool, max_tool_calls: int) -> Settings:
    return Settings(system=system or "", temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                    max_tokens=int(max_tokens), seed=None if seed in (None, "") or seed < 0 else int(seed),
                    tools=list(tools or []), force_tool=bool(force_tool), max_tool_calls=int(max_tool_calls))


def tool_summary(fn: Callable[..., Any]) -> str:
    """The first sentence of a tool's description, as the model sees it."""
    from app.agents import tool_from_function

    description = tool_from_function(fn).description
    match = re.match(r"(.*?[.!?])\s+(?=[A-Z])", description)
    return (match.group(1) if match else description).rstrip(".")


def _error(message: str) -> gr.Error:
    return gr.Error(message, print_exception=False)


class Handlers:
    """The page's event handlers, on one engine and one set of tools."""

    def __init__(self, engine: Engine, tools: Mapping[str, Callable[..., Any]], info: PageInfo,
                 unsupported_reason: str = ""):
        self.engine, self.tools, self.info = engine, dict(tools), info
        self.unsupported_reason = unsupported_reason

    def new_conversation(self, system: str | None = None) -> Conversation:
        settings = Settings() if system is None else Settings(system=system)
        return Conversation(self.engine, self.tools, settings, self.unsupported_reason)

    # -- token costs ----------------------------------------------------------------------

    def recording_note(self) -> str:
        """How long a recording the context holds (Phi-4-multimodal reads 12.5 audio tokens a second)."""
        minutes = longest_recording_minutes(self.engine)
        if minutes is None:
            return ""
        return f"At this context ({self.engine.n_ctx:,} tokens) a recording can be up to about {minutes:,.0f} min long."

    def detail_note(self, max_crops: int, example: tuple[int, int]) -> str:
        """What an image of the example size costs at this detail, from the loaded encoder's config."""
        try:
            tokens = self.engine.count_tokens({"type": IMAGE, IMAGE: Image.new("1", example), "max_crops": int(max_crops)})
        except EngineError:  # a model that cannot see
            return ""
        w, h = example
        return f"Detail {int(max_crops)}: a {w}×{h} image is **{tokens:,} tokens** of prefill."

    def attachments_note(self, message: dict | None, upload_crops: int, webcam: str | None,
                         webcam_crops: int) -> str:
        """What the pending attachments cost in prompt tokens (on a CPU the prefill is most of the wait)."""
        files = (message or {}).get("files") or []
        pending = [(f, upload_crops, Path(f).name) for f in files] + (
            [(webcam, webcam_crops, "webcam frame")] if webcam else [])
        items, total = [], 0
        for path, crops, label in pending:
            kind = _kind_of(path)
            if kind not in (IMAGE, AUDIO):
                continue
            part = {"type": kind, kind: path} | ({"max_crops": int(crops)} if kind == IMAGE else {})
            try:
                n = self.engine.count_tokens(part)
                if kind == IMAGE:
                    info = media.image_info(path)
                    note = f" ({info.note})" if info.note else ""
                    items.append(f"🖼️ {label} {info.width}×{info.height} → {n:,} tokens{note}")
                else:
                    items.append(f"🎤 {label} {media.audio_duration(path):.1f} s → {n:,} tokens")
            except (OSError, media.MediaError, EngineError):
                continue  # the question's own check reports unreadable files
            total += n
        if not items:
            return ""
        return " · ".join(items) + (f" · **{total:,} tokens in all**" if len(items) > 1 else "")

    # -- asking ---------------------------------------------------------------------------

    def submit(self, conv: Conversation, message: dict | None, webcam_path: str | None, webcam_detail: float,
               upload_detail: float):
        text = ((message or {}).get("text") or "").strip()
        files = (message or {}).get("files") or []
        try:
            attachments = [attachment_for(path, upload_detail) for path in files]
            if webcam_path:
                attachments.append(Attachment(IMAGE, webcam_path, int(webcam_detail)))
            for attachment in attachments:
                attachment.path = conv.keep(attachment.path)
            if not text and not attachments:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip()
            if not text:
                text = SPOKEN_QUESTION if any(a.kind == AUDIO for a in attachments) else DESCRIBE_IMAGE
            conv.add(text, attachments)
        except (Unsupported, Busy) as e:
            raise _error(str(e)) from None
        return chat_messages(conv), None, None, ""

    def submit_voice(self, action: str, conv: Conversation, audio_path: str | None, target_language: str):
        if not audio_path:
            raise _error("Record or upload a spoken question first.")
        text = SPOKEN_QUESTION if action == "ask" else QUICK_ACTIONS[action].format(language=target_language)
        try:
            conv.add(text, [Attachment(AUDIO, conv.keep(audio_path))])
        except (Unsupported, Busy) as e:
            raise _error(str(e)) from None
        return chat_messages(conv), None

    def answer(self, conv: Conversation, *settings: Any) -> Iterator[Any]:
        if not conv.busy:  # nothing was asked (an empty message)
            yield gr.skip()
            return
        for _ in run_in_thread(lambda: conv.answer(settings_from(*settings))):
            yield chat_messages(conv)

    def stop(self, conv: Conversation) -> None:
        conv.stop()

    def regenerate(self, conv: Conversation):
        try:
            if conv.retry() is None:
                raise _error("Nothing to regenerate yet.")
        except Busy as e:
            raise _error(str(e)) from None
        return chat_messages(conv)

    def new_chat(self, conv: Conversation, system_prompt: str):
        if conv.busy:
            raise _error("An answer is still being written: press Stop first.")
        return self.new_conversation(system_prompt), [], None, ""

    def spoken_reply(self, conv: Conversation, enabled: bool):
        if not enabled or not conv.turns or not conv.turns[-1].answer:
            return gr.skip()
        path = Path(tempfile.mkdtemp(prefix="phi4mm-tts-")) / "answer.wav"
        try:
            return gr.Audio(str(speech_out.speak_to_file(conv.turns[-1].answer, path)), visible=True)
        except RuntimeError as e:
            gr.Warning(str(e))
            return gr.skip()

    # -- saved conversations --------------------------------------------------------------

    def save(self, conv: Conversation):
        if not conv.turns:
            raise _error("Nothing to save yet.")
        if conv.busy:
            raise _error("Wait for the answer to finish, then save.")
        root = self.info.conversations_root
        folder = Path(conv.saved_to) if conv.saved_to else conversation_store.new_conversation_folder(root, conv)
        conversation_store.save(conv, folder)
        return gr.Dropdown(choices=conversation_store.saved_conversations(root), value=str(folder)), \
            f"Saved to `{folder}`"

    def open_saved(self, conv: Conversation, folder: str | None):
        if not folder:
            raise _error("Choose a saved conversation first.")
        if conv.busy:
            raise _error("An answer is still being written: press Stop first.")
        try:
            opened = conversation_store.load(folder, self.engine, self.tools, self.unsupported_reason)
        except ValueError as e:
            raise _error(str(e)) from None
        return opened, chat_messages(opened), opened.settings.system, f"Opened `{folder}`"

    def refresh_saved(self):
        return gr.Dropdown(choices=conversation_store.saved_conversations(self.info.conversations_root))

    # -- the API for scripts ----------------------------------------------------------------

    def chat(self, message: str) -> str:
        """Answer one message in a fresh conversation with the default settings; returns the answer text."""
        if not isinstance(message, str) or not message.strip():
            raise _error("the message is empty")
        try:
            return self.new_conversation().reply(message)
        except RuntimeError as e:  # the reason reaches the client, not Gradio's generic "error"
            raise _error(str(e)) from None
