"""Streaming conversion of microphone blocks to the model's 16 kHz mono float32.

`model.audio_io.resample` is one-shot: calling it per block would zero-pad every block
edge (clicks) and round every block's length (timestamps drift). libsoxr's stream
resampler keeps its filter state between blocks, so the concatenated output equals the
one-shot result of the whole signal, sample for sample.
"""
from __future__ import annotations

import numpy as np
import soxr

from model.audio_io import MODEL_SAMPLE_RATE, to_mono


class StreamResampler:
    """Feed blocks at `rate` (any channel count, float or integer PCM); get 16 kHz mono."""

    def __init__(self, rate: int, target: int = MODEL_SAMPLE_RATE) -> None:
        if rate <= 0:
            raise ValueError(f"sample rate must be positive, got {rate}")
        self.rate = int(rate)
        self.target = int(target)
        # Same quality as audio_io.resample, so file input and live input sound alike.
        self._soxr = (
            None if self.rate == self.target
            else soxr.ResampleStream(self.rate, self.target, 1, dtype="float32", quality="HQ")
        )

    def push(self, block: np.ndarray) -> np.ndarray:
        """Resample one block; the output may lag the input by the filter's delay."""
        mono = to_mono(block)
        if self._soxr is None:
            return mono
        return self._soxr.resample_chunk(mono, last=False)

    def flush(self) -> np.ndarray:
        """End of stream: whatever the filter still holds."""
        if self._soxr is None:
            return np.zeros(0, np.float32)
        return self._soxr.resample_chunk(np.zeros(0, np.float32), last=True)
