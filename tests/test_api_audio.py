"""The Whisper routes (/v1/audio/transcriptions and /translations), driven by the official `openai`
client: the answer in each response format, 30 s windows as separate single-turn prompts with
Phi-4-multimodal's own instructions, and OpenAI errors for what cannot be heard. A scripted
engine answers the fast tests; the slow one runs a tiny converted Phi-4-multimodal (random
weights: its words mean nothing, so it checks the answer's shape and the speech LoRA)."""
from __future__ import annotations

import io
import threading
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.api.audio import TRANSCRIBE, WINDOW_SAMPLES
from tests.api_server import serving
from tests.conftest import require
from tests.fakes import ScriptedEngine

openai = require("openai", "the official client is the API's test client")

SR = 16_000


def tone(seconds: float, rate: int = SR, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    return np.repeat(x[:, None], channels, axis=1) if channels > 1 else x


def wav_bytes(samples: np.ndarray, rate: int = SR) -> bytes:
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(channels), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


def wav_file(tmp_path: Path, samples: np.ndarray, rate: int = SR, name: str = "clip.wav") -> Path:
    path = tmp_path / name
    path.write_bytes(wav_bytes(samples, rate))
    return path


def audio_parts(request: dict) -> tuple[np.ndarray, int, str]:
    """The audio, its rate and the instruction of one engine request (a single user turn)."""
    (message,) = request["messages"]
    assert message["role"] == "user"
    audio, text = message["content"]
    assert audio["type"] == "audio" and text["type"] == "text"
    samples, rate = audio["audio"]
    return samples, rate, text["text"]


def transcribe(url: str, path: Path, **options):
    with open(path, "rb") as f:
        return openai.OpenAI(base_url=url, api_key="x").audio.transcriptions.create(
            model=options.pop("model", "test-model"), file=f, **options)


# -- the formats --------------------------------------------------------------------------------

def test_json_is_the_text_of_a_short_clip_asked_with_the_model_cards_instruction(tmp_path):
    engine = ScriptedEngine(" Hello there. ")
    with serving(engine) as url:
        result = transcribe(url, wav_file(tmp_path, tone(2.5)))
    assert result.text == "Hello there."
    (request,) = engine.requests
    samples, rate, instruction = audio_parts(request)
    assert rate == SR and samples.shape == (int(2.5 * SR),)
    assert instruction == "Transcribe the audio clip into text." == TRANSCRIBE
    assert request["adapter"] == "auto" and request["temperature"] == 0.0  # the engine picks the speech LoRA


def test_a_70_s_clip_is_three_windows_of_at_most_30_s_timed_in_every_format(tmp_path):
    # 22.05 kHz stereo: the route mixes down and resamples to the model's 16 kHz before cutting
    path = wav_file(tmp_path, tone(70, 22_050, channels=2), 22_050)
    windows = [" one.", "two. ", "three."]
    engine = ScriptedEngine(*windows * 5)
    with serving(engine) as url:
        assert transcribe(url, path).text == "one. two. three."
        assert transcribe(url, path, response_format="text").strip() == "one. two. three."
        subtitles = transcribe(url, path, response_format="srt")
        webvtt = transcribe(url, path, response_format="vtt")
        verbose = transcribe(url, path, response_format="verbose_json", language="en", prompt="Counting.")

    assert len(engine.requests) == 15
    for request in engine.requests[:3]:
        samples, rate, _ = audio_parts(request)
        assert rate == SR and samples.ndim == 1 and len(samples) <= WINDOW_SAMPLES
    lengths = [len(audio_parts(r)[0]) for r in engine.requests[:3]]
    assert lengths[:2] == [30 * SR, 30 * SR] and abs(lengths[2] - 10 * SR) <= 2

    assert subtitles.strip().split("\n\n") == [
        "1\n00:00:00,000 --> 00:00:30,000\none.",
        "2\n00:00:30,000 --> 00:01:00,000\ntwo.",
        "3\n00:01:00,000 --> 00:01:10,000\nthree.",
    ]
    assert webvtt.startswith("WEBVTT\n\n")
    assert "00:00:30.000 --> 00:01:00.000\ntwo." in webvtt and "00:01:00.000 --> 00:01:10.000\nthree." in webvtt

    assert verbose.task == "transcribe" and verbose.language == "english" and verbose.duration == 70.0
    assert verbose.text == "one. two. three."
    assert [(s.id, s.start, s.end, s.text) for s in verbose.segments] == [
        (0, 0.0, 30.0, "one."), (1, 30.0, 60.0, "two."), (2, 60.0, 70.0, "three.")]
    # the caller's prompt follows the instruction, in every window
    assert {audio_parts(r)[2] for r in engine.requests[-3:]} == {"Transcribe the audio clip into text. Counting."}


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # this openai version marks them
def test_translations_ask_for_english(tmp_path):
    engine = ScriptedEngine("Good morning.", "Good morning.")
    with serving(engine) as url:
        client = openai.OpenAI(base_url=url, api_key="x")
        with open(wav_file(tmp_path, tone(3)), "rb") as f:
            assert client.audio.translations.create(model="whisper-1", file=f).text == "Good morning."
        with open(wav_file(tmp_path, tone(3)), "rb") as f:
            verbose = client.audio.translations.create(model="test-model", file=f, response_format="verbose_json",
                                                       prompt="A greeting.")
    assert [audio_parts(r)[2] for r in engine.requests] == [
        "Translate the audio to English.", "Translate the audio to English. A greeting."]
    assert verbose.task == "translate" and verbose.language == "english" and verbose.text == "Good morning."


def test_silence_and_a_clip_shorter_than_one_frame_still_answer(tmp_path):
    engine = ScriptedEngine("", "")
    with serving(engine) as url:
        assert transcribe(url, wav_file(tmp_path, np.zeros(SR, np.float32))).text == ""
        assert transcribe(url, wav_file(tmp_path, np.zeros(100, np.float32), name="tiny.wav"),
                          response_format="srt") == ""
    assert len(audio_parts(engine.requests[1])[0]) == 400  # padded to the feature extractor's one frame


# -- errors -------------------------------------------------------------------------------------

def test_what_cannot_be_heard_is_an_openai_error(tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not audio at all\n" * 20)
    empty_wav = wav_file(tmp_path, np.zeros(0, np.float32), name="empty.wav")
    clip = wav_file(tmp_path, tone(1))
    engine = ScriptedEngine()
    with serving(engine) as url:
        with pytest.raises(openai.BadRequestError) as e:
            transcribe(url, text_file)
        assert e.value.status_code == 400 and e.value.body["param"] == "file"
        assert "not a WAV file or any other audio format" in e.value.body["message"]

        with pytest.raises(openai.BadRequestError) as e:
            transcribe(url, empty_wav)
        assert "no audio samples" in e.value.body["message"]

        with pytest.raises(openai.NotFoundError) as e:
            transcribe(url, clip, model="whisper-large")
        assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"

        with pytest.raises(openai.BadRequestError) as e:
            transcribe(url, clip, response_format="xml")
        assert e.value.body["param"] == "response_format" and "verbose_json" in e.value.body["message"]

        with pytest.raises(openai.BadRequestError) as e:
            transcribe(url, clip, temperature=-1)
        assert e.value.body["param"] == "temperature"

        with pytest.raises(openai.BadRequestError) as e:
            transcribe(url, clip, response_format="verbose_json", timestamp_granularities=["word"])
        assert e.value.body["param"] == "timestamp_granularities"

        # no file at all (the client always sends one)
        answer = httpx.post(f"{url}/audio/transcriptions", data={"model": "test-model"})
        assert answer.status_code == 400 and answer.json()["error"]["param"] == "file"
    assert engine.requests == []


def test_a_model_that_cannot_hear_refuses_audio(tmp_path):
    engine = ScriptedEngine(modalities=("image",))
    with serving(engine) as url, pytest.raises(openai.BadRequestError) as e:
        transcribe(url, wav_file(tmp_path, tone(1)))
    assert e.value.body["code"] == "unsupported_modality"
    assert engine.requests == []


def test_a_full_queue_is_429_with_retry_after(tmp_path):
    generating, release = threading.Event(), threading.Event()

    def hold(reply: int, piece: int) -> None:  # the first request keeps the engine until released
        generating.set()
        release.wait(10)

    engine = ScriptedEngine("first", before_piece=hold)
    data = wav_bytes(tone(1))
    with serving(engine, max_waiting=0) as url:
        def post() -> httpx.Response:
            return httpx.post(f"{url}/audio/transcriptions", files={"file": ("a.wav", data)},
                              data={"model": "whisper-1"}, timeout=30)

        answers = []
        busy = threading.Thread(target=lambda: answers.append(post()))
        busy.start()
        assert generating.wait(10)
        refused = post()
        release.set()
        busy.join(10)
    assert refused.status_code == 429 and refused.headers["retry-after"] == "5"
    assert refused.json()["error"]["code"] == "queue_full"
    assert answers[0].status_code == 200 and answers[0].json()["text"] == "first"


# -- a real engine --------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_tiny_phi4_checkpoint_transcribes_under_the_speech_lora(tmp_path):
    from app.engine import LocalEngine
    from convert.pipeline import convert_checkpoint
    from tests.tiny_checkpoint import TinyShapes, build_reference, save_native

    save_native(build_reference(TinyShapes(max_ctx=4096), seed=3), tmp_path / "ckpt")
    convert_checkpoint(tmp_path / "ckpt", tmp_path / "model", "f32", quiet=True)
    engine = LocalEngine.load(tmp_path / "model", n_ctx=4096)
    adapters = []
    stream = engine.stream

    def recording_stream(*args, **kwargs):
        for chunk in stream(*args, **kwargs):
            if chunk.usage is not None:
                adapters.append(chunk.usage.adapter)
            yield chunk

    engine.stream = recording_stream
    try:
        with serving(engine, model_name="tiny") as url:
            result = transcribe(url, wav_file(tmp_path, tone(2.0)), model="tiny", response_format="verbose_json")
    finally:
        engine.close()
    assert isinstance(result.text, str) and result.duration == 2.0 and len(result.segments) == 1
    assert adapters == ["speech"]
