"""Voice front end: microphone -> 16 kHz frames -> VAD -> utterances for the model.

    capture = open_microphone()                      # or MicrophoneCapture(rate, stream_factory=...)
    segmenter = UtteranceSegmenter(capture.samplerate)
    with capture:
        for utterance in stream_utterances(capture.blocks(), segmenter):
            ...                                      # utterance.samples: 16 kHz mono float32

Nothing here needs a real device: `FakeInputStream` plays a recording through the same
callback path, and the segmenter takes plain numpy blocks.
"""
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

__all__ = [
    "FakeInputStream",
    "InputDevice",
    "MicrophoneCapture",
    "MicrophoneUnavailable",
    "Utterance",
    "UtteranceSegmenter",
    "find_input_device",
    "list_input_devices",
    "open_microphone",
    "segment_clip",
    "stream_utterances",
]
