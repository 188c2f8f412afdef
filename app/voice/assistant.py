"""The voice assistant: utterances in, streamed (and optionally spoken) answers out.

    assistant = VoiceAssistant(engine, tools=[...], speaker=Speaker(), write=print_piece)
    answer_recording(assistant, samples, rate, UtteranceSegmenter(rate))      # a file
    Listener(assistant, capture, UtteranceSegmenter(capture.samplerate)).run()  # a microphone

The model hears the audio itself (Phi-4-multimodal's speech LoRA): there is no separate
speech-to-text step. Each utterance is one user turn of an `Agent` conversation, so context
and tools carry across turns, and a turn that reuses the previous ones prefills only its new
tokens. Barge-in: `interrupt()` (speech heard, or the push-to-talk key pressed) stops the
answer at the next token and silences the speaker; what was said so far stays in the
conversation, so "no, I meant..." has something to refer to.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from app.agents import Agent, FinalAnswer, TextDelta, ToolCallEvent, ToolResultEvent, ToolStep
from app.engine import ContextFull, EngineError
from app.prompt import PromptError
from model.audio_io import MODEL_SAMPLE_RATE

from .capture import MicrophoneCapture
from .segmenter import Utterance, UtteranceSegmenter, stream_utterances
from .speaker import SentenceSplitter, Speaker

VOICE_SYSTEM = (
    "You are a helpful voice assistant running on the user's own computer. The user talks to you "
    "and hears your reply read aloud: answer briefly, in plain spoken sentences, without markdown, "
    "tables or code unless asked."
)
# Sent with every utterance: the audio alone does not say whether to transcribe, translate or answer it.
SPOKEN_TURN = "Reply to what I said in the audio."

Writer = Callable[[str], None]


@dataclass
class Turn:
    """One utterance and the answer to it."""

    utterance: Utterance
    text: str  # what the assistant wrote (up to the interruption, if any)
    interrupted: bool = False
    steps: list[ToolStep] = field(default_factory=list)
    timings: Any = None  # the engine's `last` Timings after the turn, where it has them
    error: str | None = None  # why the engine could not answer (the turn has no text then)


class VoiceAssistant:
    """Answers utterances one at a time, keeping the conversation; see the module docstring."""

    def __init__(
        self,
        engine: Any,
        *,
        tools: Sequence[Callable[..., Any]] = (),
        system: str | None = VOICE_SYSTEM,
        instruction: str | None = SPOKEN_TURN,
        max_tokens: int = 512,
        temperature: float = 0.0,
        speaker: Speaker | None = None,
        write: Writer | None = None,
        show_timings: bool = False,
    ) -> None:
        self.engine = engine
        self.agent = Agent(engine, tools=tools, system=system, max_tokens=max_tokens, temperature=temperature)
        self.instruction = instruction
        self.speaker = speaker
        self.write = write or (lambda text: None)
        self.show_timings = show_timings
        self.turns: list[Turn] = []
        # One lock makes "not interrupted? then show/say this" atomic against interrupt():
        # nothing is printed or spoken after the barge-in that stopped the answer.
        self._lock = threading.Lock()
        self._interrupted = threading.Event()
        self._busy = False

    @property
    def busy(self) -> bool:
        """True while an answer is being generated."""
        return self._busy

    def interrupt(self) -> bool:
        """Barge-in: stop the answer being generated and anything being spoken.

        Safe from any thread. Returns True if an answer was running.
        """
        with self._lock:
            if self._busy:
                self._interrupted.set()
            if self.speaker is not None:
                self.speaker.stop()
            return self._busy

    def reset(self) -> None:
        """Forget the conversation (tools and system prompt stay)."""
        self.agent.reset()
        self.turns.clear()

    def prompt(self, utterance: Utterance) -> dict[str, Any]:
        """The user message for an utterance: its audio, and the instruction to answer it."""
        content: list[dict[str, Any]] = [{"type": "audio", "audio": (utterance.samples, MODEL_SAMPLE_RATE)}]
        if self.instruction:
            content.append({"type": "text", "text": self.instruction})
        return {"role": "user", "content": content}

    def answer(self, utterance: Utterance) -> Turn:
        """Answer one utterance: stream the text to `write`, speak finished sentences.

        Returns when the answer is complete or `interrupt()` stopped it (the speaker may
        still be reading the last sentences out). A request the engine refuses becomes a
        turn with `error` set, so a live session goes on listening.
        """
        speech_s = utterance.speech_end_s - utterance.speech_start_s
        self.write(f"\nyou: [{speech_s:.1f} s of speech at {utterance.speech_start_s:.1f} s]\nassistant: ")
        prompt = self.prompt(utterance)
        try:
            try:
                text, steps, interrupted = self._stream(prompt)
            except ContextFull:
                if len(self.agent.messages) <= 1:
                    raise  # nothing earlier to forget: this utterance alone is too long
                # Forget the earlier turns rather than stop talking.
                self.write("[the conversation no longer fits in the context: starting afresh] ")
                self.agent.reset()
                text, steps, interrupted = self._stream(prompt)
        except (EngineError, PromptError) as err:
            self.write(f"[cannot answer: {err}]\n")
            turn = Turn(utterance, "", error=str(err))
            self.turns.append(turn)
            return turn
        if interrupted:
            # The agent took the unfinished turn out; keep the question and what was said of the
            # answer, so the next utterance can refer to them.
            self.agent.messages += [prompt, {"role": "assistant", "content": text.strip()}]
            self.write(" [interrupted]\n")
        else:
            self.write("\n")
        turn = Turn(utterance, text, interrupted, steps, getattr(self.engine, "last", None))
        if self.show_timings and turn.timings is not None and not interrupted:
            self.write(f"  ({describe_timings(turn.timings)})\n")
        self.turns.append(turn)
        return turn

    def _stream(self, prompt: dict[str, Any]) -> tuple[str, list[ToolStep], bool]:
        """One agent turn, shown and spoken as it streams: (text, tool steps, interrupted)."""
        splitter = SentenceSplitter()
        shown: list[str] = []
        steps: list[ToolStep] = []
        with self._lock:
            self._interrupted.clear()
            self._busy = True
        events = self.agent.stream(prompt)
        stopped = False  # left before the agent's FinalAnswer (it then drops the turn)
        try:
            for event in events:
                with self._lock:
                    if self._interrupted.is_set():
                        stopped = True
                        break
                    if isinstance(event, TextDelta):
                        self.write(event.text)
                        shown.append(event.text)
                        self._say(splitter.push(event.text))
                    elif isinstance(event, ToolCallEvent):
                        args = ", ".join(f"{k}={v!r}" for k, v in event.arguments.items())
                        self.write(f"\n  [tool] {event.name}({args})")
                    elif isinstance(event, ToolResultEvent):
                        self.write(f" -> {event.result if event.error is None else 'error: ' + event.error}\n")
                    elif isinstance(event, FinalAnswer) and event.result is not None:
                        steps = event.result.steps
        finally:
            events.close()  # stops the engine at once if we left early
            with self._lock:
                self._busy = False
                if not self._interrupted.is_set():  # a barge-in after the last word silences it too
                    self._say(splitter.flush())
        return "".join(shown), steps, stopped

    def _say(self, sentences: list[str]) -> None:
        if self.speaker is not None:
            for sentence in sentences:
                self.speaker.say(sentence)


def describe_timings(t: Any) -> str:
    """One line of what the last request cost (the engine's Timings)."""
    new = t.prompt_tokens - t.reused_tokens
    return (f"{new} new prompt tokens ({t.reused_tokens} reused), speech encoder {t.encoder_ms:.0f} ms, "
            f"first token {t.ttft_ms:.0f} ms, {t.decode_tokens} tokens at {t.decode_tokens_per_s:.1f}/s")


# -- the two ways in: a recording, a microphone -------------------------------------------

def answer_recording(assistant: VoiceAssistant, samples: np.ndarray, rate: int,
                     segmenter: UtteranceSegmenter, block_ms: int = 30) -> list[Turn]:
    """Run a whole recording through the segmenter in microphone-sized blocks and answer
    each utterance as it ends (the file is not played in real time, so no barge-in)."""
    block = max(1, rate * block_ms // 1000)
    turns = []
    for pos in range(0, len(samples), block):
        for utterance in segmenter.feed(samples[pos:pos + block]):
            turns.append(assistant.answer(utterance))
    for utterance in segmenter.flush():
        turns.append(assistant.answer(utterance))
    return turns


class Listener:
    """The live loop: microphone -> segmenter on a thread of its own -> utterances -> answers.

    The segmenter keeps listening while an answer is generated, which is what makes barge-in
    possible: speech starting (hands-free) or the key (push-to-talk) interrupts the answer.
    Unless `listen_while_speaking` (headphones: the microphone cannot hear the reply), the
    segmenter is muted while the speaker talks, so the assistant does not answer itself.
    """

    def __init__(
        self,
        assistant: VoiceAssistant,
        capture: MicrophoneCapture,
        segmenter: UtteranceSegmenter,
        *,
        barge_in: bool = True,
        listen_while_speaking: bool = False,
        on_status: Writer | None = None,
    ) -> None:
        self.assistant = assistant
        self.capture = capture
        self.segmenter = segmenter
        self.barge_in = barge_in
        self.on_status = on_status or (lambda text: None)
        self._utterances: queue.Queue[Utterance | None] = queue.Queue()
        segmenter.on_speech_start = self._speech_started
        speaker = assistant.speaker
        if speaker is not None and not listen_while_speaking:
            speaker.on_start, speaker.on_idle = segmenter.mute, segmenter.unmute

    def run(self) -> list[Turn]:
        """Answer utterances until the input ends (a recording played as a microphone, or
        `capture.stop()`); Ctrl-C propagates after the microphone is closed."""
        turns = []
        pump = threading.Thread(target=self._pump, name="VoiceInput", daemon=True)
        with self.capture:
            pump.start()
            while (utterance := self._utterances.get()) is not None:
                turns.append(self.assistant.answer(utterance))
        pump.join(timeout=5)
        return turns

    def press(self) -> None:
        """Push-to-talk key: the first press starts an utterance (and interrupts the answer),
        the next one ends it."""
        if self.segmenter.key_down:
            utterances = self.segmenter.stop()
            for utterance in utterances:
                self._utterances.put(utterance)
            self.on_status("(thinking...)" if utterances else "(no speech heard)")
        else:
            self.assistant.interrupt()
            self.segmenter.unmute()  # the speaker's own unmute may come a moment later
            self.segmenter.start()
            self.on_status("(recording... press again to stop)")

    def _pump(self) -> None:
        try:
            for utterance in stream_utterances(self.capture.blocks(), self.segmenter):
                self._utterances.put(utterance)
        finally:
            self._utterances.put(None)

    def _speech_started(self, onset_s: float) -> None:
        # Runs on the input thread, inside the segmenter's lock: quick things only.
        if self.barge_in and not self.segmenter.push_to_talk:
            self.assistant.interrupt()
