"""Spoken replies, for both front ends: streamed text -> sentences -> espeak-ng -> a player, one
sentence at a time (the voice assistant), or a whole answer -> a WAV file (the web page).

Speaking starts with the first finished sentence while the model is still writing the rest
(peers' lesson: wait for the whole answer and the first audio comes seconds late). The
speaker is optional everywhere: without espeak-ng, or without an output device, the
assistant answers in text and says why once.

    speaker = Speaker(voice="en-us")
    splitter = SentenceSplitter()
    for piece in stream:
        for sentence in splitter.push(piece):
            speaker.say(sentence)
    for sentence in splitter.flush():
        speaker.say(sentence)
    speaker.stop()   # barge-in: drop what is queued, cut the sentence being played

    speak_to_file(answer, "answer.wav")   # the page's spoken reply
"""
from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections import deque
from pathlib import Path
from typing import Callable

import numpy as np

from app.media import WavError, parse_wav

ESPEAK = "espeak-ng"
MAX_FILE_CHARS = 3000  # a spoken reply longer than this is cut: nobody listens to pages of speech

# play(samples, rate, cut): play to the end, or return early once `cut` is set.
Player = Callable[[np.ndarray, int, threading.Event], None]
Synthesizer = Callable[[str], tuple[np.ndarray, int]]


class SpeechUnavailable(RuntimeError):
    """No TTS or no way to play it; the message is one line for the user."""


def available() -> bool:
    """True when espeak-ng is installed (on PATH)."""
    return shutil.which(ESPEAK) is not None


# -- sentences --------------------------------------------------------------------------

# A sentence ends at . ! ? or … (with any closing quotes/brackets) before whitespace, or at
# a line break (list items, paragraphs).
_END = re.compile(r"""[.!?…]+["')\]»”’]*\s+|\n+""")
# ...but not after these: "e.g. this", "Dr. Smith", "3. item", "J. Smith".
_NOT_AN_END = re.compile(r"""(?:\b(?:e\.g|i\.e|etc|vs|mr|mrs|ms|dr|prof|fig)\.|\b\d+\.|\b[A-Z]\.)$""", re.I)


class SentenceSplitter:
    """Cut text that arrives in pieces into sentences, each as soon as it is complete.

    A sentence is known to be complete only when the whitespace after its final stop has
    arrived, so the last one comes out of `flush()`.
    """

    def __init__(self) -> None:
        self._buffer = ""

    def push(self, text: str) -> list[str]:
        self._buffer += text
        sentences, start = [], 0
        for match in _END.finditer(self._buffer):
            candidate = self._buffer[start:match.end()]
            if match.group().strip() and _NOT_AN_END.search(candidate.rstrip()):
                continue  # an abbreviation or a number: the sentence goes on
            if candidate.strip():
                sentences.append(candidate.strip())
            start = match.end()
        self._buffer = self._buffer[start:]
        return sentences

    def flush(self) -> list[str]:
        """The rest of the text, as the last sentence (if there is any)."""
        rest, self._buffer = self._buffer.strip(), ""
        return [rest] if rest else []


def speakable(text: str) -> str:
    """Text as it should be read aloud: code blocks, HTML tags, markdown marks and links'
    targets dropped. A whole code block is said to be left out; an open fence (a sentence cut
    out of a longer answer) is dropped with what follows it."""
    text = re.sub(r"```.*?```", " (code omitted) ", text, flags=re.S)
    text = re.sub(r"```.*", " ", text, flags=re.S)
    text = re.sub(r"<[^>]+>", " ", text)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)  # [label](url) -> label
    text = re.sub(r"[*_#`>|~]+", " ", text)
    return " ".join(text.split())


# -- synthesis and playback --------------------------------------------------------------

def espeak_synthesizer(voice: str | None = None, words_per_minute: int | None = None) -> Synthesizer:
    """A synthesizer running espeak-ng; the text goes through stdin, so it can start with '-'."""
    command = [ESPEAK, "--stdout"]
    if voice:
        command += ["-v", voice]
    if words_per_minute:
        command += ["-s", str(int(words_per_minute))]

    def synthesize(text: str) -> tuple[np.ndarray, int]:
        try:
            done = subprocess.run(command, input=text.encode("utf-8"), capture_output=True, timeout=60)
        except FileNotFoundError:
            raise SpeechUnavailable(f"{ESPEAK} is not installed (Debian/Ubuntu: apt-get install espeak-ng)") from None
        if done.returncode != 0:
            why = " ".join(done.stderr.decode("utf-8", "replace").split()) or f"exit status {done.returncode}"
            raise SpeechUnavailable(f"{ESPEAK} failed: {why}")
        try:
            return parse_wav(done.stdout)
        except WavError as err:
            raise SpeechUnavailable(f"{ESPEAK} wrote no usable audio: {err}") from None

    return synthesize


def play_on_device(samples: np.ndarray, rate: int, cut: threading.Event) -> None:
    """Play through the default output with sounddevice, stopping early when `cut` is set."""
    try:
        import sounddevice as sd
    except (OSError, ImportError):
        raise SpeechUnavailable("cannot play audio: PortAudio/sounddevice is not available") from None
    try:
        sd.play(samples, rate)
    except Exception as err:  # PortAudioError: no output device, refused rate...
        raise SpeechUnavailable(f"cannot play audio: {' '.join(str(err).split())}") from None
    try:
        # Poll rather than sd.wait(): the wait must end as soon as `cut` is set.
        while not cut.wait(0.02):
            stream = sd.get_stream()
            if not stream.active:
                break
    finally:
        sd.stop()


class WavWriter:
    """A player that writes each sentence to DIR/reply-NNN.wav instead of a device
    (a machine without speakers, and tests)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.files: list[Path] = []

    def __call__(self, samples: np.ndarray, rate: int, cut: threading.Event) -> None:
        import wave

        path = self.folder / f"reply-{len(self.files) + 1:03d}.wav"
        pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1 if pcm.ndim == 1 else pcm.shape[1])
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(pcm.tobytes())
        self.files.append(path)


# -- the speaker ----------------------------------------------------------------------------

class Speaker:
    """Speaks queued sentences one after another on its own thread.

    `on_start` runs when it starts talking after being quiet and `on_idle` when it has
    nothing left to say (the CLI mutes the microphone in between, so the assistant does not
    hear itself). Both run on the speaker's thread, in that order, never under a lock.
    The first failure (no espeak-ng, no output device) switches speech off: `failed` says
    why and `on_error` is told once.
    """

    def __init__(
        self,
        voice: str | None = None,
        words_per_minute: int | None = None,
        *,
        synthesize: Synthesizer | None = None,
        play: Player | None = None,
        on_start: Callable[[], None] | None = None,
        on_idle: Callable[[], None] | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self._synthesize = synthesize or espeak_synthesizer(voice, words_per_minute)
        self._play = play or play_on_device
        self.on_start = on_start
        self.on_idle = on_idle
        self.on_error = on_error
        self.failed: str | None = None
        self.spoken: list[str] = []  # sentences played to the end (or cut), for the record
        self._cond = threading.Condition()
        self._queue: deque[str] = deque()
        self._talking = False  # from on_start until on_idle has returned
        self._cut = threading.Event()  # cuts the sentence in hand; a fresh one per sentence
        self._closed = False
        self._thread: threading.Thread | None = None

    @property
    def speaking(self) -> bool:
        """True from `say()` until everything queued has been played (or stopped)."""
        with self._cond:
            return self._talking or bool(self._queue)

    def say(self, text: str) -> None:
        """Queue a sentence (markdown is dropped; empty text is ignored)."""
        text = speakable(text)
        with self._cond:
            if not text or self.failed or self._closed:
                return
            self._queue.append(text)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="Speaker", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def stop(self) -> None:
        """Barge-in: forget what is queued and cut the sentence being spoken."""
        with self._cond:
            self._queue.clear()
            self._cut.set()
            self._cond.notify_all()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until everything queued has been spoken; False if `timeout` passed first."""
        with self._cond:
            return self._cond.wait_for(lambda: not (self._talking or self._queue), timeout)

    def close(self) -> None:
        """Stop speaking and end the thread."""
        self.stop()
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return  # closed
                text = self._queue.popleft()
                self._cut = cut = threading.Event()
                starting, self._talking = not self._talking, True
            if starting:
                self._notify(self.on_start)
            self._speak(text, cut)
            with self._cond:
                finished = not self._queue
            if finished:
                self._notify(self.on_idle)
                with self._cond:
                    # A sentence queued meanwhile starts a new stretch of talking (on_start again).
                    self._talking = False
                    self._cond.notify_all()

    def _speak(self, text: str, cut: threading.Event) -> None:
        try:
            samples, rate = self._synthesize(text)
            if not cut.is_set():
                self._play(samples, rate, cut)
                self.spoken.append(text)
        except SpeechUnavailable as err:
            self._fail(str(err))
        except Exception as err:  # a player's own error: speech off, the assistant goes on
            self._fail(f"speech failed: {' '.join(str(err).split())}")

    def _fail(self, why: str) -> None:
        with self._cond:
            first = self.failed is None
            self.failed = why
            self._queue.clear()
        if first and self.on_error is not None:
            self.on_error(why)

    @staticmethod
    def _notify(callback: Callable[[], None] | None) -> None:
        if callback is not None:
            callback()


def speak_to_file(text: str, path: str | Path, voice: str | None = None) -> Path:
    """Write `text` as speech to a WAV file; raises SpeechUnavailable if espeak-ng is missing or fails."""
    if not available():
        raise SpeechUnavailable("espeak-ng is not installed (apt-get install espeak-ng)")
    command = [ESPEAK, "-w", str(path)] + (["-v", voice] if voice else []) + ["--", speakable(text)[:MAX_FILE_CHARS]]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        raise SpeechUnavailable(f"espeak-ng failed: {run.stderr.strip()[:200]}")
    return Path(path)
