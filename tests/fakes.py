"""The fakes the tests share: a scripted engine and a recording played as a microphone.

ScriptedEngine implements the engine contract (app/engine_api.py) with scripted replies, streamed
in small pieces, and records every request. FakeInputStream is a stand-in for
`sounddevice.InputStream`: it has the constructor keywords, methods and callback contract the
capture code relies on: `callback(indata, frames, time, status)` runs on its own thread, once per
block of exactly `blocksize` frames (the last one zero-padded, as a live microphone never runs
short), with `indata` shaped (frames, channels) and reused between calls, like PortAudio.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from app.engine_api import AUDIO, GBNF, IMAGE, Chunk, Completion, EngineError, Sampling, Usage, adapter_for, collect


def _copy(value: Any) -> Any:
    """Messages as they were sent: dicts and lists copied, media (arrays, images) shared."""
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


class ScriptedEngine:
    """Answers each request with the next scripted reply and records what it was asked.

    A reply is a string (streamed in pieces of `piece` characters, so markers arrive split), a
    list of pieces, or an exception (raised when the stream is first read, as the real engine
    does). Like the real engine it honours stop strings; unlike it, it ignores the grammar.
    Replies are used up in order: `replies` is what is left.
    """

    def __init__(self, *replies: str | list[str] | Iterable[str] | BaseException, piece: int = 3,
                 modalities: Iterable[str] = (IMAGE, AUDIO), delay: float = 0.0,
                 before_piece: Callable[[int, int], None] | None = None, n_ctx: int = 4096,
                 constraints: Iterable[str] = (GBNF,)):
        self.replies = list(replies)
        self.piece = piece
        self.modalities = frozenset(modalities)
        self.n_ctx = n_ctx
        self.constraints = frozenset(constraints)  # what it claims to honour (it ignores them all)
        self.delay = delay
        self.before_piece = before_piece  # hook(reply_index, piece_index), e.g. to wait for the speaker
        self.requests: list[dict[str, Any]] = []  # messages, stream, adapter and every Sampling field
        self.pieces_read = 0                       # pieces of streamed replies handed out
        self.started = threading.Event()           # set when a reply's first piece is handed out
        self.stopped_early: list[bool] = []        # per streamed reply: closed before its end
        self.closed_at: list[float] = []           # per streamed reply: when it was closed

    @property
    def closed_early(self) -> int:
        return sum(self.stopped_early)

    def usage(self, messages: list[dict[str, Any]] | str) -> Usage:
        kinds = set() if isinstance(messages, str) else {
            p["type"] for m in messages if isinstance(m.get("content"), list) for p in m["content"] if isinstance(p, dict)}
        return Usage(adapter=adapter_for(frozenset(kinds & {IMAGE, AUDIO})), prompt_tokens=100, cached_tokens=40,
                     encoder_ms=12.0, prefill_ms=600.0, ttft_ms=650.0, completion_tokens=10, decode_ms=500.0)

    def count_tokens(self, part: dict[str, Any]) -> int:
        if part["type"] in (IMAGE, AUDIO) and part["type"] not in self.modalities:
            raise EngineError(f"this model cannot read {part['type']}")
        return {"text": len(str(part.get("text", "")).split()), IMAGE: 100, AUDIO: 13}[part["type"]]

    def close(self) -> None:
        pass

    def generate(self, messages, sampling: Sampling = Sampling(), *, adapter="auto") -> Completion:
        return collect(self._reply(messages, sampling, adapter, stream=False))

    def stream(self, messages, sampling: Sampling = Sampling(), *, adapter="auto") -> Iterator[Chunk]:
        return self._reply(messages, sampling, adapter, stream=True)

    def _reply(self, messages, sampling: Sampling, adapter, stream: bool) -> Iterator[Chunk]:
        index = len(self.requests)
        self.requests.append({"messages": _copy(messages), "stream": stream, "adapter": adapter,
                              **dataclasses.asdict(sampling)})
        assert self.replies, "more requests than scripted replies"
        reply = self.replies.pop(0)
        usage = self.usage(messages)
        return self._play(index, reply, sampling, usage, stream)

    def _play(self, index: int, reply, sampling: Sampling, usage: Usage, stream: bool) -> Iterator[Chunk]:
        done = False
        try:
            if isinstance(reply, BaseException):
                raise reply
            pieces = [reply[i:i + self.piece] for i in range(0, len(reply), self.piece)] \
                if isinstance(reply, str) else reply
            text = ""
            for k, piece in enumerate(pieces):
                text += piece
                cut = min((text.find(s) for s in sampling.stop if s in text), default=-1)
                if cut >= 0:
                    piece = piece[:len(piece) - (len(text) - cut)]
                if self.before_piece is not None:
                    self.before_piece(index, k)
                self.started.set()
                if self.delay:
                    time.sleep(self.delay)
                self.pieces_read += stream
                if piece:
                    yield Chunk(piece)
                if cut >= 0:
                    break
            done = True
            yield Chunk("", "stop", usage)
        finally:
            if stream:
                self.stopped_early.append(not done)
                self.closed_at.append(time.monotonic())


# -- a recording played as a microphone ---------------------------------------------------------

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
        t0 = time.monotonic()
        for n, pos in enumerate(range(0, len(self._data), self.blocksize)):
            if self._stop.is_set():
                break
            chunk = self._data[pos: pos + self.blocksize]
            block[: len(chunk)] = chunk
            block[len(chunk):] = 0
            adc_time = n * self.blocksize / self.samplerate
            if self._realtime:  # pace like a real device, for demos
                time.sleep(max(0.0, t0 + adc_time - time.monotonic()))
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
