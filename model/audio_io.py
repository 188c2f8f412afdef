"""Bring any audio the user gives (file or microphone) to the model's 16 kHz mono float32."""
from __future__ import annotations

import numpy as np
import soxr

MODEL_SAMPLE_RATE = 16_000

# At most this many channels is taken for channels-first data (see `to_mono`): 7.1 sound.
MAX_CHANNELS_FIRST = 8


def to_mono(samples: np.ndarray) -> np.ndarray:
    """(n,) or (n, channels) -> (n,) float32, the channels averaged.

    Integer PCM is scaled to [-1, 1): signed by 2^(bits-1); unsigned (8-bit PCM is unsigned,
    centred on 128) centred first, (x - 2^(bits-1)) / 2^(bits-1). Float samples are kept as
    they are (not clipped). An array shaped (channels, n) with at most 8 channels and more than
    8 samples, e.g. (2, 48000), is channels-first (as librosa and torchaudio give audio) and is
    transposed; when both sides are 8 or less the shape is ambiguous and read as (n, channels).

    ValueError for NaN or infinite samples (the speech encoder would carry them into every later
    frame), for bool, complex, object or other non-numeric arrays, and for other shapes.
    """
    x = np.asarray(samples)
    kind = x.dtype.kind
    if kind == "i":
        x = x.astype(np.float32) / float(np.iinfo(x.dtype).max + 1)
    elif kind == "u":
        half = float(np.iinfo(x.dtype).max // 2 + 1)
        x = (x.astype(np.float32) - half) / half
    elif kind != "f":
        what = {"b": "bool", "c": "complex", "O": "object"}.get(kind, str(x.dtype))
        raise ValueError(f"audio samples must be integer PCM or float, got a {what} array")
    if x.ndim == 2 and x.shape[0] <= MAX_CHANNELS_FIRST < x.shape[1]:
        x = x.T  # channels-first
    if x.ndim not in (1, 2):
        raise ValueError(f"audio must be (samples,) or (samples, channels), got shape {x.shape}")
    # Checked after the conversion and the mix, so that float64 values beyond float32's range
    # and sums that overflow are caught as well (hence no overflow warnings on the way).
    with np.errstate(over="ignore", invalid="ignore"):
        x = x.astype(np.float32, copy=False)
        if x.ndim == 2:
            x = x.mean(axis=1)
    if not np.isfinite(x).all():
        raise ValueError("the audio holds NaN or infinite samples")
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
