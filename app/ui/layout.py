"""The page's components and where they sit; no behaviour (app/ui/handlers.py has that, and
app/ui/page.py connects the two)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from app.conversation import Settings
from app.conversation_store import saved_conversations
from app.engine_api import AUDIO, IMAGE
from app import speech_out
from app.ui.handlers import (
    MAX_CROPS_LIMIT,
    UPLOAD_EXAMPLE,
    UPLOAD_MAX_CROPS,
    WEBCAM_EXAMPLE,
    WEBCAM_MAX_CROPS,
    Handlers,
    tool_summary,
)

LANGUAGES = ["English", "French", "German", "Spanish", "Italian", "Portuguese", "Chinese", "Japanese"]


@dataclass
class Layout:
    """Every component an event reads or writes."""
    conversation: gr.State
    chatbot: gr.Chatbot
    textbox: gr.MultimodalTextbox
    attach_info: gr.Markdown
    stop_button: gr.Button
    regen_button: gr.Button
    clear_button: gr.Button
    voice: gr.Audio
    ask_voice: gr.Button
    transcribe: gr.Button
    translate: gr.Button
    summarize: gr.Button
    language: gr.Dropdown
    speak: gr.Checkbox
    reply_audio: gr.Audio
    webcam: gr.Image
    webcam_crops: gr.Slider
    webcam_note: gr.Markdown
    upload_crops: gr.Slider
    upload_note: gr.Markdown
    tools: gr.CheckboxGroup
    force_tool: gr.Checkbox
    max_tool_calls: gr.Slider
    system: gr.Textbox
    temperature: gr.Slider
    top_p: gr.Slider
    top_k: gr.Slider
    max_tokens: gr.Slider
    seed: gr.Number
    save_button: gr.Button
    saved: gr.Dropdown
    open_button: gr.Button
    saved_status: gr.Markdown

    @property
    def settings(self) -> list[Any]:
        """The components that make up Settings, in `settings_from`'s order."""
        return [self.system, self.temperature, self.top_p, self.top_k, self.max_tokens, self.seed, self.tools,
                self.force_tool, self.max_tool_calls]


def build_layout(handlers: Handlers) -> Layout:
    """Lay the page out inside the current gr.Blocks."""
    info, modalities = handlers.info, handlers.engine.modalities
    can_see, can_hear = IMAGE in modalities, AUDIO in modalities
    reason = handlers.unsupported_reason or "this model reads text only"
    defaults = Settings()

    conversation = gr.State(handlers.new_conversation())  # copied for each browser tab (same engine)
    gr.Markdown(f"## Phi-4-multimodal, on this computer\n<span class='model-line'>Model: **{info.model_name}** · "
                f"reads: {', '.join(['text'] + sorted(modalities))}"
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
                gr.Markdown(f"Hold the button or **Space** to talk; release to send. {handlers.recording_note()}"
                            if can_hear else f"Voice is unavailable: {reason}.",
                            elem_classes=[] if can_hear else ["unavailable"], elem_id="voice-note")
                voice = gr.Audio(sources=["microphone", "upload"], type="filepath", elem_id="voice",
                                 label="Spoken question (record or upload)", interactive=can_hear)
                gr.Button("Hold to talk", elem_id="ptt", interactive=can_hear)  # driven by push_to_talk.js
                with gr.Row():
                    ask_voice = gr.Button("Ask", elem_id="voice-ask", size="sm", interactive=can_hear)
                    transcribe = gr.Button("Transcribe", elem_id="voice-transcribe", size="sm", interactive=can_hear)
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
                    webcam_note = gr.Markdown(handlers.detail_note(WEBCAM_MAX_CROPS, WEBCAM_EXAMPLE),
                                              elem_id="webcam-note")
                    upload_crops = gr.Slider(1, MAX_CROPS_LIMIT, value=UPLOAD_MAX_CROPS, step=1,
                                             label="Uploaded image detail (max crops)", elem_id="upload-crops",
                                             interactive=can_see)
                    upload_note = gr.Markdown(handlers.detail_note(UPLOAD_MAX_CROPS, UPLOAD_EXAMPLE),
                                              elem_id="upload-note")
                with gr.Tab("Tools", elem_id="tab-tools"):
                    choices = [(f"{name} — {tool_summary(fn)}", name) for name, fn in handlers.tools.items()]
                    tools = gr.CheckboxGroup(choices, value=[], label="Tools the assistant may call", elem_id="tools")
                    force_tool = gr.Checkbox(False, label="Always start with a tool call (for small models)",
                                             elem_id="force-tool")
                    max_tool_calls = gr.Slider(1, 10, value=defaults.max_tool_calls, step=1,
                                               label="Most tool calls per question", elem_id="max-tool-calls")
                with gr.Tab("Settings", elem_id="tab-settings"):
                    system = gr.Textbox(defaults.system, label="System prompt", lines=3, elem_id="system")
                    temperature = gr.Slider(0, 2, value=defaults.temperature, step=0.05, label="Temperature "
                                            "(0 = always the most likely word)", elem_id="temperature")
                    top_p = gr.Slider(0.05, 1, value=defaults.top_p, step=0.05, label="Top-p", elem_id="top-p")
                    top_k = gr.Slider(0, 200, value=defaults.top_k, step=1, label="Top-k (0 = off)", elem_id="top-k")
                    max_tokens = gr.Slider(16, 4096, value=defaults.max_tokens, step=16,
                                           label="Max answer tokens", elem_id="max-tokens")
                    seed = gr.Number(-1, label="Seed (-1 = random)", precision=0, elem_id="seed")
                with gr.Tab("Conversations", elem_id="tab-saved"):
                    save_button = gr.Button("Save this conversation", elem_id="save", size="sm")
                    saved = gr.Dropdown(saved_conversations(info.conversations_root), label="Saved conversations",
                                        elem_id="saved", value=None)
                    open_button = gr.Button("Open", elem_id="open", size="sm")
                    saved_status = gr.Markdown("", elem_id="saved-status")

    return Layout(conversation, chatbot, textbox, attach_info, stop_button, regen_button, clear_button, voice,
                  ask_voice, transcribe, translate, summarize, language, speak, reply_audio, webcam, webcam_crops,
                  webcam_note, upload_crops, upload_note, tools, force_tool, max_tool_calls, system, temperature,
                  top_p, top_k, max_tokens, seed, save_button, saved, open_button, saved_status)
