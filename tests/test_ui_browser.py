"""The running app in a real headless Chromium (Debian's, driven by Playwright; nothing downloaded).

Two apps run in-process on free ports: SmolLM2-135M-Instruct (the text-only fallback, real
answers) and a tiny random Phi-4-multimodal converted here (images and audio go through the
real encoders, LoRAs and UI wiring; its words are noise). The browser gets a fake microphone
and camera. Screenshots land in test-artifacts/; with UPDATE_README_SCREENSHOT=1 the chat
screenshot also replaces docs/screenshot.png.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import unavailable

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--use-fake-ui-for-media-stream",
                 "--use-fake-device-for-media-stream"]
TIMEOUT_MS = 180_000  # a busy 2-core machine prefills the tools prompt slowly


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        unavailable("Debian's chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def start_app(model_path: Path, full: bool, tmp: Path, notice: str | None = None):
    from app.model_store import ModelChoice
    from app.ui.server import serve

    return serve(ModelChoice(model_path, full=full, notice=notice), port=0, n_ctx=4096, block=False,
                 notes_path=tmp / "notes.json", conversations_root=tmp / "conversations")


@pytest.fixture(scope="module")
def text_app(tmp_path_factory):
    from app.model_store import fallback_model_path

    app = start_app(fallback_model_path(), False, tmp_path_factory.mktemp("text-app"),
                    notice="Text-only mode on SmolLM2-135M-Instruct: the Hugging Face hub cannot be reached. "
                           "Get Phi-4-multimodal with: python launch.py --download")
    yield app
    app.close()


@pytest.fixture(scope="module")
def multimodal_app(tmp_path_factory):
    from convert.pipeline import convert_checkpoint
    from tests.tiny_checkpoint import TinyShapes, build_reference, save_native

    src, out = tmp_path_factory.mktemp("tiny-ckpt"), tmp_path_factory.mktemp("tiny-model")
    save_native(build_reference(TinyShapes(max_ctx=4096), seed=2), src)
    convert_checkpoint(src, out, "f32", quiet=True)
    app = start_app(out, True, tmp_path_factory.mktemp("mm-app"))
    assert app.engine.modalities == {"image", "audio"}
    yield app
    app.close()


class Page:
    """One browser tab on the app, recording any request that leaves the app's own address."""

    def __init__(self, browser, url: str):
        self.url = url
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000},
                                           permissions=["microphone", "camera"])
        self.context.set_default_timeout(TIMEOUT_MS)
        self.page = self.context.new_page()
        self.offsite: list[str] = []
        self.page.on("request", self._request)
        self.page.goto(url)
        self.page.wait_for_selector("#prompt textarea")

    def _request(self, request) -> None:
        if not request.url.startswith((self.url.rstrip("/"), "data:", "blob:")):
            self.offsite.append(request.url)

    def close(self) -> None:
        self.context.close()

    def send(self, text: str) -> None:
        box = self.page.locator("#prompt textarea")
        box.fill(text)
        box.press("Enter")

    def bot_messages(self):
        return self.page.locator("#chat [data-testid='bot']")

    def user_messages(self):
        return self.page.locator("#chat .user-row")  # one row per question: its text and media

    def wait_for_answers(self, n: int) -> str:
        """Wait until `n` answers carry their stats line; return the last answer's text."""
        stats = self.page.locator("#chat .turn-stats")
        try:
            stats.nth(n - 1).wait_for()
        except Exception:
            self.screenshot(f"failed-waiting-for-answer-{n}.png")
            raise AssertionError(f"no answer {n}; the chat shows:\n{self.page.locator('#chat').inner_text()}")
        return self.bot_messages().last.inner_text()

    def set_number(self, elem_id: str, value: int) -> None:
        field = self.page.locator(f"#{elem_id} input[type='number']")
        field.fill(str(value))
        field.press("Enter")

    def tab(self, name: str) -> None:
        self.page.get_by_role("tab", name=name).click()

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path), full_page=True)
        return path


@pytest.fixture
def text_page(browser, text_app):
    page = Page(browser, text_app.url)
    yield page
    assert page.offsite == [], f"the page reached out of the app: {page.offsite}"
    page.close()


@pytest.fixture
def mm_page(browser, multimodal_app):
    page = Page(browser, multimodal_app.url)
    page.tab("Settings")
    page.set_number("max-tokens", 16)  # the tiny random model rarely ends by itself
    yield page
    assert page.offsite == [], f"the page reached out of the app: {page.offsite}"
    page.close()


# -- text ------------------------------------------------------------------------------------

def opening_of_the_model_answer(app, question: str) -> str:
    """The first words of what the app's model answers `question` with the page's default
    settings, asked directly (a 135M model's words depend on the CPU; on one machine the same
    engine answers the same), without Markdown marks, as the page shows them."""
    from app.conversation import DEFAULT_SYSTEM_PROMPT, Settings
    from app.engine_api import Sampling

    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": question}]
    text = app.engine.generate(messages, Sampling(max_tokens=Settings().max_tokens)).text
    return " ".join(re.sub(r"[*_`#>|]", " ", text).split()[:4])


def shown(text: str) -> str:
    return " ".join(text.split())


def test_a_typed_message_gets_a_streamed_answer(text_page, text_app):
    text_page.send("What is the capital of France?")
    text_page.user_messages().first.wait_for()
    assert "capital of France" in text_page.user_messages().first.inner_text()
    seen, stats = [], text_page.page.locator("#chat .turn-stats")
    deadline = time.time() + TIMEOUT_MS / 1000
    while stats.count() == 0 and time.time() < deadline:
        if text_page.bot_messages().count():
            text = text_page.bot_messages().last.inner_text()
            if text and (not seen or seen[-1] != text):
                seen.append(text)
        time.sleep(0.05)
    answer = text_page.wait_for_answers(1)
    assert opening_of_the_model_answer(text_app, "What is the capital of France?") in shown(answer)
    assert len(seen) >= 2, f"the answer arrived in one piece, not streamed: {seen}"
    assert "no LoRA (text)" in answer and "prompt tokens" in answer and "TTFT" in answer
    text_page.screenshot("chat-text.png")


def test_a_text_only_model_explains_what_it_cannot_do(text_page):
    page = text_page.page
    assert "python launch.py --download" in page.locator("#banner").inner_text()
    assert "Voice is unavailable" in page.locator("#voice-panel").inner_text()
    assert page.locator("#voice-ask").is_disabled() and page.locator("#ptt").is_disabled()
    text_page.tab("Camera")
    assert "Images are unavailable" in page.locator("#tab-camera").inner_text()


def test_a_tool_switched_on_shows_its_call_as_a_step(text_page):
    page = text_page.page
    text_page.tab("Tools")
    page.locator("#tools label", has_text="convert_units").click()
    page.locator("#force-tool input").check()  # the 135M model does not call tools by itself
    text_page.set_number("max-tool-calls", 1)
    text_page.send("Convert 42 kilometres to miles.")
    step = page.locator("#chat [role='button']", has_text="Tool call: convert_units").first
    step.wait_for()
    text_page.wait_for_answers(1)
    chat = page.locator("#chat")
    arguments = chat.get_by_text("Arguments")
    if not arguments.is_visible():
        step.click()  # a finished step is folded; open it
    arguments.wait_for()
    assert '"value": 42' in chat.inner_text()  # the call's arguments, as JSON
    assert re.search(r"Result\s+42 km = [0-9.]+ \w+", chat.inner_text())  # the unit tool's own output
    page.wait_for_timeout(500)  # let the step finish unfolding before the picture
    path = text_page.screenshot("chat-tool.png")
    if os.environ.get("UPDATE_README_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copyfile(path, ROOT / "docs" / "screenshot.png")


def test_stop_keeps_the_partial_answer_and_regenerate_replaces_it(text_page):
    page = text_page.page
    text_page.send("Write a long story about a robot who learns to paint.")
    text_page.bot_messages().first.wait_for()
    page.wait_for_function("document.querySelector('#chat [data-testid=bot]')?.innerText.length > 20")
    page.locator("#stop").click()
    page.locator("#chat", has_text="(stopped)").wait_for()
    stopped = text_page.bot_messages().last.inner_text()
    text_page.tab("Settings")
    text_page.set_number("max-tokens", 32)
    page.locator("#regenerate").click()
    page.wait_for_function("!document.querySelector('#chat').innerText.includes('(stopped)')")
    text_page.wait_for_answers(1)
    assert text_page.user_messages().count() == 1  # the same question, answered again
    assert text_page.bot_messages().last.inner_text() != stopped


def test_a_conversation_is_saved_and_reopened(text_page, text_app):
    page = text_page.page
    text_page.send("What is the capital of France?")
    answer = text_page.wait_for_answers(1)
    text_page.tab("Conversations")
    page.locator("#save").click()
    page.locator("#saved-status", has_text="Saved to").wait_for()
    page.locator("#clear").click()
    page.wait_for_function("!document.querySelector('#chat').innerText.includes('capital of France')")
    page.locator("#saved input").click()
    page.get_by_role("option", name="What is the capital of France?").first.click()
    page.locator("#open").click()
    page.locator("#saved-status", has_text="Opened").wait_for()
    page.locator("#chat .turn-stats").first.wait_for()
    assert "capital of France" in text_page.user_messages().first.inner_text()
    opening = opening_of_the_model_answer(text_app, "What is the capital of France?")
    assert opening in shown(answer) and opening in shown(text_page.bot_messages().last.inner_text())


def test_answers_are_spoken_when_asked(text_page):
    if not shutil.which("espeak-ng"):
        unavailable("espeak-ng is not installed (apt-get install espeak-ng)")
    page = text_page.page
    assert page.locator("#reply-audio").is_hidden()
    page.locator("#speak input").check()
    text_page.send("How many legs does a dog have?")
    text_page.wait_for_answers(1)
    page.locator("#reply-audio").wait_for(state="visible")
    page.locator("#reply-audio audio, #reply-audio [data-testid='waveform-Audio']").first.wait_for(state="attached")


# -- images and audio (tiny Phi-4-multimodal) ---------------------------------------------------

@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[Path]:
    from PIL import Image

    folder = tmp_path_factory.mktemp("media")
    x = np.linspace(0, 255, 640, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(x, (480, 1))] * 3, axis=-1)).save(folder / "frame.png")
    Image.new("RGB", (300, 200), (20, 120, 200)).save(folder / "small.png")
    return [folder / "frame.png", folder / "small.png"]


@pytest.fixture(scope="module")
def spoken(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("media") / "question.wav"
    if shutil.which("espeak-ng"):
        subprocess.run(["espeak-ng", "-w", str(path), "What time is it in Tokyo?"], check=True)
    else:
        t = np.arange(16000 * 2) / 16000
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
            w.writeframes((np.sin(2 * np.pi * 220 * t) * 8000).astype(np.int16).tobytes())
    return path


def test_uploaded_images_are_answered_with_the_vision_lora(mm_page, pictures):
    page = mm_page.page
    page.locator("#prompt input[type='file']").set_input_files([str(p) for p in pictures])
    page.locator("#attach-info", has_text="in all").wait_for()
    note = page.locator("#attach-info").inner_text()
    assert "frame.png 640×480 → 1,065 tokens" in note  # detail 4 by default
    assert "small.png 300×200" in note
    mm_page.send("What is in these pictures?")
    answer = mm_page.wait_for_answers(1)
    assert "vision LoRA" in answer and "encoder" in answer
    assert mm_page.user_messages().last.locator("img").count() == 2  # thumbnails stay in the history
    mm_page.screenshot("chat-image.png")


def test_an_uploaded_audio_file_is_answered_with_the_speech_lora(mm_page, spoken):
    page = mm_page.page
    page.locator("#prompt input[type='file']").set_input_files(str(spoken))
    page.locator("#attach-info", has_text="tokens").wait_for()
    mm_page.send("")  # no text: the spoken question is the question
    page.locator("#prompt textarea").press("Enter")
    answer = mm_page.wait_for_answers(1)
    assert "speech LoRA" in answer
    assert "Answer the question in the audio" in mm_page.user_messages().last.inner_text()
    assert mm_page.user_messages().last.locator("audio, [data-testid='waveform-Audio']").count() >= 1


def test_push_to_talk_records_while_space_is_held_and_sends_on_release(mm_page):
    page = mm_page.page
    record, stop = page.locator("#voice button.record-button"), page.locator("#voice button.stop-button")
    record.wait_for()
    page.locator("#header").click()  # focus outside any text field
    page.keyboard.down("Space")
    stop.wait_for(state="visible")  # Gradio is recording (the fake microphone)
    assert page.evaluate("document.body.classList.contains('ptt-recording')")
    page.wait_for_timeout(1200)
    page.keyboard.up("Space")
    answer = mm_page.wait_for_answers(1)
    assert "speech LoRA" in answer
    assert "Answer the question in the audio" in mm_page.user_messages().last.inner_text()

    # The same with the button held down by the pointer.
    record.wait_for()
    box = page.locator("#ptt").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.down()
    stop.wait_for(state="visible")
    page.wait_for_timeout(800)
    page.mouse.up()
    mm_page.wait_for_answers(2)
    assert not page.evaluate("document.body.classList.contains('ptt-recording')")


def test_space_in_the_text_field_types_a_space(mm_page):
    box = mm_page.page.locator("#prompt textarea")
    box.click()
    box.type("two words")
    assert box.input_value() == "two words"
    assert mm_page.page.locator("#voice button.record-button").is_visible()  # no recording started


def test_a_webcam_frame_goes_with_the_next_message(mm_page):
    page = mm_page.page
    mm_page.tab("Camera")
    mm_page.set_number("webcam-crops", 4)
    page.locator("#webcam-note", has_text="1,065 tokens").wait_for()  # the detail's cost, shown as it changes
    mm_page.set_number("webcam-crops", 1)
    page.locator("#webcam-note", has_text="477 tokens").wait_for()
    page.locator("#webcam [title='grant webcam access'] button").click()
    page.wait_for_function("document.querySelector('#webcam video')?.readyState >= 2")  # frames are coming
    page.locator("#webcam button[aria-label='capture photo']").click()  # Chromium's fake camera
    page.locator("#attach-info", has_text="webcam frame").wait_for()
    mm_page.send("What do you see?")
    answer = mm_page.wait_for_answers(1)
    assert "vision LoRA" in answer
    assert mm_page.user_messages().last.locator("img").count() == 1
    assert page.locator("#attach-info").inner_text().strip() == ""


def test_a_voice_quick_action_transcribes_the_recording(mm_page, spoken):
    page = mm_page.page
    page.locator("#voice button[aria-label='Upload file']").click()
    page.locator("#voice input[type='file']").set_input_files(str(spoken))
    page.locator("#voice button.record-button").wait_for(state="hidden")  # it holds the file now
    page.locator("#voice-transcribe").click()
    answer = mm_page.wait_for_answers(1)
    assert "speech LoRA" in answer
    assert "Transcribe the audio clip into text." in mm_page.user_messages().last.inner_text()
    # Push-to-talk still works after an upload switched the panel to its upload source.
    page.locator("#header").click()
    page.keyboard.down("Space")
    page.locator("#voice button.stop-button").wait_for(state="visible")
    page.wait_for_timeout(800)
    page.keyboard.up("Space")
    assert "speech LoRA" in mm_page.wait_for_answers(2)
