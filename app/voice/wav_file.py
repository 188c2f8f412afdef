"""Read WAV files with the standard library only: 8/16/24/32-bit PCM and 32/64-bit float, any
channel count, plain or WAVE_FORMAT_EXTENSIBLE headers.

The stdlib `wave` module reads neither float nor (before Python 3.12) extensible files, and
soundfile is not a dependency, so the RIFF chunks are walked here. A data chunk whose size is
unknown (espeak-ng `--stdout` and other writers to a pipe put 0xFFFFFFFF-ish values there)
runs to the end of the file.
"""
from __future__ import annotations

import os
import struct

import numpy as np

PCM, IEEE_FLOAT, EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
CONVERT_HINT = "convert it first, e.g.: sox IN.wav -b 16 -e signed-integer OUT.wav"


class WavError(ValueError):
    """The file is not a WAV file this reader understands; the message says why."""


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """(samples, rate): float32 in [-1, 1], shape (n,) for mono or (n, channels)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return parse_wav(data)
    except WavError as err:
        raise WavError(f"{os.fspath(path)}: {err}") from None


def parse_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Like `read_wav`, for the bytes of a WAV file."""
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        raise WavError("not a WAV file (no RIFF/WAVE header)")
    if data[:4] == b"RIFX":
        raise WavError(f"big-endian WAV (RIFX) is not supported; {CONVERT_HINT}")
    fmt, pcm = None, None
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if chunk == b"fmt ":
            fmt = data[body:body + size]
        elif chunk == b"data":
            pcm = data[body:min(body + size, len(data))]  # an unknown/overlong size: to the end
            if fmt is not None:
                break
        pos = body + size + (size & 1)  # chunks are padded to an even length
    if fmt is None or len(fmt) < 16:
        raise WavError("no format chunk")
    if pcm is None:
        raise WavError("no data chunk")
    tag, channels, rate, _, block_align, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == EXTENSIBLE and len(fmt) >= 26:
        # The sub-format GUID starts with the plain tag; samples fill `bits` whatever the
        # valid-bits field says (the unused low bits are zero).
        tag = struct.unpack_from("<H", fmt, 24)[0]
    if channels < 1 or rate < 1:
        raise WavError(f"bad header: {channels} channel(s) at {rate} Hz")
    width = bits // 8
    if bits % 8 or block_align != width * channels:
        raise WavError(f"bad header: {bits}-bit samples in {block_align}-byte frames of {channels} channel(s)")
    usable = len(pcm) - len(pcm) % block_align  # a truncated last frame is dropped
    samples = _decode(pcm[:usable], tag, width)
    samples = samples.reshape(-1, channels)
    return (samples[:, 0] if channels == 1 else samples), int(rate)


def _decode(raw: bytes, tag: int, width: int) -> np.ndarray:
    """Interleaved samples as float32 in [-1, 1]."""
    if tag == IEEE_FLOAT and width in (4, 8):
        return np.frombuffer(raw, f"<f{width}").astype(np.float32)
    if tag != PCM:
        raise WavError(f"compressed or unusual WAV encoding (format tag 0x{tag:04x}); {CONVERT_HINT}")
    if width == 1:  # 8-bit WAV is unsigned, centred on 128
        return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    if width in (2, 4):
        return np.frombuffer(raw, f"<i{width}").astype(np.float32) / float(2 ** (8 * width - 1))
    if width == 3:  # no numpy int24: place the 3 bytes in the top of an int32
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        values = (b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)
        return values.astype(np.float32) / float(2 ** 31)
    raise WavError(f"{8 * width}-bit PCM is not supported; {CONVERT_HINT}")
