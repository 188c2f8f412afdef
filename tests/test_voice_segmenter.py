"""The VAD utterance segmenter on real (synthesised) speech, with no audio device.

espeak-ng speaks a few phrases once per session; each test places them at known times in
white noise, so the truth is where we put the speech. The speech extent inside a clip is
measured on the clean clip: 10 ms frames louder than the noise we are about to add (what
is quieter is inaudible in the mix, so no detector could be asked to find it).
"""
from __future__ import annotations

import shutil
import subprocess
import wave
from functools import partial

import numpy as np
import pytest

from app.voice import MicrophoneCapture, UtteranceSegmenter, segment_clip, stream_utterances
from tests.fakes import FakeInputStream
from model.audio_io import resample, to_mono

SR = 16_000
SNR_DB = 15.0  # white noise this far below the speech's RMS: a fan, a quiet street
TOLERANCE_S = 0.1  # detected speech edges vs. truth
MARGIN_S = 0.15  # an utterance's audio reaches at least this far beyond the speech

PHRASES = {
    "weather": "Hello there, what is the weather like today?",
    "timer": "Please set a timer for five minutes.",
    "stop": "Stop.",
    "joke": "Tell me a joke about computers and cats.",
    "turn": "Turn on",
    "lights": "the kitchen lights.",
}


@pytest.fixture(scope="session")
def speech(tmp_path_factory) -> dict[str, np.ndarray]:
    """16 kHz float32 clips of each phrase, made by espeak-ng."""
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is not installed; the voice tests synthesise speech with it "
                    "(Debian/Ubuntu: apt-get install espeak-ng)")
    folder = tmp_path_factory.mktemp("speech")
    clips = {}
    for name, text in PHRASES.items():
        path = folder / f"{name}.wav"
        subprocess.run(["espeak-ng", "-w", str(path), text], check=True, capture_output=True)
        with wave.open(str(path)) as w:
            pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
            clips[name] = resample(to_mono(pcm), w.getframerate(), SR)
    return clips


def speech_extent(clip: np.ndarray, rate: int, noise_rms: float) -> tuple[float, float]:
    """(first, last) second where the clean clip is louder than the noise, 10 ms frames."""
    hop = rate // 100
    n = clip.size // hop
    rms = np.sqrt(np.mean(clip[: n * hop].reshape(n, hop) ** 2, axis=1))
    loud = np.flatnonzero(rms > max(noise_rms, rms.max() * 1e-2))
    return loud[0] * hop / rate, (loud[-1] + 1) * hop / rate


def noise_rms_for(clips: list[np.ndarray], snr_db: float) -> float:
    return float(np.sqrt(np.mean(np.concatenate(clips) ** 2))) * 10 ** (-snr_db / 20)


def scene(clips: list[np.ndarray], gaps_s: list[float], *, rate: int = SR, tail_s: float = 1.0,
          snr_db: float | None = SNR_DB, seed: int = 0) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """gap, clip, gap, clip, ..., tail at `rate`, plus white noise; and each clip's true extent."""
    clips = [resample(c, SR, rate) for c in clips]  # 8 kHz really loses the top of an "s"
    noise_rms = 0.0 if snr_db is None else noise_rms_for(clips, snr_db)
    parts, truth, t = [], [], 0.0
    for gap, clip in zip(gaps_s, clips):
        parts += [np.zeros(round(gap * rate), np.float32), clip]
        first, last = speech_extent(clip, rate, noise_rms)
        truth.append((t + gap + first, t + gap + last))
        t += gap + clip.size / rate
    x = np.concatenate(parts + [np.zeros(round(tail_s * rate), np.float32)])
    # White up to 8 kHz: what the segmenter hears at 16 kHz has the intended SNR at any rate.
    white_rate = min(rate, SR)
    noise = np.random.default_rng(seed).normal(0.0, noise_rms, round(x.size * white_rate / rate) + 64)
    x += resample(noise.astype(np.float32), white_rate, rate)[: x.size]
    return x, truth


def feed_in_blocks(seg: UtteranceSegmenter, x: np.ndarray, *, seed: int = 1, most: int = 4096) -> list:
    """Feed like a sound card with an erratic block size; then end the stream."""
    rng = np.random.default_rng(seed)
    out, pos = [], 0
    while pos < len(x):
        size = int(rng.integers(1, most))
        out += seg.feed(x[pos: pos + size])
        pos += size
    return out + seg.flush()


def assert_matches(utterances, truth) -> None:
    assert len(utterances) == len(truth), [(u.speech_start_s, u.speech_end_s) for u in utterances]
    for u, (first, last) in zip(utterances, truth):
        assert abs(u.speech_start_s - first) <= TOLERANCE_S, (u.speech_start_s, first)
        assert abs(u.speech_end_s - last) <= TOLERANCE_S, (u.speech_end_s, last)
        # Never a word lost at the edges: the audio handed on holds the speech plus margins.
        assert u.start_s <= first - MARGIN_S and u.end_s >= last + MARGIN_S, (u, first, last)
        assert u.samples.dtype == np.float32
        assert u.samples.size == round((u.end_s - u.start_s) * SR)


@pytest.mark.parametrize(
    ("rate", "channels", "frame_ms"),
    [(16_000, 1, 30), (8_000, 1, 20), (44_100, 2, 30), (48_000, 1, 10), (48_000, 2, 30)],
)
def test_finds_each_utterance_within_100ms(speech, rate, channels, frame_ms):
    names = ["weather", "timer", "stop", "joke"]
    x, truth = scene([speech[n] for n in names], [0.8, 1.5, 1.2, 1.4], rate=rate)
    if channels == 2:  # a stereo mic whose right side is quieter; the mono mix is what counts
        x = np.stack([x, 0.5 * x], axis=1)
        # (the noise scales with the speech, so the SNR and truth are unchanged)
    seg = UtteranceSegmenter(rate, frame_ms=frame_ms)
    assert_matches(feed_in_blocks(seg, x, most=rate // 4), truth)


def test_audio_is_the_stream_itself_and_int16_works(speech):
    """At 16 kHz nothing is resampled: an utterance is exactly the stream's samples."""
    x, truth = scene([speech["timer"], speech["joke"]], [0.6, 1.3])
    pcm = (x * 32767).astype(np.int16)
    utterances = feed_in_blocks(UtteranceSegmenter(SR), pcm)
    assert_matches(utterances, truth)
    for u in utterances:
        start = round(u.start_s * SR)
        np.testing.assert_allclose(u.samples, pcm[start: start + u.samples.size] / 32768, atol=1e-6)


def test_block_size_does_not_change_the_result(speech):
    x, _ = scene([speech["weather"], speech["stop"]], [0.5, 1.2], rate=44_100)
    one_block = UtteranceSegmenter(44_100)
    whole = one_block.feed(x) + one_block.flush()
    tiny = feed_in_blocks(UtteranceSegmenter(44_100), x, seed=7, most=300)
    assert len(whole) == len(tiny) == 2
    for a, b in zip(whole, tiny):
        assert (a.start_s, a.end_s, a.speech_start_s, a.speech_end_s) == (b.start_s, b.end_s, b.speech_start_s, b.speech_end_s)
        np.testing.assert_allclose(a.samples, b.samples, atol=1e-6)


def test_segment_clip_handles_a_whole_recording(speech):
    """A file the user drops in: stereo int16 at 44.1 kHz, segmented in one call."""
    x, truth = scene([speech["stop"], speech["timer"]], [0.5, 1.2], rate=44_100)
    pcm = (np.stack([x, x], axis=1) * 32767).astype(np.int16)
    assert_matches(segment_clip(pcm, 44_100), truth)


def tight(clip: np.ndarray) -> np.ndarray:
    """The clip without espeak's own leading/trailing silence, so gaps are real pauses."""
    first, last = speech_extent(clip, SR, 0.0)
    return clip[round(first * SR): round(last * SR)]


def test_short_pause_does_not_cut_but_a_long_one_does(speech):
    words = [tight(speech["turn"]), tight(speech["lights"])]
    x, truth = scene(words, [0.7, 0.45])  # a breath between words
    (u,) = feed_in_blocks(UtteranceSegmenter(SR), x)
    assert abs(u.speech_start_s - truth[0][0]) <= TOLERANCE_S
    assert abs(u.speech_end_s - truth[1][1]) <= TOLERANCE_S

    x, truth = scene(words, [0.7, 1.2])  # done talking, then a new request
    assert_matches(feed_in_blocks(UtteranceSegmenter(SR), x), truth)


def test_max_utterance_splits_long_speech_without_losing_audio(speech):
    x, truth = scene([speech["weather"]], [0.5])
    pieces = feed_in_blocks(UtteranceSegmenter(SR, max_utterance_s=1.0), x)
    assert len(pieces) >= 2
    assert all(p.duration_s <= 1.0 + 1e-9 for p in pieces)
    for before, after in zip(pieces, pieces[1:]):
        assert after.start_s == pytest.approx(before.end_s)  # contiguous: no sample dropped
    first, last = truth[0]
    assert pieces[0].start_s <= first - MARGIN_S and pieces[-1].end_s >= last + MARGIN_S
    assert abs(pieces[-1].speech_end_s - last) <= TOLERANCE_S


def test_clicks_and_noise_alone_make_no_utterance(speech):
    rate = SR
    noise_rms = noise_rms_for([speech["timer"]], SNR_DB)
    x = np.random.default_rng(3).normal(0.0, noise_rms, 5 * rate).astype(np.float32)
    for t in (0.7, 1.9, 2.05, 3.4):  # 5 ms clicks, a door, a key, a cup
        i = round(t * rate)
        x[i: i + rate // 200] += 0.6 * np.sign(np.random.default_rng(round(t * 10)).normal(size=rate // 200))
    started = []
    seg = UtteranceSegmenter(rate, on_speech_start=started.append)
    assert feed_in_blocks(seg, x) == []
    assert started == []


def test_speech_started_fires_while_the_user_is_still_talking(speech):
    """Barge-in needs the event early, long before the utterance is complete."""
    x, truth = scene([speech["weather"], speech["timer"]], [0.8, 1.5])
    events = []
    seg = UtteranceSegmenter(SR, on_speech_start=lambda t: events.append((t, seg.time_s, seg.in_speech)))
    utterances = feed_in_blocks(seg, x, most=800)
    assert len(events) == len(utterances) == 2
    for (onset, heard, in_speech), (first, last) in zip(events, truth):
        assert in_speech
        assert abs(onset - first) <= TOLERANCE_S
        assert heard - first < 0.5 and heard < last


def test_mute_ignores_what_is_heard_meanwhile(speech):
    x, truth = scene([speech["timer"], speech["joke"]], [0.5, 1.5])
    started = []
    seg = UtteranceSegmenter(SR, on_speech_start=started.append)
    unmute_at = round((truth[0][1] + 0.5) * SR)  # the assistant's own reply ends
    seg.mute()
    assert seg.muted and seg.feed(x[:unmute_at]) == []
    seg.unmute()
    utterances = seg.feed(x[unmute_at:]) + seg.flush()
    assert_matches(utterances, truth[1:])
    assert len(started) == 1 and utterances[0].start_s >= unmute_at / SR


def test_mute_mid_speech_drops_the_open_utterance(speech):
    x, truth = scene([speech["weather"], speech["stop"]], [0.5, 1.5])
    seg = UtteranceSegmenter(SR)
    middle = round((truth[0][0] + 1.0) * SR)
    assert seg.feed(x[:middle]) == [] and seg.in_speech
    seg.mute()
    assert not seg.in_speech
    after_weather = round((truth[0][1] + 0.5) * SR)
    assert seg.feed(x[middle:after_weather]) == []
    seg.unmute()
    assert_matches(seg.feed(x[after_weather:]) + seg.flush(), truth[1:])


def test_push_to_talk_takes_everything_between_press_and_release(speech):
    # "stop" (key up), press, "weather", a long pause, "timer", release, "joke" (key up)
    x, truth = scene([speech[n] for n in ("stop", "weather", "timer", "joke")], [0.5, 1.5, 1.5, 1.5])
    press = round((truth[0][1] + 0.8) * SR)
    release = round((truth[2][1] + 0.6) * SR)
    seg = UtteranceSegmenter(SR, push_to_talk=True)
    assert seg.feed(x[:press]) == []
    seg.start()
    assert seg.key_down
    assert seg.feed(x[press:release]) == []  # a 1.5 s pause does not end it: only the key does
    (u,) = seg.stop()
    assert seg.feed(x[release:]) + seg.flush() == []
    assert abs(u.speech_start_s - truth[1][0]) <= TOLERANCE_S  # leading silence trimmed ...
    assert abs(u.speech_end_s - truth[2][1]) <= TOLERANCE_S  # ... and trailing
    assert press / SR <= u.start_s <= truth[1][0] - MARGIN_S  # but the pre-roll is kept
    assert truth[2][1] + MARGIN_S <= u.end_s <= release / SR


def test_push_to_talk_keeps_speech_begun_just_before_the_press(speech):
    x, truth = scene([speech["timer"]], [1.0])
    press = round((truth[0][0] + 0.15) * SR)  # the user talks first, presses a beat late
    seg = UtteranceSegmenter(SR, push_to_talk=True)
    seg.feed(x[:press])
    seg.start()
    seg.feed(x[press:])
    (u,) = seg.stop()
    assert u.start_s <= truth[0][0] and abs(u.speech_start_s - truth[0][0]) <= TOLERANCE_S


def test_push_to_talk_without_speech_gives_nothing(speech):
    x, _ = scene([speech["timer"]], [1.0])
    seg = UtteranceSegmenter(SR, push_to_talk=True)
    seg.start()
    seg.feed(x[: SR])  # key held over silence only
    assert seg.stop() == []
    assert seg.stop() == []  # a second release is harmless
    with pytest.raises(RuntimeError, match="push_to_talk"):
        UtteranceSegmenter(SR).start()


def test_flush_closes_speech_cut_off_by_the_end_of_the_stream(speech):
    x, truth = scene([speech["weather"]], [0.5], tail_s=0.0)
    cut = round((truth[0][0] + 1.2) * SR)
    seg = UtteranceSegmenter(SR)
    assert seg.feed(x[:cut]) == []
    (u,) = seg.flush()
    assert u.end_s == pytest.approx(cut / SR) and u.speech_end_s <= u.end_s
    assert seg.time_s == 0.0  # ready for a new stream


def test_clean_speech_without_noise(speech):
    x, truth = scene([speech["joke"], speech["stop"]], [0.4, 1.0], snr_db=None)
    assert_matches(feed_in_blocks(UtteranceSegmenter(SR), x), truth)


def test_live_path_fake_microphone_to_utterances(speech):
    """FakeInputStream -> MicrophoneCapture (PortAudio-style thread) -> segmenter."""
    rate = 48_000
    x, truth = scene([speech["weather"], speech["stop"]], [0.7, 1.2], rate=rate)
    stereo = np.stack([x, x], axis=1)
    capture = MicrophoneCapture(rate, channels=2, stream_factory=partial(FakeInputStream, stereo))
    with capture:
        utterances = list(stream_utterances(capture.blocks(), UtteranceSegmenter(capture.samplerate)))
    assert_matches(utterances, truth)


@pytest.mark.parametrize("bad", [dict(frame_ms=25), dict(aggressiveness=4), dict(post_roll_s=1.0)])
def test_rejects_settings_webrtcvad_cannot_do(bad):
    with pytest.raises(ValueError):
        UtteranceSegmenter(SR, **bad)
