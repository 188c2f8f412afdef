"""Microphone capture: pick an input device, open it at its native rate, queue its blocks.

PortAudio (through sounddevice) calls our callback on its own real-time thread; the
callback only copies the block into a queue, never blocks, and the consumer thread does the
slow work (resampling, VAD, the model). The stream class is injected, so tests can play a
recording through a stand-in with the same callback contract instead of a device. Every failure to get a
microphone becomes one `MicrophoneUnavailable` with a one-line message the CLI can print.
"""
from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np

_END = None  # queue sentinel: the stream has finished


class MicrophoneUnavailable(RuntimeError):
    """No usable microphone: PortAudio missing, no input device, or it would not open."""


def _one_line(err: object) -> str:
    return " ".join(str(err).split())


def _sounddevice() -> Any:
    """Import sounddevice late: without libportaudio2 the import itself fails."""
    try:
        import sounddevice
    except OSError:  # sounddevice raises OSError("PortAudio library not found")
        raise MicrophoneUnavailable(
            "PortAudio is not installed (Debian/Ubuntu: apt-get install libportaudio2)") from None
    except ImportError:
        raise MicrophoneUnavailable("the sounddevice package is missing (pip install sounddevice)") from None
    return sounddevice


@dataclass(frozen=True)
class InputDevice:
    index: int
    name: str
    max_channels: int
    default_samplerate: int  # the device's native rate: we open it there and resample ourselves
    hostapi: str
    is_default: bool


def list_input_devices() -> list[InputDevice]:
    """Every device with at least one input channel (empty on a machine with no microphone)."""
    sd = _sounddevice()
    try:
        devices = sd.query_devices()
        hostapis = sd.query_hostapis()
    except sd.PortAudioError as err:
        raise MicrophoneUnavailable(f"cannot list audio devices: {_one_line(err)}") from None
    default = sd.default.device[0]
    return [
        InputDevice(index=d["index"], name=d["name"], max_channels=d["max_input_channels"],
                    default_samplerate=int(d["default_samplerate"]),
                    hostapi=hostapis[d["hostapi"]]["name"], is_default=d["index"] == default)
        for d in devices
        if d["max_input_channels"] > 0
    ]


def find_input_device(device: int | str | None = None) -> InputDevice:
    """The default input (None), an index, or a (case-insensitive part of a) device name."""
    inputs = list_input_devices()
    if not inputs:
        raise MicrophoneUnavailable("no microphone found (the system reports no audio input device)")
    names = "; ".join(f"{d.index}: {d.name}" for d in inputs)
    if device is None:
        # Some hosts have inputs but no default; the first input is the obvious choice then.
        return next((d for d in inputs if d.is_default), inputs[0])
    if isinstance(device, str) and device.strip().isdigit():
        device = int(device)
    if isinstance(device, int):
        for d in inputs:
            if d.index == device:
                return d
        raise MicrophoneUnavailable(f"no input device #{device} (inputs: {names})")
    matches = [d for d in inputs if device.lower() in d.name.lower()]
    exact = [d for d in matches if d.name.lower() == device.lower()]
    if len(exact) == 1 or len(matches) == 1:
        return (exact or matches)[0]
    why = "is ambiguous" if matches else "matches no input device"
    raise MicrophoneUnavailable(f"microphone name {device!r} {why} (inputs: {names})")


StreamFactory = Callable[..., Any]  # sounddevice.InputStream or anything called like it


class MicrophoneCapture:
    """One open input stream whose blocks, (frames, channels) float32, land in a queue."""

    def __init__(
        self,
        samplerate: int,
        channels: int = 1,
        *,
        device: int | None = None,
        block_ms: int = 30,
        stream_factory: StreamFactory | None = None,
        max_queued_s: float = 10.0,
    ) -> None:
        self.samplerate = int(samplerate)
        self.channels = channels
        self.device = device
        self.blocksize = max(1, self.samplerate * block_ms // 1000)
        self._factory = stream_factory
        # Bounded, so a stalled consumer costs the oldest audio instead of all memory.
        self._max_blocks = max(1, int(max_queued_s * 1000 / block_ms))
        self._queue: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=self._max_blocks)
        self._stream: Any = None
        self.overflows = 0  # blocks PortAudio flagged as lost (input overflow)
        self.dropped = 0  # blocks we threw away because the consumer fell behind

    def start(self) -> None:
        """Open and start the stream; `MicrophoneUnavailable` if that fails."""
        if self._stream is not None:
            return
        factory = self._factory
        if factory is None:
            factory = _sounddevice().InputStream
        self._queue = queue.Queue(maxsize=self._max_blocks)  # no end marker left from a previous run
        stream = None
        try:
            stream = factory(
                device=self.device, samplerate=self.samplerate, channels=self.channels,
                dtype="float32", blocksize=self.blocksize,
                callback=self._callback, finished_callback=self._finished,
            )
            stream.start()
        except Exception as err:  # PortAudioError, ValueError: bad device, rate, channels
            if stream is not None:
                stream.close()
            which = "default input" if self.device is None else f"input device {self.device}"
            raise MicrophoneUnavailable(f"cannot open {which} at {self.samplerate} Hz: {_one_line(err)}") from None
        self._stream = stream

    def stop(self) -> None:
        """Stop and close the stream; `blocks()` ends after what is already queued."""
        stream, self._stream = self._stream, None
        if stream is not None:
            stream.stop()
            stream.close()
            self._put(_END)

    def __enter__(self) -> "MicrophoneCapture":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def read(self, timeout: float | None = None) -> np.ndarray | None:
        """Next block, or None when the stream has ended (or `timeout` passed)."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def blocks(self) -> Iterator[np.ndarray]:
        """Blocks until the stream ends (a recording runs out, or `stop()`)."""
        while (block := self._queue.get()) is not _END:
            yield block

    # PortAudio's thread: copy and hand over, nothing else.
    def _callback(self, indata: np.ndarray, frames: int, time: Any, status: Any) -> None:
        if status.input_overflow:
            self.overflows += 1
        self._put(indata.copy())  # PortAudio reuses indata's buffer after we return

    def _finished(self) -> None:
        self._put(_END)

    def _put(self, item: np.ndarray | None) -> None:
        while True:
            try:
                self._queue.put_nowait(item)
                return
            except queue.Full:
                try:
                    self._queue.get_nowait()
                    self.dropped += 1
                except queue.Empty:
                    pass


def open_microphone(
    device: int | str | None = None,
    *,
    channels: int = 1,
    block_ms: int = 30,
    stream_factory: StreamFactory | None = None,
) -> MicrophoneCapture:
    """A capture for a real device at its native rate (not started; use `with` or `start()`)."""
    sd = _sounddevice()
    chosen = find_input_device(device)
    channels = min(channels, chosen.max_channels)
    try:
        sd.check_input_settings(device=chosen.index, channels=channels, dtype="float32",
                                samplerate=chosen.default_samplerate)
    except Exception as err:
        raise MicrophoneUnavailable(
            f"input device {chosen.index} ({chosen.name}) refuses {chosen.default_samplerate} Hz "
            f"x{channels}: {_one_line(err)}") from None
    return MicrophoneCapture(chosen.default_samplerate, channels, device=chosen.index,
                             block_ms=block_ms, stream_factory=stream_factory)
