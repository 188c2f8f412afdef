"""The terminal voice assistant: talk to Phi-4-multimodal, read (and hear) its answers.

    python -m app.voice --model DIR                    push-to-talk: Enter starts, Enter stops
    python -m app.voice --model DIR --mode handsfree   just speak; a pause ends the turn
    python -m app.voice --model DIR --wav talk.wav     a recording instead of a microphone
    python -m app.voice --list-devices

A terminal cannot tell when a key is released, so push-to-talk is a toggle: press the key
(Enter by default, or --key space) to start talking and again to stop. Pressing it while
the assistant answers interrupts the answer. In hands-free mode, starting to speak does.
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from app import model_store
from app.engine_api import Engine
from app.media import MediaError, read_audio
from app.speech_out import Speaker, WavWriter
from app.speech_out import available as speech_available

from .assistant import Listener, VoiceAssistant, answer_recording
from .capture import MicrophoneUnavailable, list_input_devices, open_microphone
from .segmenter import UtteranceSegmenter

PROG = "phi4mm-voice"


class Failure(Exception):
    """Ends the program with a one-line message and exit status 2."""


# -- options --------------------------------------------------------------------------------

def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Talk to Phi-4-multimodal in the terminal: it hears your speech directly "
        "(no separate speech-to-text) and answers in text, read aloud where espeak-ng is installed.")
    p.add_argument("--model", metavar="DIR", help="converted Phi-4-multimodal folder (python -m convert); "
                   f"default: the app's model folder ({model_store.default_model_dir()})")
    p.add_argument("--backend", metavar="URL", help="run on an OpenAI-compatible server (a vLLM cluster, or "
                   "python -m app.api elsewhere) instead of the embedded engine (docs/scale-out.md)")
    p.add_argument("--backend-key", default=os.environ.get("PHI4MM_BACKEND_KEY"),
                   help="the backend's API key (default: $PHI4MM_BACKEND_KEY)")
    p.add_argument("--remote-models", metavar="text=NAME,vision=NAME,speech=NAME",
                   help="the backend's model name for each LoRA (vLLM serves each LoRA as a model)")
    src = p.add_argument_group("input")
    src.add_argument("--wav", metavar="FILE",
                     help="answer the speech in this recording (WAV, FLAC, OGG, MP3) instead of a microphone")
    src.add_argument("--device", help="input device: index or part of its name (default: the system's)")
    src.add_argument("--list-devices", action="store_true", help="list the input devices and exit")
    src.add_argument("--mode", choices=("ptt", "handsfree"), default="ptt",
                     help="ptt: press the key to start and again to stop talking (default); "
                     "handsfree: voice activity detection alone finds your turns")
    src.add_argument("--key", default="enter",
                     help="push-to-talk key: enter (default), space, or a single character")
    vad = p.add_argument_group("voice activity detection")
    vad.add_argument("--aggressiveness", type=int, choices=range(4), default=2,
                     help="webrtcvad aggressiveness, 0 (lenient) to 3 (strict); default 2")
    vad.add_argument("--frame-ms", type=int, choices=(10, 20, 30), default=30, help="VAD frame length (ms)")
    vad.add_argument("--pre-roll", type=_non_negative, default=0.3, metavar="S",
                     help="audio kept before the detected start of speech, so the first syllable survives (0.3 s)")
    vad.add_argument("--hangover", type=_positive(float), default=0.7, metavar="S",
                     help="silence that ends a turn in hands-free mode; shorter pauses do not (0.7 s)")
    vad.add_argument("--max-utterance", type=_positive(float), default=30.0, metavar="S",
                     help="longest utterance; longer speech is cut into pieces (30 s)")
    out = p.add_argument_group("reply")
    out.add_argument("--speak", action=argparse.BooleanOptionalAction, default=None,
                     help="read answers aloud with espeak-ng, sentence by sentence (default: with a "
                     "microphone when espeak-ng is installed; not for --wav)")
    out.add_argument("--voice", help="espeak-ng voice, e.g. en-us (espeak-ng --voices lists them)")
    out.add_argument("--speed", type=_positive(int), metavar="WPM", help="speaking rate in words per minute")
    out.add_argument("--speak-to", metavar="DIR", help="write the spoken replies to DIR/reply-NNN.wav "
                     "instead of playing them (implies --speak)")
    out.add_argument("--headphones", action="store_true",
                     help="the microphone cannot hear the reply: keep listening while it is spoken, so "
                     "speaking interrupts it (otherwise the microphone is muted while the assistant talks)")
    out.add_argument("--barge-in", action=argparse.BooleanOptionalAction, default=True,
                     help="hands-free: starting to speak stops the answer (default: on)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--max-tokens", type=_positive(int), default=512, metavar="N", help="longest answer (512)")
    gen.add_argument("--temperature", type=_non_negative, default=0.0, help="sampling temperature (0: greedy)")
    gen.add_argument("--tools", action=argparse.BooleanOptionalAction, default=True,
                     help="let the model call the built-in tools: calculator, clock, units, notes (default: on)")
    gen.add_argument("--timings", action=argparse.BooleanOptionalAction, default=True,
                     help="show prefill/first-token/decode figures after each answer (default: on)")
    gen.add_argument("--threads", type=_positive(int), metavar="N", help="CPU threads (default: all)")
    gen.add_argument("--ctx", type=_positive(int), default=4096, metavar="N", help="context length in tokens (4096)")
    return p


# -- the pieces -----------------------------------------------------------------------------

def status(text: str) -> None:
    """Anything that is not the conversation goes to stderr, so stdout is just the dialogue."""
    print(text, file=sys.stderr, flush=True)


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def default_model_dir() -> tuple[Path, str]:
    """The app's model folder and the command that fills it."""
    return model_store.default_model_dir(), model_store.FULL_MODEL_COMMAND


def load_engine(args: argparse.Namespace) -> Engine:
    if args.backend:
        return connect_backend(args)
    from app.engine import (
        LocalEngine,  # imported late: --list-devices and bad input fail fast without it
    )

    if args.model:
        model = Path(args.model).expanduser()
    else:
        model, fetch = default_model_dir()
        if not model.exists():  # the voice assistant never downloads: the app does
            raise Failure(f"no model in the default folder {model}: pass --model DIR (a folder written by "
                          f"`python -m convert`), or fetch and convert it with: {fetch}")
    status(f"loading {model} ...")
    try:
        engine = LocalEngine.load(model, n_ctx=args.ctx, n_threads=args.threads)
    except Exception as err:  # missing folder, unfinished conversion, unreadable GGUF
        raise Failure(f"cannot load the model: {' '.join(str(err).split())}") from None
    if "audio" not in engine.modalities:
        engine.close()
        raise Failure(f"{model} cannot hear: it has no speech encoder. The voice assistant needs a converted "
                      f"Phi-4-multimodal folder (python -m convert CHECKPOINT DIR), not a text-only model.")
    return engine


def connect_backend(args: argparse.Namespace) -> Engine:
    from app.engine_api import EngineError
    from app.remote_engine import RemoteModels, connect

    try:
        models = RemoteModels.parse(args.remote_models) if args.remote_models else None
        engine = connect(args.backend, args.backend_key, models)
    except (EngineError, ValueError) as err:
        raise Failure(str(err)) from None
    if "audio" not in engine.modalities:
        engine.close()
        raise Failure(f"the backend {args.backend} cannot hear: it serves no speech adapter (name it with "
                      f"--remote-models speech=NAME)")
    status(f"using the model {engine.models.text} at {engine.url}")
    return engine


def make_speaker(args: argparse.Namespace, live: bool) -> Speaker | None:
    wanted = args.speak if args.speak is not None else bool(live or args.speak_to)
    if not wanted:
        return None
    if not speech_available():
        status("spoken replies need espeak-ng (Debian/Ubuntu: apt-get install espeak-ng); answering in text only")
        return None
    play = WavWriter(args.speak_to) if args.speak_to else None
    return Speaker(args.voice, args.speed, play=play,
                   on_error=lambda why: status(f"\nspoken replies off: {why}"))


def make_segmenter(args: argparse.Namespace, rate: int, push_to_talk: bool) -> UtteranceSegmenter:
    return UtteranceSegmenter(
        rate, frame_ms=args.frame_ms, aggressiveness=args.aggressiveness, pre_roll_s=args.pre_roll,
        post_roll_s=min(0.3, args.hangover), hangover_s=args.hangover, max_utterance_s=args.max_utterance,
        push_to_talk=push_to_talk)


def say_recording_limit(engine: Engine) -> None:
    from app.conversation import longest_recording_minutes

    minutes = longest_recording_minutes(engine)
    if minutes is not None:
        status(f"at this context ({engine.n_ctx:,} tokens) one turn can hold about {minutes:,.0f} min of speech "
               f"(--ctx sets it)")


def make_assistant(args: argparse.Namespace, engine: Engine, speaker: Speaker | None) -> VoiceAssistant:
    tools: list[Callable[..., Any]] = []
    if args.tools:
        from tools import builtin_tools
        tools = list(builtin_tools().values())
    return VoiceAssistant(engine, tools=tools, max_tokens=args.max_tokens, temperature=args.temperature,
                          speaker=speaker, write=write, show_timings=args.timings)


class KeyPresses:
    """Calls `on_press` for every press of the push-to-talk key, on a thread reading stdin.

    In a terminal, stdin is switched to cbreak mode (single keys, no echo; Ctrl-C still
    works) and restored by `close()`. Elsewhere (a pipe) every line counts as a press.
    End of input (Ctrl-D) calls `on_end`, which by default ends the session like Ctrl-C.
    """

    def __init__(self, key: str, on_press: Callable[[], None], on_end: Callable[[], None] | None = None) -> None:
        named = {"enter": "\n", "return": "\n", "space": " "}
        self.char = named.get(key.lower(), key)
        if len(self.char) != 1:
            raise Failure(f"--key must be enter, space or a single character, got {key!r}")
        self.on_press = on_press
        self.on_end = on_end or _interrupt_main
        self._restore: Callable[[], None] | None = None

    def start(self) -> None:
        read = self._terminal_reader() if sys.stdin.isatty() else self._line_reader
        threading.Thread(target=self._loop, args=(read,), name="PushToTalkKey", daemon=True).start()

    def close(self) -> None:
        if self._restore is not None:
            self._restore()
            self._restore = None

    def _terminal_reader(self) -> Callable[[], str]:
        try:
            import termios
            import tty
        except ImportError:  # Windows
            import msvcrt

            return lambda: msvcrt.getwch().replace("\r", "\n")
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)
        self._restore = lambda: termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        return lambda: sys.stdin.read(1).replace("\r", "\n")

    def _line_reader(self) -> str:
        line = sys.stdin.readline()
        return self.char if line else ""

    def _loop(self, read: Callable[[], str]) -> None:
        while True:
            char = read()
            if char in ("", "\x04"):  # end of input / Ctrl-D
                self.on_end()
                return
            if char == self.char:
                self.on_press()


def _interrupt_main() -> None:
    """Raise KeyboardInterrupt in the main thread, as Ctrl-C would."""
    import _thread

    _thread.interrupt_main()


# -- the two modes --------------------------------------------------------------------------

def run_file(args: argparse.Namespace) -> int:
    try:
        samples, rate = read_audio(args.wav)
    except OSError as err:
        raise Failure(f"cannot read --wav {args.wav}: {err.strerror or err}") from None
    except MediaError as err:  # its message starts with the path
        raise Failure(f"cannot read --wav {err}") from None
    engine = load_engine(args)
    say_recording_limit(engine)
    speaker = make_speaker(args, live=False)
    try:
        assistant = make_assistant(args, engine, speaker)
        # A file has no key to hold: VAD alone finds the turns, as in hands-free mode.
        segmenter = make_segmenter(args, rate, push_to_talk=False)
        status(f"{args.wav}: {len(samples) / rate:.1f} s at {rate} Hz")
        turns = answer_recording(assistant, samples, rate, segmenter)
        if speaker is not None:
            speaker.wait()
    finally:
        if speaker is not None:
            speaker.close()
        engine.close()
    if not turns:
        status(f"no speech found in {args.wav}")
        return 1
    status(f"{len(turns)} utterance(s) answered")
    return 0


def run_live(args: argparse.Namespace) -> int:
    try:
        capture = open_microphone(args.device)
    except MicrophoneUnavailable as err:
        raise Failure(f"no microphone: {err}. To answer a recording instead: {PROG} --wav FILE") from None
    push_to_talk = args.mode == "ptt"
    keys = KeyPresses(args.key, lambda: None) if push_to_talk else None  # checks --key before the model loads
    engine = load_engine(args)
    say_recording_limit(engine)
    speaker = make_speaker(args, live=True)
    try:
        assistant = make_assistant(args, engine, speaker)
        segmenter = make_segmenter(args, capture.samplerate, push_to_talk)
        listener = Listener(assistant, capture, segmenter, barge_in=args.barge_in,
                            listen_while_speaking=args.headphones, on_status=status)
        try:
            show_inputs(chosen=capture.device)
        except MicrophoneUnavailable:
            pass  # the stream opened anyway (an injected one): nothing to list
        status(f"listening at {capture.samplerate} Hz (resampled to 16 kHz). Ctrl-C quits.")
        if keys is not None:
            keys.on_press = listener.press
            key_name = {"\n": "Enter", " ": "Space"}.get(keys.char, repr(keys.char))
            status(f"push-to-talk: press {key_name} to start talking and {key_name} again to stop.")
            keys.start()
        else:
            status(f"hands-free: just speak; {args.hangover:.1f} s of silence ends your turn.")
            if speaker is not None and not args.headphones:
                status("the microphone is off while the reply is spoken (it would hear itself); "
                       "with headphones, --headphones lets you interrupt it by speaking.")
        try:
            listener.run()
        except KeyboardInterrupt:
            status("\nbye")
    finally:
        if keys is not None:
            keys.close()
        if speaker is not None:
            speaker.close()
        engine.close()
    return 0


def show_inputs(chosen: int | None = None, out: Callable[[str], None] = status) -> None:
    """The input devices, one a line; `chosen` (or else the default) is marked with '>'."""
    for d in list_input_devices():
        mark = ">" if (d.index == chosen if chosen is not None else d.is_default) else " "
        default = ", default" if d.is_default else ""
        out(f"{mark} {d.index}: {d.name} ({d.max_channels} ch, {d.default_samplerate} Hz, {d.hostapi}{default})")


def list_devices() -> int:
    try:
        if not list_input_devices():
            raise Failure(f"no microphone found (no audio input device). "
                          f"To answer a recording instead: {PROG} --wav FILE")
        show_inputs(out=print)
    except MicrophoneUnavailable as err:
        raise Failure(f"no microphone: {err}") from None
    print("choose one with --device INDEX or --device NAME")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.list_devices:
            return list_devices()
        return run_file(args) if args.wav else run_live(args)
    except Failure as err:
        status(f"{PROG}: {err}")
        return 2
    except KeyboardInterrupt:
        status("\ninterrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
