"""Voice activity -> utterances: the streaming core of the voice front end.

Audio blocks of any size, rate and channel count go into `UtteranceSegmenter.feed`;
16 kHz mono float32 `Utterance`s come out. Per 10/20/30 ms frame, webrtcvad says voiced
or not. One frame is a poor witness (clicks, noise bursts, stop consonants), so the
decision is smoothed like the webrtcvad example's ring buffer: speech starts when at least
`trigger_ratio` of the last `window_s` of frames are voiced, and ends once no dense speech
has been seen for `hangover_s` (short pauses between words do not cut). Each utterance
keeps `pre_roll_s` before the detected onset, so the first syllable survives the trigger
delay, and `post_roll_s` after the last voiced frame.

Two modes:
* hands-free (default): VAD alone opens and closes utterances.
* push-to-talk: `start()` on key press, `stop()` on release; everything between is one
  utterance (pauses never split it), with leading/trailing silence trimmed by VAD but
  pre-/post-roll kept (pre-roll may reach just before the press: people start talking as
  they press).

`mute()` makes the segmenter deaf (the assistant is speaking through loudspeakers);
`on_speech_start(onset_s)` fires as soon as speech is confirmed (about 0.15-0.3 s after it
began), long before the utterance ends: that is what barge-in needs. It runs on the thread
that calls `feed`, inside the segmenter's lock: keep it quick.

webrtcvad decides *whether* there is speech; frame energy against a running noise floor
decides *where* its edges are (webrtcvad has its own ~60-90 ms hang-over and misses soft
fricatives), and rejects clicks, which VAD stretches over several frames.
"""
from __future__ import annotations

import math
import threading
from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import Callable, Iterable, Iterator

import numpy as np
import webrtcvad

from model.audio_io import MODEL_SAMPLE_RATE, to_model_audio

from .stream_resample import StreamResampler

# webrtcvad accepts 8/16/32/48 kHz; the model wants 16 kHz, so run it there and resample once.
VAD_RATE = MODEL_SAMPLE_RATE

# Edge sharpening by energy (see the module docstring).
EDGE_MARGIN_DB = 3.0  # "sound" = this far above the noise floor: speech as loud as the noise
EDGE_SEARCH_S = 0.15  # how far beyond VAD's edges to look for sound it missed
NOISE_FLOOR_DB = -100.0  # digital silence counts as this loud
ONSET_GAP_S = 0.06  # a pause this short is inside a word (the closure of a "t")
NOISE_ALPHA = 0.05  # noise-floor smoothing per frame (~0.6 s at 30 ms frames)


def _db(power: float) -> float:
    return max(NOISE_FLOOR_DB, 10.0 * math.log10(power + 1e-12))


@dataclass(frozen=True)
class Utterance:
    """One stretch of speech. Times are seconds from the start of the stream."""

    samples: np.ndarray  # 16 kHz mono float32, exactly the audio of [start_s, end_s)
    start_s: float  # includes the pre-roll
    end_s: float  # includes the post-roll
    speech_start_s: float  # where the speech begins (VAD, sharpened by frame energy)
    speech_end_s: float  # where it ends

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


class UtteranceSegmenter:
    """Streaming VAD segmenter; see the module docstring. Thread-safe (one lock)."""

    def __init__(
        self,
        sample_rate: int = VAD_RATE,
        *,
        frame_ms: int = 30,
        aggressiveness: int = 2,
        pre_roll_s: float = 0.3,
        post_roll_s: float = 0.3,
        hangover_s: float = 0.7,
        min_speech_s: float = 0.1,
        max_utterance_s: float = 30.0,
        window_s: float = 0.3,
        trigger_ratio: float = 0.5,
        push_to_talk: bool = False,
        on_speech_start: Callable[[float], None] | None = None,
    ) -> None:
        if frame_ms not in (10, 20, 30):
            raise ValueError(f"webrtcvad frames are 10, 20 or 30 ms, got {frame_ms}")
        if not 0 <= aggressiveness <= 3:
            raise ValueError(f"aggressiveness is 0..3, got {aggressiveness}")
        if not 0 < trigger_ratio <= 1:
            raise ValueError(f"trigger_ratio must be in (0, 1], got {trigger_ratio}")
        if post_roll_s > hangover_s:
            # The post-roll is taken from audio already heard during the hang-over.
            raise ValueError("post_roll_s must not exceed hangover_s")
        self.sample_rate = int(sample_rate)
        self.frame_ms = frame_ms
        self.push_to_talk = push_to_talk
        self.on_speech_start = on_speech_start
        self._frame_len = VAD_RATE * frame_ms // 1000
        frame_s = frame_ms / 1000

        def frames(seconds: float) -> int:
            return max(0, round(seconds / frame_s))

        self._pre_roll = frames(pre_roll_s)
        self._post_roll = frames(post_roll_s)
        self._hangover = max(1, frames(hangover_s))
        self._min_speech_s = min_speech_s
        self._max_frames = max(1, frames(max_utterance_s))
        self._window = max(1, frames(window_s))
        self._needed = math.ceil(trigger_ratio * self._window)
        self._edge_search = frames(EDGE_SEARCH_S)
        self._onset_gap = frames(ONSET_GAP_S)
        self._vad = webrtcvad.Vad(aggressiveness)
        self._lock = threading.RLock()
        self._muted = False
        self._reset()

    # -- state -------------------------------------------------------------------------

    def _reset(self) -> None:
        """Fresh stream: time restarts at 0 (mute state is kept: it is the app's)."""
        self._resampler = StreamResampler(self.sample_rate, VAD_RATE)
        self._pending = np.zeros(0, np.float32)  # < one frame of 16 kHz audio
        self._samples_in = 0  # real 16 kHz samples seen (the last frame may be padded)
        self._n = 0  # frames processed
        self._frames: deque[np.ndarray] = deque()  # retained audio, frame by frame
        self._power: deque[np.ndarray] = deque()  # their mean power per 10 ms
        self._noise_db: float | None = None  # noise floor, from frames VAD calls unvoiced
        self._first = 0  # frame index of self._frames[0]
        self._ring: deque[bool] = deque(maxlen=self._window)  # recent VAD flags
        self._in_speech = False  # smoothed VAD says speech (incl. hang-over)
        self._utt_start: int | None = None  # first frame of the open utterance
        self._speech_start = 0
        self._start_heard = True  # False while the onset is VAD's alone, with nothing audible
        self._last_voiced = -1  # last voiced frame while speech was dense
        self._continued = False  # open utterance continues one split at max length
        self._announced = False  # on_speech_start fired for this utterance
        self._floor = 0  # no utterance may start before this frame
        self._gate_open = False

    @property
    def in_speech(self) -> bool:
        """True while VAD hears speech (including the hang-over after it)."""
        return self._in_speech

    @property
    def muted(self) -> bool:
        return self._muted

    @property
    def key_down(self) -> bool:
        """Push-to-talk: True between `start()` and `stop()`."""
        return self._gate_open

    @property
    def time_s(self) -> float:
        """Stream time of the audio processed so far."""
        return self._t(self._n)

    def _t(self, frame: int) -> float:
        return frame * self._frame_len / VAD_RATE

    # -- public controls ------------------------------------------------------------------

    def feed(self, samples: np.ndarray) -> list[Utterance]:
        """Push a block at `sample_rate`, shape (n,) or (n, channels); get finished utterances."""
        with self._lock:
            return self._push16k(self._resampler.push(samples))

    def flush(self) -> list[Utterance]:
        """End of stream: close any open utterance; the segmenter then starts a new stream."""
        with self._lock:
            out = self._push16k(self._resampler.flush())
            if self._pending.size:  # the last partial frame, zero-padded, still counts
                pad = np.zeros(self._frame_len - self._pending.size, np.float32)
                out += self._step(np.concatenate([self._pending, pad]))
            if self.push_to_talk:
                out += self.stop()
            elif self._utt_start is not None:
                out += self._finish(self._n)
            self._reset()
            return out

    def start(self) -> None:
        """Push-to-talk key pressed."""
        with self._lock:
            if not self.push_to_talk:
                raise RuntimeError("start()/stop() need UtteranceSegmenter(push_to_talk=True)")
            if self._gate_open:
                return
            self._gate_open = True
            self._floor = max(self._floor, self._n - self._pre_roll, self._first)

    def stop(self) -> list[Utterance]:
        """Push-to-talk key released: the utterance spoken while it was held, if any."""
        with self._lock:
            if not self._gate_open:
                return []
            self._gate_open = False
            out = []
            if self._utt_start is not None:
                out = self._finish(self._n)
            self._in_speech = False
            self._floor = self._n
            return out

    def mute(self) -> None:
        """Stop listening (e.g. while the assistant talks); an open utterance is dropped."""
        with self._lock:
            self._muted = True
            self._drop_open()

    def unmute(self) -> None:
        """Listen again, from now on: audio heard while muted never becomes pre-roll."""
        with self._lock:
            if self._muted:
                self._muted = False
                self._floor = max(self._floor, self._n)
                self._ring.clear()

    # -- frame pipeline -------------------------------------------------------------------

    def _push16k(self, audio: np.ndarray) -> list[Utterance]:
        self._samples_in += audio.size
        buf = np.concatenate([self._pending, audio]) if self._pending.size else audio
        n_full = buf.size // self._frame_len
        self._pending = buf[n_full * self._frame_len:].copy()
        out: list[Utterance] = []
        for frame in buf[: n_full * self._frame_len].reshape(n_full, self._frame_len):
            out += self._step(frame)
        return out

    def _is_voiced(self, frame: np.ndarray) -> bool:
        pcm = (np.clip(frame, -1.0, 1.0) * 32767.0).astype("<i2")
        return self._vad.is_speech(pcm.tobytes(), VAD_RATE)

    def _step(self, frame: np.ndarray) -> list[Utterance]:
        i = self._n
        self._n += 1
        self._frames.append(frame.astype(np.float32, copy=True))
        power = np.mean(np.square(frame.reshape(-1, VAD_RATE // 100)), axis=1)
        self._power.append(power)
        energy_db = _db(float(power.mean()))
        out: list[Utterance] = []
        if not self._muted:
            # VAD runs even with the push-to-talk key up, so speech begun just before
            # the press is already in the ring when the key goes down.
            voiced = self._is_voiced(frame)
            self._ring.append(voiced)
            if not voiced and not self._in_speech:
                self._noise_db = energy_db if self._noise_db is None else (
                    self._noise_db + NOISE_ALPHA * (energy_db - self._noise_db))
            if self._gate_open or not self.push_to_talk:
                out = self._track(i)
        self._trim()
        return out

    def _track(self, i: int) -> list[Utterance]:
        """Smoothed speech state machine, run for frame i."""
        out: list[Utterance] = []
        if self._utt_start is not None and not self._start_heard and self._is_sound(i):
            # VAD fired on noise just before the speech (webrtcvad still adapting): the
            # speech starts at the first frame louder than the noise.
            self._speech_start, self._start_heard = i, True
        ring = np.fromiter(self._ring, bool, len(self._ring))
        if ring.sum() >= self._needed:
            if not self._in_speech:
                self._in_speech = True
                if self._utt_start is None:
                    onset = max(self._onset(ring, i), self._floor, self._first)
                    start = self._refine_start(onset, i)
                    self._open(onset if start is None else start, onset)
                    self._start_heard = start is not None
            self._last_voiced = i - (ring.size - 1 - int(np.flatnonzero(ring)[-1]))
            if not self._announced and self._loud_s(self._speech_start, i + 1) >= self._min_speech_s:
                self._announced = True
                if self.on_speech_start is not None:
                    self.on_speech_start(self._t(self._speech_start))
        elif self._in_speech and i - self._last_voiced >= self._hangover:
            self._in_speech = False
            if not self.push_to_talk:  # push-to-talk: only the key release ends it
                out += self._finish(i + 1)
        if self._utt_start is not None and i + 1 - self._utt_start >= self._max_frames:
            if self._last_voiced == i:  # mid-word: split, the next piece goes on seamlessly
                out += self._emit(i + 1, i + 1, split=True)
            else:  # in a pause anyway: end here, like the hang-over would have
                self._in_speech = False
                out += self._finish(i + 1)
        return out

    def _onset(self, ring: np.ndarray, i: int) -> int:
        """Start of the voiced run that set off the trigger.

        Walk back from the latest voiced frame over gaps of at most ONSET_GAP_S. Taking
        the ring's first voiced frame would let a stray noise frame pull the onset up to
        a window early.
        """
        voiced = np.flatnonzero(ring)
        breaks = np.flatnonzero(np.diff(voiced) - 1 > self._onset_gap)
        first = voiced[breaks[-1] + 1] if breaks.size else voiced[0]
        return i - ring.size + 1 + int(first)

    def _sound_db(self) -> float:
        return (NOISE_FLOOR_DB if self._noise_db is None else self._noise_db) + EDGE_MARGIN_DB

    def _is_sound(self, frame: int) -> bool:
        return _db(float(self._power[frame - self._first].mean())) > self._sound_db()

    def _loud_s(self, start: int, end: int) -> float:
        """Seconds of frames [start, end) above the noise, at 10 ms resolution.

        A click fills one or two 10 ms slots; speech, even a short "stop", many more.
        VAD alone cannot tell: its own hang-over stretches a click over several frames.
        """
        powers = list(islice(self._power, start - self._first, end - self._first))
        if not powers:
            return 0.0
        return int(np.count_nonzero(np.concatenate(powers) > 10 ** (self._sound_db() / 10))) / 100

    def _refine_start(self, onset: int, now: int) -> int | None:
        """Speech start near VAD's onset, by frame energy against the noise floor.

        Leading frames no louder than the noise are VAD false alarms: skip them. If the
        onset frame is sound, look back for sound VAD missed (a soft "s").
        """
        first_sound = next((f for f in range(onset, now + 1) if self._is_sound(f)), None)
        if first_sound is None:  # nothing audible yet: VAD's onset, for now (see _track)
            return None
        if first_sound > onset:
            return first_sound
        lowest = max(onset - self._edge_search, self._floor, self._first)
        return self._sound_edge(range(onset - 1, lowest - 1, -1), onset)

    def _refine_end(self, end: int, heard: int) -> int:
        """Speech end near VAD's, the mirror image of `_refine_start`.

        webrtcvad's own hang-over calls ~60-90 ms after an abrupt stop voiced: trimmed here.
        """
        last_sound = next((f for f in range(end - 1, self._speech_start - 1, -1) if self._is_sound(f)), None)
        if last_sound is None:
            return end
        if last_sound + 1 < end:
            return last_sound + 1
        return self._sound_edge(range(end, min(end + self._edge_search, heard)), end - 1) + 1

    def _sound_edge(self, frames: range, edge: int) -> int:
        """Walk `frames` outwards from `edge`: the farthest sound frame before a longer gap
        than ONSET_GAP_S (the closure of a "t" sits between "s" and vowel)."""
        quiet = 0
        for frame in frames:
            if self._is_sound(frame):
                edge, quiet = frame, 0
            else:
                quiet += 1
                if quiet > self._onset_gap:
                    break
        return edge

    def _open(self, speech_start: int, vad_onset: int) -> None:
        self._speech_start = speech_start
        # Pre-roll counts from the earlier of the two onsets: never cut what VAD called speech.
        self._utt_start = max(min(speech_start, vad_onset) - self._pre_roll, self._floor, self._first)
        self._announced = False
        self._continued = False

    def _finish(self, heard: int) -> list[Utterance]:
        """Close the open utterance after its speech plus post-roll; frames < `heard` exist."""
        if self._last_voiced < self._speech_start:  # a piece after a split that held no speech
            return self._emit(self._speech_start, self._speech_start, split=False)
        voiced_end = self._last_voiced + 1
        speech_end = self._refine_end(voiced_end, heard)
        # Post-roll counts from the later of the two ends: never cut what VAD called speech.
        return self._emit(min(max(speech_end, voiced_end) + self._post_roll, heard), speech_end, split=False)

    def _emit(self, end: int, speech_end: int, split: bool) -> list[Utterance]:
        """Hand out frames [utt_start, end) unless they hold too little speech."""
        start = self._utt_start
        assert start is not None
        speech = speech_end - self._speech_start
        keep = speech > 0 and (self._continued or self._loud_s(self._speech_start, speech_end) >= self._min_speech_s)
        out: list[Utterance] = []
        if keep:
            samples = np.concatenate(list(islice(self._frames, start - self._first, end - self._first)))
            # The stream's last frame may be zero padding: never report audio not heard.
            samples = samples[: max(0, self._samples_in - start * self._frame_len)]
            t0 = self._t(start)
            t1 = t0 + samples.size / VAD_RATE
            out.append(Utterance(samples, t0, t1, self._t(self._speech_start), min(self._t(speech_end), t1)))
        if split:  # max length reached mid-speech: the next piece starts right here
            self._utt_start = self._speech_start = end
            self._continued = True
        else:
            self._utt_start = None
            self._announced = False
            self._floor = end
        return out

    def _drop_open(self) -> None:
        self._utt_start = None
        self._in_speech = False
        self._announced = False
        self._ring.clear()
        self._floor = self._n

    def _trim(self) -> None:
        """Keep the open utterance, or else just enough for the next onset plus pre-roll."""
        keep_from = self._n - self._window - self._edge_search - self._pre_roll
        if self._utt_start is not None:
            keep_from = min(keep_from, self._utt_start)
        while self._first < keep_from and self._frames:
            self._frames.popleft()
            self._power.popleft()
            self._first += 1


def stream_utterances(blocks: Iterable[np.ndarray], segmenter: UtteranceSegmenter) -> Iterator[Utterance]:
    """Feed every block (e.g. `MicrophoneCapture.blocks()`), yield utterances, flush at the end."""
    for block in blocks:
        yield from segmenter.feed(block)
    yield from segmenter.flush()


def segment_clip(samples: np.ndarray, rate: int, **options) -> list[Utterance]:
    """Utterances of a whole recording (hands-free rules); options as for the segmenter."""
    segmenter = UtteranceSegmenter(VAD_RATE, **options)
    return segmenter.feed(to_model_audio(samples, rate)) + segmenter.flush()
