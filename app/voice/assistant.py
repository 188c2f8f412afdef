"""The voice assistant: utterances in, streamed (and optionally spoken) answers out.

    assistant = VoiceAssistant(engine, tools=[...], speaker=Speaker(), write=print_piece)
    answer_recording(assistant, samples, rate, UtteranceSegmenter(rate))      # a file
    Listener(assistant, capture, UtteranceSegmenter(capture.samplerate)).run()  # a microphone

The model hears the audio itself (Phi-4-multimodal's speech LoRA): there is no separate
speech-to-text step. Each utterance is one turn of a Conversation (app/conversation.py), the
same core the web page runs on, so context and tools carry across turns, and a turn that reuses
the previous ones prefills only its new tokens. Barge-in: `interrupt()` (speech heard, or the
push-to-talk key pressed) stops the answer at the next token and silences the speaker; what was
said so far stays in the conversation, so "no, I meant..." has something to refer to.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Callable, Sequence

import numpy as np

from app.agents import Event, FinalAnswer, TextDelta, ToolCallEvent, ToolResultEvent
from app.agents.schema import tool_from_function
from app.conversation import Attachment, Conversation, Settings, Turn, format_usage
from app.engine_api import AUDIO, Engine
from model.audio_io import MODEL_SAMPLE_RATE

from .capture import MicrophoneCapture
from .segmenter import Utterance, UtteranceSegmenter, stream_utterances
from app.speech_out import SentenceSplitter, Speaker

VOICE_SYSTEM = (
    "You are a helpful voice assistant running on the user's own computer. The user talks to you "
    "and hears your reply read aloud: answer briefly, in plain spoken sentences, without markdown, "
    "tables or code unless asked."
)
# Sent with every utterance: the audio alone does not say whether to transcribe, translate or answer it.
SPOKEN_TURN = "Reply to what I said in the audio."

Writer = Callable[[str], None]


class VoiceAssistant:
    """Answers utterances one at a time, keeping the conversation; see the module docstring."""

    def __init__(
        self,
        engine: Engine,
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
        named = {tool_from_function(fn).name: fn for fn in tools}
        settings = Settings(system=system or "", max_tokens=max_tokens, temperature=temperature,
                            tools=list(named), max_tool_calls=10)
        self.conversation = Conversation(engine, named, settings)
        self.instruction = instruction
        self.speaker = speaker
        self.write = write or (lambda text: None)
        self.show_timings = show_timings
        self.heard: list[Utterance] = []  # the utterance of each turn, in order
        # One lock makes "not interrupted? then show/say this" atomic against interrupt():
        # nothing is printed or spoken after the barge-in that stopped the answer.
        self._lock = threading.Lock()
        self._interrupted = threading.Event()

    @property
    def turns(self) -> list[Turn]:
        return self.conversation.turns

    @property
    def busy(self) -> bool:
        """True while an answer is being generated."""
        return self.conversation.busy

    def interrupt(self) -> bool:
        """Barge-in: stop the answer being generated and anything being spoken.

        Safe from any thread. Returns True if an answer was running.
        """
        with self._lock:
            running = self.conversation.stop()
            if running:
                self._interrupted.set()
            if self.speaker is not None:
                self.speaker.stop()
            return running

    def reset(self) -> None:
        """Forget the conversation (tools and system prompt stay)."""
        conversation = self.conversation
        self.conversation = Conversation(conversation.engine, conversation.tools, conversation.settings)
        self.heard.clear()

    def answer(self, utterance: Utterance) -> Turn:
        """Answer one utterance: stream the text to `write`, speak finished sentences.

        Returns when the answer is complete or `interrupt()` stopped it (the speaker may
        still be reading the last sentences out). A request the engine refuses becomes a
        turn with `error` set, so a live session goes on listening.
        """
        speech_s = utterance.speech_end_s - utterance.speech_start_s
        self.write(f"\nyou: [{speech_s:.1f} s of speech at {utterance.speech_start_s:.1f} s]\nassistant: ")
        self.heard.append(utterance)
        with self._lock:
            self._interrupted.clear()
            self.conversation.add(self.instruction or "", [Attachment(AUDIO, data=(utterance.samples,
                                                                                   MODEL_SAMPLE_RATE))])
        final = self._show(self.conversation.answer())
        if final.result is not None and final.result.stop_reason == "context_full" and len(self.turns) > 1:
            # Forget the earlier turns rather than stop talking.
            self.write("[the conversation no longer fits in the context: starting afresh] ")
            self.conversation.forget_earlier()
            self.heard[:] = self.heard[-1:]
            self.conversation.retry()
            final = self._show(self.conversation.answer())
        turn = self.turns[-1]
        if turn.error:
            self.write(f"[cannot answer: {turn.error}]\n")
        elif turn.stopped:
            self.write(" [interrupted]\n")
        else:
            self.write("\n")
            if self.show_timings and turn.usage is not None:
                self.write(f"  ({format_usage(turn.usage)})\n")
        return turn

    def _show(self, events: Any) -> FinalAnswer:
        """Write and speak one answer as it streams; return its FinalAnswer."""
        splitter = SentenceSplitter()
        final = None
        for event in events:
            with self._lock:
                if isinstance(event, FinalAnswer):
                    final = event
                elif not self._interrupted.is_set():
                    self._show_event(event, splitter)
        with self._lock:
            if not self._interrupted.is_set():  # a barge-in after the last word silences it too
                self._say(splitter.flush())
        assert final is not None  # the conversation always ends an answer with a FinalAnswer
        return final

    def _show_event(self, event: Event, splitter: SentenceSplitter) -> None:
        if isinstance(event, TextDelta):
            self.write(event.text)
            self._say(splitter.push(event.text))
        elif isinstance(event, ToolCallEvent):
            args = ", ".join(f"{k}={v!r}" for k, v in event.arguments.items())
            self.write(f"\n  [tool] {event.name}({args})")
        elif isinstance(event, ToolResultEvent):
            self.write(f" -> {event.result if event.error is None else 'error: ' + event.error}\n")

    def _say(self, sentences: list[str]) -> None:
        if self.speaker is not None:
            for sentence in sentences:
                self.speaker.say(sentence)


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
