"""A stand-in for `sounddevice.InputStream` that plays a recording instead of a microphone.

It has the constructor keywords, methods and callback contract the capture code relies on:
`callback(indata, frames, time, status)` runs on its own thread, once per block of
exactly `blocksize` frames (the last one zero-padded, as a live microphone never runs
short), with `indata` shaped (frames, channels) and reused between calls, like PortAudio.
Tests and the CLI's "pretend this file is the microphone" both use it.
"""
from __future__ import annotations

import threading
import time as _time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np


@dataclass
class FakeCallbackFlags:
    """The part of `sounddevice.CallbackFlags` a callback looks at; always clean here."""

    input_overflow: bool = False
    input_underflow: bool = False

    def __bool__(self) -> bool:
        return self.input_overflow or self.input_underflow


class FakeInputStream:
    """Play `samples` ((n,) or (n, channels), at `samplerate`) through `callback`."""

    def __init__(
        self,
        samples: np.ndarray,
        samplerate: float,
        blocksize: int = 0,
        callback: Callable[[np.ndarray, int, Any, Any], None] | None = None,
        *,
        channels: int | None = None,
        dtype: str = "float32",
        finished_callback: Callable[[], None] | None = None,
        realtime: bool = False,
        **_device_options: Any,  # device=, latency=, ...: meaningless for a recording
    ) -> None:
        data = np.asarray(samples)
        data = data[:, None] if data.ndim == 1 else data
        if channels is not None and channels != data.shape[1]:
            raise ValueError(f"recording has {data.shape[1]} channel(s), {channels} requested")
        if dtype not in ("float32", "int16"):
            raise ValueError(f"unsupported dtype {dtype!r}")
        self.samplerate = float(samplerate)
        # blocksize=0 means "whatever suits the host" to PortAudio; pick 10 ms.
        self.blocksize = int(blocksize) or max(1, int(self.samplerate) // 100)
        self.channels = data.shape[1]
        self.dtype = dtype
        self._data = _as_dtype(data, dtype)
        self._callback = callback
        self._finished_callback = finished_callback
        self._realtime = realtime
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.closed = False

    @property
    def active(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def stopped(self) -> bool:
        return not self.active

    def start(self) -> None:
        if self.closed:
            raise RuntimeError("stream is closed")
        if self.active:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="FakeInputStream", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def abort(self) -> None:
        self.stop()

    def close(self) -> None:
        self.stop()
        self.closed = True

    def __enter__(self) -> "FakeInputStream":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        block = np.zeros((self.blocksize, self.channels), self._data.dtype)  # reused, like PortAudio
        t0 = _time.monotonic()
        for n, pos in enumerate(range(0, len(self._data), self.blocksize)):
            if self._stop.is_set():
                break
            chunk = self._data[pos: pos + self.blocksize]
            block[: len(chunk)] = chunk
            block[len(chunk):] = 0
            adc_time = n * self.blocksize / self.samplerate
            if self._realtime:  # pace like a real device, for demos
                _time.sleep(max(0.0, t0 + adc_time - _time.monotonic()))
            stamp = SimpleNamespace(inputBufferAdcTime=adc_time, currentTime=adc_time, outputBufferDacTime=0.0)
            if self._callback is not None:
                self._callback(block, self.blocksize, stamp, FakeCallbackFlags())
        if self._finished_callback is not None:
            self._finished_callback()


def _as_dtype(data: np.ndarray, dtype: str) -> np.ndarray:
    """What a device would deliver in `dtype`: float in [-1, 1] or int16 PCM."""
    if dtype == "int16":
        if data.dtype == np.int16:
            return data
        return (np.clip(data.astype(np.float32), -1.0, 1.0) * 32767.0).astype(np.int16)
    if np.issubdtype(data.dtype, np.integer):
        return data.astype(np.float32) / float(np.iinfo(data.dtype).max + 1)
    return data.astype(np.float32)
