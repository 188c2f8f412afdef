"""Bring any audio the user gives (file or microphone) to the model's 16 kHz mono float32."""
from __future__ import annotations

import numpy as np
import soxr

MODEL_SAMPLE_RATE = 16_000


def to_mono(samples: np.ndarray) -> np.ndarray:
    """(n,) or (n, channels) -> (n,) float32 in [-1, 1]; integer PCM is scaled."""
    x = np.asarray(samples)
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
    x = x.astype(np.float32, copy=False)
    if x.ndim == 2:
        x = x.mean(axis=1)
    if x.ndim != 1:
        raise ValueError(f"audio must be (samples,) or (samples, channels), got shape {x.shape}")
    return x


def resample(samples: np.ndarray, rate: int, target: int = MODEL_SAMPLE_RATE) -> np.ndarray:
    """High-quality resampling (libsoxr) of a mono float32 signal."""
    if rate <= 0:
        raise ValueError(f"sample rate must be positive, got {rate}")
    if rate == target:
        return samples.astype(np.float32, copy=False)
    return soxr.resample(samples, rate, target, quality="HQ").astype(np.float32, copy=False)


def to_model_audio(samples: np.ndarray, rate: int) -> np.ndarray:
    """Mono mix then resample to 16 kHz: what the speech encoder takes."""
    return resample(to_mono(samples), rate)
