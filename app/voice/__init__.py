"""The voice assistant in the terminal (`python -m app.voice`), in two parts.

Audio in: microphone -> 16 kHz frames -> VAD -> utterances for the model (`capture`,
`stream_resample`, `segmenter`):

    capture = open_microphone()                      # or MicrophoneCapture(rate, stream_factory=...)
    segmenter = UtteranceSegmenter(capture.samplerate)
    with capture:
        for utterance in stream_utterances(capture.blocks(), segmenter):
            ...                                      # utterance.samples: 16 kHz mono float32

Nothing there needs a real device: the capture takes any stream factory with the sounddevice
callback contract, and the segmenter takes plain numpy blocks.

The voice app (`assistant`, `__main__`): `VoiceAssistant` answers utterances on the conversation
core (app/conversation.py), `Listener` runs it live with barge-in. Speech out, shared with the web
page, is app/speech_out.py (`Speaker` reads answers aloud with espeak-ng); recordings are read by
app/media.py.
"""
from app.media import WavError, read_wav
from app.speech_out import SentenceSplitter, Speaker

from .assistant import Listener, VoiceAssistant, answer_recording
from .capture import (
    InputDevice,
    MicrophoneCapture,
    MicrophoneUnavailable,
    find_input_device,
    list_input_devices,
    open_microphone,
)
from .segmenter import Utterance, UtteranceSegmenter, segment_clip, stream_utterances

__all__ = [
    "InputDevice",
    "Listener",
    "MicrophoneCapture",
    "MicrophoneUnavailable",
    "SentenceSplitter",
    "Speaker",
    "Utterance",
    "UtteranceSegmenter",
    "VoiceAssistant",
    "WavError",
    "answer_recording",
    "find_input_device",
    "list_input_devices",
    "open_microphone",
    "read_wav",
    "segment_clip",
    "stream_utterances",
]
