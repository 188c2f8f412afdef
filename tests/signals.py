"""Test inputs shared by the tests and the benchmarks: speech-like clips, photo-like images and
image files (encoded, or forged PNG headers)."""
from __future__ import annotations

import io
import struct
import zlib

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


def voiced(seconds: float, rate: int = 16_000, seed: int = 0, level: float = 0.3) -> np.ndarray:
    """Voiced harmonics (a 150 Hz voice with formant-like peaks) at a syllable rate, with short
    pauses: what voice activity detection takes for speech (speech_like's steady tone is not).
    float64 in [-1, 1]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    f0 = 150 * (1 + 0.05 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase + rng.uniform(0, 6)) * (1.5 if 500 < 150 * k < 900 or 1100 < 150 * k < 1500 else 0.4)
                / k ** 0.5 for k in range(1, 20) if 150 * k < rate / 2)
    envelope = np.clip(np.sin(2 * np.pi * 3.5 * t), 0, None) ** 0.5
    x = voice * envelope + 0.01 * rng.standard_normal(len(t))
    return level * x / np.abs(x).max()


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    """The image as a file of format `fmt` (Pillow's name: "PNG", "JPEG", ...)."""
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A ~100-byte PNG that declares a huge 8-bit RGB image (its pixel data is a few zero rows):
    a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
