"""Microphone capture without a microphone: the fake stream, the queue, the clean errors,
and, where PortAudio (libportaudio2) is installed, the real device path as far as a machine
without a sound card allows."""
from __future__ import annotations

import builtins
import sys
import threading
import time
import types
from functools import partial

import numpy as np
import pytest

from app.voice import (
    InputDevice,
    MicrophoneCapture,
    MicrophoneUnavailable,
    find_input_device,
    list_input_devices,
    open_microphone,
)
from tests.conftest import unavailable
from tests.fakes import FakeCallbackFlags, FakeInputStream


def ramp(n: int, channels: int = 1) -> np.ndarray:
    """Distinct values, so lost, doubled or reordered samples show."""
    x = (np.arange(n * channels, dtype=np.float32) / (n * channels)).reshape(n, channels)
    return x[:, 0] if channels == 1 else x


def test_fake_stream_calls_back_like_portaudio():
    x = ramp(1000, channels=2)
    calls, done = [], threading.Event()

    def callback(indata, frames, time_info, status):
        calls.append((indata.copy(), frames, time_info.inputBufferAdcTime, bool(status),
                      threading.current_thread() is threading.main_thread()))

    stream = FakeInputStream(x, 48_000, 256, callback, channels=2, finished_callback=done.set)
    stream.start()
    assert done.wait(5)
    stream.close()
    assert stream.closed and not stream.active
    assert [c[1] for c in calls] == [256] * 4  # always whole blocks, as PortAudio delivers
    assert all(block.shape == (256, 2) and not flagged and not on_main for block, _, _, flagged, on_main in calls)
    assert [c[2] for c in calls] == pytest.approx([k * 256 / 48_000 for k in range(4)])
    audio = np.concatenate([c[0] for c in calls])
    np.testing.assert_array_equal(audio[:1000], x)
    assert not audio[1000:].any()  # the last block is zero-padded


def test_fake_stream_delivers_int16_and_checks_channels():
    got = []
    stream = FakeInputStream(np.array([0.0, 0.5, -0.5, 1.0]), 16_000, 4, lambda d, *_: got.append(d.copy()),
                             dtype="int16")
    stream.start()
    stream.stop()
    assert got[0].dtype == np.int16 and got[0][:, 0].tolist() == [0, 16383, -16383, 32767]
    with pytest.raises(ValueError, match="channel"):
        FakeInputStream(ramp(10, 2), 16_000, 4, channels=1)


def test_fake_stream_can_pace_like_a_real_device():
    started = time.monotonic()
    with FakeInputStream(ramp(1600), 16_000, 160, lambda *_: None, realtime=True) as stream:
        while stream.active:
            time.sleep(0.005)
    assert time.monotonic() - started >= 0.08  # 0.1 s of audio, the first block at once


def test_capture_queues_every_block_in_order():
    rate = 44_100
    x = ramp(rate // 2, channels=2)
    capture = MicrophoneCapture(rate, channels=2, block_ms=10, stream_factory=partial(FakeInputStream, x))
    assert capture.blocksize == 441
    with capture:
        blocks = list(capture.blocks())
    assert all(b.shape == (441, 2) and b.dtype == np.float32 for b in blocks)
    audio = np.concatenate(blocks)
    np.testing.assert_array_equal(audio[: len(x)], x)
    assert capture.dropped == 0 and capture.overflows == 0
    assert capture.read(timeout=0.01) is None  # nothing after the end


def test_slow_consumer_loses_the_oldest_audio_not_all_memory():
    x = ramp(16_000)  # 100 blocks of 10 ms into a queue of 10
    streams = []

    def factory(**options):
        streams.append(FakeInputStream(x, **options))
        return streams[-1]

    capture = MicrophoneCapture(16_000, block_ms=10, max_queued_s=0.1, stream_factory=factory)
    capture.start()
    while streams[0].active:  # the consumer is "busy": read nothing until the end
        time.sleep(0.005)
    blocks = list(capture.blocks())
    capture.stop()
    assert 0 < len(blocks) < 10 and capture.dropped == 100 - len(blocks)
    np.testing.assert_array_equal(blocks[-1][:, 0], x[-160:])  # the newest audio survived


class _OverflowingStream:
    """Calls back once with PortAudio's "input overflow" flag, then finishes."""

    def __init__(self, callback, finished_callback, **_options):
        self.callback, self.finished = callback, finished_callback

    def start(self):
        self.callback(np.zeros((4, 1), np.float32), 4, None, FakeCallbackFlags(input_overflow=True))
        self.finished()

    def stop(self):
        pass

    def close(self):
        pass


def test_input_overflows_are_counted():
    with MicrophoneCapture(16_000, stream_factory=_OverflowingStream) as capture:
        assert len(list(capture.blocks())) == 1
    assert capture.overflows == 1


def test_a_stream_that_will_not_open_is_one_clean_line():
    def refuse(**_options):
        raise ValueError("Invalid number of channels\n[PaErrorCode -9998]")

    with pytest.raises(MicrophoneUnavailable) as err:
        MicrophoneCapture(48_000, device=3, stream_factory=refuse).start()
    assert "input device 3" in str(err.value) and "48000 Hz" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_portaudio_is_reported_clearly(monkeypatch):
    real_import = builtins.__import__

    def no_portaudio(name, *args, **kwargs):
        if name == "sounddevice":
            raise OSError("PortAudio library not found")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_portaudio)
    for attempt in (list_input_devices, open_microphone, lambda: MicrophoneCapture(16_000).start()):
        with pytest.raises(MicrophoneUnavailable, match="libportaudio2"):
            attempt()


def test_missing_sounddevice_package_is_reported_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import -> ImportError
    with pytest.raises(MicrophoneUnavailable, match="pip install sounddevice"):
        list_input_devices()


# -- device choice, against a stand-in sounddevice module with two microphones -----------

class _PortAudioError(Exception):
    pass


def _fake_sounddevice(default_input: int) -> types.SimpleNamespace:
    devices = [
        dict(index=0, name="HDA Intel PCH: ALC3246 Analog", hostapi=0, max_input_channels=2,
             max_output_channels=2, default_samplerate=44_100.0),
        dict(index=1, name="HDMI 0", hostapi=0, max_input_channels=0, max_output_channels=8,
             default_samplerate=48_000.0),
        dict(index=2, name="USB Headset Mono", hostapi=0, max_input_channels=1,
             max_output_channels=2, default_samplerate=48_000.0),
    ]

    def check_input_settings(device, channels, dtype, samplerate):
        if channels > devices[device]["max_input_channels"]:
            raise _PortAudioError("Invalid number of channels")

    return types.SimpleNamespace(
        query_devices=lambda: devices, query_hostapis=lambda: [dict(name="ALSA")],
        default=types.SimpleNamespace(device=[default_input, -1]), PortAudioError=_PortAudioError,
        check_input_settings=check_input_settings, InputStream=None,
    )


def test_devices_are_listed_and_chosen(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", _fake_sounddevice(default_input=2))
    assert [d.index for d in list_input_devices()] == [0, 2]  # HDMI has no input
    assert find_input_device().name == "USB Headset Mono"  # the system default
    assert find_input_device(0).index == find_input_device("0").index == 0
    assert find_input_device("usb").default_samplerate == 48_000
    for bad, why in ((1, "no input device #1"), ("bluetooth", "matches no input device"),
                     ("a", "is ambiguous")):
        with pytest.raises(MicrophoneUnavailable, match=why):
            find_input_device(bad)


def test_open_microphone_uses_the_native_rate(monkeypatch):
    monkeypatch.setitem(sys.modules, "sounddevice", _fake_sounddevice(default_input=-1))
    capture = open_microphone(channels=2)  # no default input: the first one
    assert (capture.device, capture.samplerate, capture.channels) == (0, 44_100, 2)
    usb = open_microphone("USB", channels=2)  # a mono headset: as many channels as it has
    assert (usb.samplerate, usb.channels) == (48_000, 1)


# -- the real PortAudio, where libportaudio2 is installed ----------------------------------

@pytest.fixture
def sounddevice():
    try:
        import sounddevice
    except OSError:
        unavailable("PortAudio is not installed (apt-get install libportaudio2)")
    return sounddevice


def test_real_portaudio_lists_devices(sounddevice):
    devices = list_input_devices()  # empty on a machine without a sound card, and that is fine
    assert all(isinstance(d, InputDevice) and d.max_channels > 0 and d.default_samplerate > 0 for d in devices)


def test_real_portaudio_missing_device_is_a_clear_error(sounddevice):
    with pytest.raises(MicrophoneUnavailable) as err:
        find_input_device(10_000)
    assert "\n" not in str(err.value)
    with pytest.raises(MicrophoneUnavailable):
        find_input_device("no such microphone, surely")
    # Straight to PortAudio, past the device list: it refuses, we say so in one line.
    with pytest.raises(MicrophoneUnavailable, match="cannot open input device 10000") as err:
        MicrophoneCapture(48_000, device=10_000).start()
    assert "\n" not in str(err.value)


def test_real_portaudio_default_microphone(sounddevice):
    if not list_input_devices():
        with pytest.raises(MicrophoneUnavailable, match="no microphone found"):
            open_microphone()
        return
    capture = open_microphone()  # a machine with a microphone: opened at its own rate
    assert capture.samplerate == find_input_device().default_samplerate
