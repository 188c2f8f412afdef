"""Voice front end: microphone -> 16 kHz frames -> VAD -> utterances for the model.

    capture = open_microphone()                      # or MicrophoneCapture(rate, stream_factory=...)
    segmenter = UtteranceSegmenter(capture.samplerate)
    with capture:
        for utterance in stream_utterances(capture.blocks(), segmenter):
            ...                                      # utterance.samples: 16 kHz mono float32

Nothing here needs a real device: `FakeInputStream` plays a recording through the same
callback path, and the segmenter takes plain numpy blocks.

On top of it, the assistant (`python -m app.voice`): `VoiceAssistant` answers utterances with
the model and keeps the conversation, `Listener` runs it live with barge-in, `Speaker` reads
the answers aloud (espeak-ng), `read_wav` reads recordings.
"""
from .assistant import Listener, Turn, VoiceAssistant, answer_recording
from .capture import (
    InputDevice,
    MicrophoneCapture,
    MicrophoneUnavailable,
    find_input_device,
    list_input_devices,
    open_microphone,
)
from .fake_stream import FakeInputStream
from .segmenter import Utterance, UtteranceSegmenter, segment_clip, stream_utterances
from .speaker import SentenceSplitter, Speaker
from .wav_file import WavError, read_wav

__all__ = [
    "FakeInputStream",
    "InputDevice",
    "Listener",
    "MicrophoneCapture",
    "MicrophoneUnavailable",
    "SentenceSplitter",
    "Speaker",
    "Turn",
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
