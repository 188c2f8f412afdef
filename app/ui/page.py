"""The Gradio page: chat, image (upload + webcam) and voice (push-to-talk) in one conversation.

    demo = build_page(assistant, PageInfo(model_name="phi-4-multimodal-instruct-q4_k_m"))
    launch_page(demo, host="127.0.0.1", port=7860)

Everything the model does goes through the Assistant (app.chat_session); this module only
wires components to it. Every event that runs the model shares one concurrency group of
size one, so many tabs queue for the one engine and never interleave in its KV cache.
A question is added to the conversation at once (not queued) and answered by a second,
queued event, so the page shows the question before its turn comes.
"""
from __future__ import annotations

import mimetypes
import os
import re
import tempfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

# Gradio would otherwise phone home (version check, telemetry) when it is imported.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from app.chat_session import (  # noqa: E402
    QUICK_ACTIONS,
    SPOKEN_QUESTION,
    UPLOAD_MAX_CROPS,
    WEBCAM_MAX_CROPS,
    Assistant,
    Attachment,
    AudioUnreadable,
    Busy,
    Conversation,
    Settings,
    Unsupported,
    conversations_dir,
    new_conversation_folder,
    read_audio,
    saved_conversations,
)
from app.prompt import AUDIO, IMAGE  # noqa: E402
from app.ui import speech_out  # noqa: E402
from app.ui.one_thread import run_in_thread  # noqa: E402
from app.ui.render import chat_messages  # noqa: E402

HERE = Path(__file__).parent
MODEL_EVENTS = "model"  # the concurrency group of everything that runs the engine
DESCRIBE_IMAGE = "Describe the image."
LANGUAGES = ["English", "French", "German", "Spanish", "Italian", "Portuguese", "Chinese", "Japanese"]
MAX_CROPS_LIMIT = 36  # the model's own default: the most detail it was trained with


@dataclass
class PageInfo:
    """What the page says about the model, and where conversations are saved."""
    model_name: str
    notice: str | None = None            # a banner: e.g. the text-only fallback and how to get the full model
    details: str = ""                    # threads, context size...
    conversations_root: Path = field(default_factory=conversations_dir)


# -- pure helpers (no events) ----------------------------------------------------------------

def attachment_for(path: str, max_crops: int) -> Attachment:
    """An uploaded file as an Attachment, by its type; Unsupported for anything but images and audio."""
    kind = (mimetypes.guess_type(path)[0] or "").split("/")[0]
    if kind not in (IMAGE, AUDIO):
        raise Unsupported(f"{Path(path).name}: only images and audio files can go with a question")
    return Attachment(kind, path, int(max_crops) if kind == IMAGE else None)


def image_tokens(width: int, height: int, max_crops: int) -> int:
    from model.image_crops import num_image_tokens

    return num_image_tokens(width, height, int(max_crops))


def detail_note(max_crops: int, example: tuple[int, int]) -> str:
    w, h = example
    return f"Detail {int(max_crops)}: a {w}×{h} image is **{image_tokens(w, h, max_crops):,} tokens** of prefill."


def attachments_note(files: list[str], upload_crops: int, webcam: str | None, webcam_crops: int) -> str:
    """What the pending attachments cost in prompt tokens (on a CPU the prefill is most of the wait)."""
    from PIL import Image

    from model.audio_features import num_audio_tokens
    from model.audio_io import MODEL_SAMPLE_RATE, to_model_audio

    items, total = [], 0
    for path, crops, label in [(f, upload_crops, Path(f).name) for f in files] + (
            [(webcam, webcam_crops, "webcam frame")] if webcam else []):
        kind = (mimetypes.guess_type(path)[0] or "").split("/")[0]
        try:
            if kind == IMAGE:
                with Image.open(path) as image:
                    n = image_tokens(*image.size, crops)
                items.append(f"🖼️ {label} {image.size[0]}×{image.size[1]} → {n:,} tokens")
            elif kind == AUDIO:
                samples = to_model_audio(*read_audio(path))
                n = num_audio_tokens(len(samples))
                items.append(f"🎤 {label} {len(samples) / MODEL_SAMPLE_RATE:.1f} s → {n:,} tokens")
            else:
                continue
        except (OSError, ValueError, AudioUnreadable):
            continue  # the question's own check reports unreadable files
        total += n
    if not items:
        return ""
    return " · ".join(items) + (f" · **{total:,} tokens in all**" if len(items) > 1 else "")


def settings_from(system: str, temperature: float, top_p: float, top_k: int, max_tokens: int,
                  seed: float | None, tools: list[str], force_tool: bool, max_tool_calls: int) -> Settings:
    return Settings(system=system or "", temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                    max_tokens=int(max_tokens), seed=None if seed in (None, "") or seed < 0 else int(seed),
                    tools=list(tools or []), force_tool=bool(force_tool), max_tool_calls=int(max_tool_calls))


def _read(name: str) -> str:
    return (HERE / name).read_text()


# -- the page -------------------------------------------------------------------------------

def build_page(assistant: Assistant, info: PageInfo) -> gr.Blocks:
    """The Blocks of the app. Launch with `launch_page` (it adds the queue, the JS and the CSS)."""
    can_see, can_hear = IMAGE in assistant.modalities, AUDIO in assistant.modalities
    reason = assistant.unsupported_reason or "this model reads text only"
    tool_choices = [(f"{name} — {_summary(fn)}", name) for name, fn in assistant.tools.items()]

    with gr.Blocks(title="Phi-4-multimodal (local)", analytics_enabled=False, fill_width=True) as demo:
        conversation = gr.State(Conversation())
        gr.Markdown(f"## Phi-4-multimodal, on this computer\n<span class='model-line'>Model: **{info.model_name}** · "
                    f"reads: {', '.join(['text'] + sorted(assistant.modalities))}"
                    f"{' · ' + info.details if info.details else ''}</span>", elem_id="header")
        gr.Markdown(f"⚠️ {info.notice}", elem_id="banner", visible=bool(info.notice))

        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(elem_id="chat", label="Conversation", height=560, buttons=["copy", "copy_all"],
                                     feedback_options=None, group_consecutive_messages=True,
                                     placeholder="Ask anything. Attach images or audio with the clip, "
                                                 "hold **Space** to talk, or use the webcam.")
                file_types = [kind for kind, ok in ((IMAGE, can_see), (AUDIO, can_hear)) if ok]
                textbox = gr.MultimodalTextbox(
                    elem_id="prompt", show_label=False, file_count="multiple", file_types=file_types or None,
                    sources=["upload"] if file_types else [], stop_btn=True, autofocus=True,
                    placeholder="Message" + (" (attach images / audio with the clip)" if file_types else ""))
                attach_info = gr.Markdown("", elem_id="attach-info")
                with gr.Row():
                    stop_button = gr.Button("Stop", elem_id="stop", size="sm", variant="stop")
                    regen_button = gr.Button("Regenerate", elem_id="regenerate", size="sm")
                    clear_button = gr.Button("New chat", elem_id="clear", size="sm")

            with gr.Column(scale=2):
                with gr.Accordion("Voice", open=True, elem_id="voice-panel"):
                    gr.Markdown("Hold the button or **Space** to talk; release to send."
                                if can_hear else f"Voice is unavailable: {reason}.",
                                elem_classes=[] if can_hear else ["unavailable"], elem_id="voice-note")
                    voice = gr.Audio(sources=["microphone", "upload"], type="filepath", elem_id="voice",
                                     label="Spoken question (record or upload)", interactive=can_hear)
                    ptt_button = gr.Button("Hold to talk", elem_id="ptt", interactive=can_hear)
                    with gr.Row():
                        ask_voice = gr.Button("Ask", elem_id="voice-ask", size="sm", interactive=can_hear)
                        transcribe = gr.Button("Transcribe", elem_id="voice-transcribe", size="sm",
                                               interactive=can_hear)
                        translate = gr.Button("Translate", elem_id="voice-translate", size="sm", interactive=can_hear)
                        summarize = gr.Button("Summarise", elem_id="voice-summarize", size="sm", interactive=can_hear)
                    language = gr.Dropdown(LANGUAGES, value="French", label="Translate to", elem_id="language",
                                           interactive=can_hear)
                    speak = gr.Checkbox(label="Speak answers (espeak-ng)" if speech_out.available()
                                        else "Speak answers: install espeak-ng to enable",
                                        value=False, interactive=speech_out.available(), elem_id="speak")
                    reply_audio = gr.Audio(label="Spoken answer", autoplay=True, interactive=False,
                                           elem_id="reply-audio", visible=False)

                with gr.Tabs():
                    with gr.Tab("Camera", elem_id="tab-camera"):
                        if not can_see:
                            gr.Markdown(f"Images are unavailable: {reason}.", elem_classes=["unavailable"])
                        webcam = gr.Image(sources=["webcam"], type="filepath", elem_id="webcam", interactive=can_see,
                                          label="Webcam frame (goes with your next message)", height=240)
                        webcam_crops = gr.Slider(1, 12, value=WEBCAM_MAX_CROPS, step=1, label="Webcam detail (max crops)",
                                                 elem_id="webcam-crops", interactive=can_see)
                        webcam_note = gr.Markdown(detail_note(WEBCAM_MAX_CROPS, (640, 480)), elem_id="webcam-note")
                        upload_crops = gr.Slider(1, MAX_CROPS_LIMIT, value=UPLOAD_MAX_CROPS, step=1,
                                                 label="Uploaded image detail (max crops)", elem_id="upload-crops",
                                                 interactive=can_see)
                        upload_note = gr.Markdown(detail_note(UPLOAD_MAX_CROPS, (1920, 1080)), elem_id="upload-note")
                    with gr.Tab("Tools", elem_id="tab-tools"):
                        tools = gr.CheckboxGroup(tool_choices, value=[], label="Tools the assistant may call",
                                                 elem_id="tools")
                        force_tool = gr.Checkbox(False, label="Always start with a tool call (for small models)",
                                                 elem_id="force-tool")
                        max_tool_calls = gr.Slider(1, 10, value=Settings().max_tool_calls, step=1,
                                                   label="Most tool calls per question", elem_id="max-tool-calls")
                    with gr.Tab("Settings", elem_id="tab-settings"):
                        system = gr.Textbox(Settings().system, label="System prompt", lines=3, elem_id="system")
                        temperature = gr.Slider(0, 2, value=Settings().temperature, step=0.05, label="Temperature "
                                                "(0 = always the most likely word)", elem_id="temperature")
                        top_p = gr.Slider(0.05, 1, value=Settings().top_p, step=0.05, label="Top-p", elem_id="top-p")
                        top_k = gr.Slider(0, 200, value=Settings().top_k, step=1, label="Top-k (0 = off)",
                                          elem_id="top-k")
                        max_tokens = gr.Slider(16, 4096, value=Settings().max_tokens, step=16,
                                               label="Max answer tokens", elem_id="max-tokens")
                        seed = gr.Number(-1, label="Seed (-1 = random)", precision=0, elem_id="seed")
                    with gr.Tab("Conversations", elem_id="tab-saved"):
                        save_button = gr.Button("Save this conversation", elem_id="save", size="sm")
                        saved = gr.Dropdown(saved_conversations(info.conversations_root), label="Saved conversations",
                                            elem_id="saved", value=None)
                        open_button = gr.Button("Open", elem_id="open", size="sm")
                        saved_status = gr.Markdown("", elem_id="saved-status")

        settings = [system, temperature, top_p, top_k, max_tokens, seed, tools, force_tool, max_tool_calls]

        # -- handlers -------------------------------------------------------------------
        def submit(conv: Conversation, message: dict | None, webcam_path: str | None, webcam_detail: float,
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
                assistant.add(conv, text, attachments)
            except (Unsupported, Busy) as e:
                raise gr.Error(str(e), print_exception=False) from None
            return chat_messages(conv), None, None, ""

        def submit_voice(action: str, conv: Conversation, audio_path: str | None, target_language: str):
            if not audio_path:
                raise gr.Error("Record or upload a spoken question first.", print_exception=False)
            text = SPOKEN_QUESTION if action == "ask" else QUICK_ACTIONS[action].format(language=target_language)
            try:
                assistant.add(conv, text, [Attachment(AUDIO, conv.keep(audio_path))])
            except (Unsupported, Busy) as e:
                raise gr.Error(str(e), print_exception=False) from None
            return chat_messages(conv), None

        def answer(conv: Conversation, *values: Any):
            if not conv.busy:  # nothing was asked (an empty message)
                yield gr.skip()
                return
            for _ in run_in_thread(lambda: assistant.answer(conv, settings_from(*values))):
                yield chat_messages(conv)

        def stop(conv: Conversation) -> None:
            if conv.busy:
                conv.stop_requested = True

        def regenerate(conv: Conversation):
            try:
                if assistant.retry(conv) is None:
                    raise gr.Error("Nothing to regenerate yet.", print_exception=False)
            except Busy as e:
                raise gr.Error(str(e), print_exception=False) from None
            return chat_messages(conv)

        def new_chat(conv: Conversation, system_prompt: str):
            if conv.busy:
                raise gr.Error("An answer is still being written: press Stop first.", print_exception=False)
            return Conversation(system=system_prompt), [], None, ""

        def spoken_reply(conv: Conversation, enabled: bool):
            if not enabled or not conv.turns or not conv.turns[-1].answer:
                return gr.skip()
            path = Path(tempfile.mkdtemp(prefix="phi4mm-tts-")) / "answer.wav"
            try:
                return gr.Audio(str(speech_out.speak_to_file(conv.turns[-1].answer, path)), visible=True)
            except RuntimeError as e:
                gr.Warning(str(e))
                return gr.skip()

        def save(conv: Conversation):
            if not conv.turns:
                raise gr.Error("Nothing to save yet.", print_exception=False)
            if conv.busy:
                raise gr.Error("Wait for the answer to finish, then save.", print_exception=False)
            folder = Path(conv.saved_to) if conv.saved_to else new_conversation_folder(info.conversations_root, conv)
            conv.save(folder)
            return (gr.Dropdown(choices=saved_conversations(info.conversations_root), value=str(folder)),
                    f"Saved to `{folder}`")

        def open_saved(conv: Conversation, folder: str | None):
            if not folder:
                raise gr.Error("Choose a saved conversation first.", print_exception=False)
            if conv.busy:
                raise gr.Error("An answer is still being written: press Stop first.", print_exception=False)
            opened = Conversation.load(folder)
            return opened, chat_messages(opened), opened.system, f"Opened `{folder}`"

        def refresh_saved():
            return gr.Dropdown(choices=saved_conversations(info.conversations_root))

        def chat(message: str) -> str:
            """Answer one message in a fresh conversation with the default settings; returns the answer text."""
            return assistant.reply(message)

        # -- wiring ---------------------------------------------------------------------
        run_model = dict(concurrency_id=MODEL_EVENTS, concurrency_limit=1, api_visibility="private")
        quick = dict(queue=False, api_visibility="private")

        sent = textbox.submit(submit, [conversation, textbox, webcam, webcam_crops, upload_crops],
                              [chatbot, textbox, webcam, attach_info], **quick)
        answered = sent.success(answer, [conversation, *settings], chatbot, **run_model)
        answered.then(spoken_reply, [conversation, speak], reply_audio, api_visibility="private")
        textbox.stop(stop, conversation, None, **quick)
        stop_button.click(stop, conversation, None, **quick)

        voice_actions = [(voice.stop_recording, "ask"), (ask_voice.click, "ask"), (transcribe.click, "transcribe"),
                         (translate.click, "translate"), (summarize.click, "summarize")]
        for trigger, action in voice_actions:
            asked = trigger(partial(submit_voice, action), [conversation, voice, language], [chatbot, voice], **quick)
            asked.success(answer, [conversation, *settings], chatbot, **run_model).then(
                spoken_reply, [conversation, speak], reply_audio, api_visibility="private")

        regen_button.click(regenerate, conversation, chatbot, **quick).success(
            answer, [conversation, *settings], chatbot, **run_model)
        clear_button.click(new_chat, [conversation, system], [conversation, chatbot, reply_audio, attach_info], **quick)

        textbox.change(lambda m, uc, w, wc: attachments_note((m or {}).get("files") or [], uc, w, wc),
                       [textbox, upload_crops, webcam, webcam_crops], attach_info, **quick)
        webcam.change(lambda m, uc, w, wc: attachments_note((m or {}).get("files") or [], uc, w, wc),
                      [textbox, upload_crops, webcam, webcam_crops], attach_info, **quick)
        webcam_crops.change(lambda c: detail_note(c, (640, 480)), webcam_crops, webcam_note, **quick)
        upload_crops.change(lambda c: detail_note(c, (1920, 1080)), upload_crops, upload_note, **quick)

        save_button.click(save, conversation, [saved, saved_status], **quick)
        open_button.click(open_saved, [conversation, saved], [conversation, chatbot, system, saved_status], **quick)
        demo.load(refresh_saved, None, saved, **quick)

        gr.api(chat, api_name="chat", concurrency_id=MODEL_EVENTS, concurrency_limit=1)
    return demo


def _summary(fn: Any) -> str:
    """The first sentence of a tool's description, as the model sees it."""
    from app.agents import tool_from_function

    description = tool_from_function(fn).description
    match = re.match(r"(.*?[.!?])\s+(?=[A-Z])", description)
    return (match.group(1) if match else description).rstrip(".")


def launch_page(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
                auth: tuple[str, str] | None = None, allowed_paths: list[str] | None = None,
                block: bool = True, quiet: bool = False) -> str:
    """Queue (one generation at a time across all tabs), launch, and return the local URL."""
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(server_name=host, server_port=port, share=share, auth=auth, prevent_thread_lock=True,
                            allowed_paths=allowed_paths, quiet=quiet, js=_read("push_to_talk.js"),
                            css=_read("style.css"), footer_links=["api", "settings"])
    if block:
        demo.block_thread()
    return url
