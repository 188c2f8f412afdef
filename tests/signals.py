"""Test inputs shared by the tests and the benchmarks: speech-like clips and photo-like images."""
from __future__ import annotations

import numpy as np
from PIL import Image


def speechlike(n: int, seed: int = 0, rate: int = 16000) -> np.ndarray:
    """(n,) float32: noise + a few tones with a slow envelope, peak ~0.5: exercises the whole mel range."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    x = 0.05 * rng.standard_normal(n)
    for f in (180.0, 440.0, 1250.0, 3100.0, 6800.0):
        x += 0.08 * np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) * (1 + np.sin(2 * np.pi * 1.3 * t + f))
    return x.astype(np.float32)


def random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients plus noise: exercises the resize more than pure noise would."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([127 + 100 * np.sin(x / 23 + c) * np.cos(y / 17 - c) for c in range(3)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth pattern with noise (the whole-model tests' image)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([127 + 100 * np.sin(x / 23 + c) * np.cos(y / 17 - c) for c in range(3)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8))


def speech_like(seconds: float, seed: int = 0, rate: int = 16_000) -> np.ndarray:
    """A few harmonics with a syllable-rate envelope and a little noise: not silence, not white noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tone = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) / k for k, f in enumerate((180, 360, 720, 1500), 1))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    return (0.2 * tone * envelope + 0.01 * rng.standard_normal(len(t))).astype(np.float32)
