"""The Gradio page: chat, image (upload + webcam) and voice (push-to-talk) in one conversation.

    demo = build_page(Handlers(engine, tools, PageInfo(model_name="phi-4-multimodal-instruct-q4_k_m")))
    launch_page(demo, host="127.0.0.1", port=7860)

The layout (app/ui/layout.py) places the components, the handlers (app/ui/handlers.py) say what
each event does, and this module connects the two. Every event that runs the model shares one
concurrency group of size one, so many tabs queue for the one engine and never interleave in
its KV cache. A question is added to the conversation at once (not queued) and answered by a
second, queued event, so the page shows the question before its turn comes.
"""
from __future__ import annotations

import os
from functools import partial
from pathlib import Path

# Gradio would otherwise phone home (version check, telemetry) when it is imported.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from app.ui.handlers import UPLOAD_EXAMPLE, WEBCAM_EXAMPLE, Handlers  # noqa: E402
from app.ui.layout import build_layout  # noqa: E402

HERE = Path(__file__).parent
MODEL_EVENTS = "model"  # the concurrency group of everything that runs the engine


def build_page(handlers: Handlers) -> gr.Blocks:
    """The Blocks of the app. Launch with `launch_page` (it adds the queue, the JS and the CSS)."""
    h = handlers
    with gr.Blocks(title="Phi-4-multimodal (local)", analytics_enabled=False, fill_width=True) as demo:
        ui = build_layout(h)
        run_model = dict(concurrency_id=MODEL_EVENTS, concurrency_limit=1, api_visibility="private")
        quick = dict(queue=False, api_visibility="private")

        def answered_by_model(event) -> None:
            """The answer to a question just added, then its spoken reply."""
            event.success(h.answer, [ui.conversation, *ui.settings], ui.chatbot, **run_model).then(
                h.spoken_reply, [ui.conversation, ui.speak], ui.reply_audio, api_visibility="private")

        answered_by_model(ui.textbox.submit(
            h.submit, [ui.conversation, ui.textbox, ui.webcam, ui.webcam_crops, ui.upload_crops],
            [ui.chatbot, ui.textbox, ui.webcam, ui.attach_info], **quick))
        voice_actions = [(ui.voice.stop_recording, "ask"), (ui.ask_voice.click, "ask"),
                         (ui.transcribe.click, "transcribe"), (ui.translate.click, "translate"),
                         (ui.summarize.click, "summarize")]
        for trigger, action in voice_actions:
            answered_by_model(trigger(partial(h.submit_voice, action), [ui.conversation, ui.voice, ui.language],
                                      [ui.chatbot, ui.voice], **quick))
        ui.regen_button.click(h.regenerate, ui.conversation, ui.chatbot, **quick).success(
            h.answer, [ui.conversation, *ui.settings], ui.chatbot, **run_model)

        ui.textbox.stop(h.stop, ui.conversation, None, **quick)
        ui.stop_button.click(h.stop, ui.conversation, None, **quick)
        ui.clear_button.click(h.new_chat, [ui.conversation, ui.system],
                              [ui.conversation, ui.chatbot, ui.reply_audio, ui.attach_info], **quick)

        pending = [ui.textbox, ui.upload_crops, ui.webcam, ui.webcam_crops]
        ui.textbox.change(h.attachments_note, pending, ui.attach_info, **quick)
        ui.webcam.change(h.attachments_note, pending, ui.attach_info, **quick)
        ui.webcam_crops.change(lambda c: h.detail_note(c, WEBCAM_EXAMPLE), ui.webcam_crops, ui.webcam_note, **quick)
        ui.upload_crops.change(lambda c: h.detail_note(c, UPLOAD_EXAMPLE), ui.upload_crops, ui.upload_note, **quick)

        ui.save_button.click(h.save, ui.conversation, [ui.saved, ui.saved_status], **quick)
        ui.open_button.click(h.open_saved, [ui.conversation, ui.saved],
                             [ui.conversation, ui.chatbot, ui.system, ui.saved_status], **quick)
        demo.load(h.refresh_saved, None, ui.saved, **quick)

        gr.api(h.chat, api_name="chat", concurrency_id=MODEL_EVENTS, concurrency_limit=1)
    return demo


def launch_page(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
                auth: tuple[str, str] | None = None, allowed_paths: list[str] | None = None,
                block: bool = True, quiet: bool = False) -> str:
    """Queue (one generation at a time across all tabs), launch, and return the local URL."""
    demo.queue(default_concurrency_limit=1)
    _, url, _ = demo.launch(server_name=host, server_port=port, share=share, auth=auth, prevent_thread_lock=True,
                            allowed_paths=allowed_paths, quiet=quiet, js=(HERE / "push_to_talk.js").read_text(),
                            css=(HERE / "style.css").read_text(), footer_links=["api", "settings"])
    if block:
        demo.block_thread()
    return url
