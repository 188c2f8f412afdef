"""app/media.py: images and audio from paths and bytes, and the clear errors for bad data.

Every input is made here (Pillow, numpy, soundfile); nothing is downloaded.
"""
from __future__ import annotations

import io
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image, ImageFile

from app import media
from app.media import (
    MediaError,
    WavError,
    audio_duration,
    image_size,
    load_audio_file,
    load_image_file,
    read_audio,
    read_image,
    read_wav,
)


RATE = 16_000


@pytest.fixture(autouse=True)
def _fresh_caches():
    media.clear_caches()
    yield
    media.clear_caches()


# -- material ---------------------------------------------------------------------------------

def picture(mode: str = "RGB", size: tuple[int, int] = (64, 48)) -> Image.Image:
    """Noise, so that compressed files are big enough to cut in half meaningfully."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that declares a huge 8-bit RGB image: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def tone(channels: int = 2, n: int = 1600) -> np.ndarray:
    """(n, channels) float32 test signal, one sine per channel, within [-0.5, 0.5]."""
    t = np.arange(n) / RATE
    return np.stack([0.5 * np.sin(2 * np.pi * (300 + 140 * c) * t) for c in range(channels)], 1).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int, encoding: str, extensible: bool = False,
              channels: int | None = None) -> bytes:
    """A WAV file written with numpy: encoding is u8, s16, s24, s32, f32 or f64."""
    x = samples if samples.ndim == 2 else samples[:, None]
    kind, bits = encoding[0], int(encoding[1:])
    if kind == "f":
        raw, tag = x.astype(f"<f{bits // 8}").tobytes(), 3
    else:
        full = 2.0 ** (bits - 1)
        ints = np.clip(np.round(x.astype(np.float64) * full), -full, full - 1).astype("<i4")
        if bits == 8:
            raw = (ints + 128).astype(np.uint8).tobytes()
        else:  # the top bytes of each little-endian int32
            raw = (ints << (32 - bits)).view(np.uint8).reshape(-1, 4)[:, 4 - bits // 8:].tobytes()
        tag = 1
    channels = x.shape[1] if channels is None else channels
    align = channels * bits // 8
    fmt = struct.pack("<HHIIHH", 0xFFFE if extensible else tag, channels, rate, rate * align, align, bits)
    if extensible:  # cbSize, valid bits, channel mask, then the sub-format GUID (its first 2 bytes: the tag)
        fmt += struct.pack("<HHIH", 22, bits, 0, tag) + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(raw)) + raw
    return b"RIFF" + struct.pack("<I", len(body)) + body


def sound_bytes(samples: np.ndarray, fmt: str, subtype: str | None = None) -> bytes:
    out = io.BytesIO()
    soundfile.write(out, samples, RATE, format=fmt, subtype=subtype)
    return out.getvalue()


def open_fds_to(path: Path) -> int:
    return sum(os.path.realpath(f"/proc/self/fd/{fd}") == str(path.resolve()) for fd in os.listdir("/proc/self/fd"))


# -- images -----------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,mode,lossless", [("PNG", "RGB", True), ("PNG", "RGBA", True), ("JPEG", "RGB", False),
                                               ("WEBP", "RGB", True), ("GIF", "P", True)])
def test_images_from_a_path_and_from_bytes(tmp_path, fmt, mode, lossless):
    original = picture("RGB" if mode == "P" else mode)
    if mode == "P":
        original = original.quantize(64)
    data = encoded(original, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    path = tmp_path / f"picture.{fmt.lower()}"
    path.write_bytes(data)
    for image in (read_image(path), read_image(str(path)), read_image(data)):
        assert image.size == (64, 48) and image.mode == mode  # the file's own mode: no conversion
        assert getattr(image, "fp", None) is None  # decoded and detached from the file
        if lossless:
            assert np.array_equal(np.asarray(image), np.asarray(original))
    assert image_size(path) == image_size(data) == (64, 48)
    if sys.platform == "linux":
        assert open_fds_to(path) == 0


def test_images_are_turned_upright_by_their_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    data = encoded(picture(size=(40, 20)), "JPEG", exif=exif)
    assert read_image(data).size == (20, 40)
    assert image_size(data) == (20, 40)


def test_empty_and_unreadable_images(tmp_path):
    with pytest.raises(MediaError, match="^empty data$"):
        read_image(b"")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(MediaError, match="empty.png: empty file"):
        read_image(tmp_path / "empty.png")
    (tmp_path / "photo.jpg").write_text("certainly a photo")
    with pytest.raises(MediaError, match=r"photo.jpg: not an image in a format this app reads \(PNG, JPEG, WebP"):
        read_image(tmp_path / "photo.jpg")
    # Pillow reads PPM, but the app does not let network data reach every decoder Pillow has.
    with pytest.raises(MediaError, match="not an image in a format this app reads"):
        read_image(encoded(picture(), "PPM"))
    with pytest.raises(FileNotFoundError):  # no file at all is an OSError, not bad data
        read_image(tmp_path / "missing.png")
    with pytest.raises(MediaError, match="not an image"):
        image_size(b"GIF89a, or not quite")


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images(tmp_path, fmt):
    data = encoded(picture(size=(256, 256)), fmt)
    with pytest.raises(MediaError, match="damaged or truncated image data"):
        read_image(data[: len(data) // 2])
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match=f"{path.name}: damaged or truncated"):
        read_image(path)
    if sys.platform == "linux":
        assert open_fds_to(path) == 0


def test_decompression_bombs_are_refused_from_the_header(tmp_path, monkeypatch):
    def no_decoding(self):
        raise AssertionError("a decompression bomb reached the decoder")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    # Past Pillow's own limit (2 x 89 MP) ...
    with pytest.raises(MediaError, match=r"image too large: 900,000,000 pixels; the limit is 64,000,000"):
        read_image(png_header_only(30_000, 30_000))
    # ... and under it, where only the app's limit stands.
    (tmp_path / "bomb.png").write_bytes(png_header_only(9_000, 8_000))
    with pytest.raises(MediaError, match=r"bomb.png: image too large: 9000 x 8000 = 72,000,000 pixels"):
        read_image(tmp_path / "bomb.png")
    with pytest.raises(MediaError, match="image too large"):
        image_size(tmp_path / "bomb.png")


# -- audio ------------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding,tolerance", [("u8", 1 / 100), ("s16", 1e-4), ("s24", 1e-6), ("s32", 1e-6),
                                                ("f32", 0), ("f64", 1e-7)])
def test_wav_encodings_from_a_path_and_from_bytes(tmp_path, encoding, tolerance):
    stereo = tone(2)
    for extensible in (False, True):
        data = wav_bytes(stereo, RATE, encoding, extensible)
        path = tmp_path / f"{encoding}-{extensible}.wav"
        path.write_bytes(data)
        for samples, rate in (read_audio(path), read_audio(data), read_audio(str(path))):
            assert rate == RATE and samples.shape == stereo.shape and samples.dtype == np.float32
            np.testing.assert_allclose(samples, stereo, atol=tolerance)
    mono, _ = read_audio(wav_bytes(stereo[:, 0], RATE, encoding))
    assert mono.shape == (1600,)


def test_wav_codecs_the_stdlib_reader_lacks_go_through_libsndfile(tmp_path):
    path = tmp_path / "ulaw.wav"
    path.write_bytes(sound_bytes(tone(1)[:, 0], "WAV", "ULAW"))
    with pytest.raises(WavError, match="format tag 0x0007"):
        read_wav(path)  # the standard-library reader alone
    samples, rate = read_audio(path)
    assert rate == RATE and samples.shape == (1600,)
    np.testing.assert_allclose(samples, tone(1)[:, 0], atol=0.02)


@pytest.mark.parametrize("fmt,subtype,tolerance", [("FLAC", "PCM_16", 1e-4), ("FLAC", "PCM_24", 1e-6),
                                                   ("OGG", "VORBIS", 0.05)])
def test_flac_and_ogg_round_trip(tmp_path, fmt, subtype, tolerance):
    stereo = tone(2, 8000)
    data = sound_bytes(stereo, fmt, subtype)
    path = tmp_path / f"clip.{fmt.lower()}"
    path.write_bytes(data)
    for samples, rate in (read_audio(path), read_audio(data)):
        assert rate == RATE and samples.shape == stereo.shape and samples.dtype == np.float32
        np.testing.assert_allclose(samples, stereo, atol=tolerance)
    assert any(name.startswith(fmt) for name in media.audio_formats())


def test_mp3_reads_or_says_it_cannot():
    mono = tone(1, 16000)[:, 0]
    if "MP3" not in soundfile.available_formats():
        with pytest.raises(MediaError, match="readable formats: WAV"):
            read_audio(b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(400))
        return
    samples, rate = read_audio(sound_bytes(mono, "MP3"))
    assert rate == RATE and samples.ndim == 1 and samples.dtype == np.float32
    # A lossy codec with encoder delay: compare the loudness and the length, not the samples.
    assert abs(len(samples) - len(mono)) < RATE // 10
    assert abs(np.sqrt(np.mean(samples ** 2)) - np.sqrt(np.mean(mono ** 2))) < 0.05
    assert "MP3" in media.audio_formats()


def test_empty_unknown_and_broken_audio(tmp_path):
    with pytest.raises(MediaError, match="^empty data$"):
        read_audio(b"")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(MediaError, match="empty.wav: empty file"):
        read_audio(tmp_path / "empty.wav")
    (tmp_path / "song.mp3").write_text("la la la, not audio at all")
    with pytest.raises(MediaError, match=r"song.mp3: not a WAV file or any other audio format this app reads .*"
                                         r"readable formats: WAV, FLAC, OGG \(Vorbis, Opus\)"):
        read_audio(tmp_path / "song.mp3")
    with pytest.raises(FileNotFoundError):
        read_audio(tmp_path / "missing.wav")
    ok = wav_bytes(tone(1), RATE, "s16")
    with pytest.raises(WavError, match="bad header: 0 channel"):
        read_audio(wav_bytes(tone(1), RATE, "s16", channels=0))
    with pytest.raises(WavError, match="bad header: 1 channel.* at 0 Hz"):
        read_audio(wav_bytes(tone(1), 0, "s16"))
    with pytest.raises(MediaError, match="no audio samples"):
        read_audio(wav_bytes(np.zeros((0, 1), np.float32), RATE, "s16"))
    with pytest.raises(MediaError, match="no data chunk"):
        read_audio(ok[:36])
    assert issubclass(WavError, MediaError) and issubclass(MediaError, ValueError)


def test_float_audio_is_clipped_and_cleaned():
    wild = np.array([0.25, 1.5, -3.0, np.nan, np.inf], np.float32)
    samples, _ = read_audio(wav_bytes(wild, RATE, "f32"))
    assert samples.tolist() == [0.25, 1.0, -1.0, 0.0, 1.0]


# -- cached file reads ------------------------------------------------------------------------

def test_cached_audio_is_shared_read_only_and_follows_the_file(tmp_path):
    path = tmp_path / "clip.wav"
    path.write_bytes(wav_bytes(tone(1), RATE, "s16"))
    first, rate = load_audio_file(path)
    again, _ = load_audio_file(str(path))
    assert again is first and rate == RATE and not first.flags.writeable
    path.write_bytes(wav_bytes(tone(1, 800), RATE, "s16"))  # another size: another entry
    changed, _ = load_audio_file(path)
    assert changed.shape == (800,)
    assert audio_duration(path) == 800 / RATE and load_audio_file(path)[0] is changed  # through the cache
    assert audio_duration(wav_bytes(tone(1), RATE, "s16")) == 1600 / RATE


def test_cached_images_are_copies_and_follow_the_file(tmp_path):
    path = tmp_path / "picture.png"
    path.write_bytes(encoded(picture(), "PNG"))
    first = load_image_file(path)
    first.paste((0, 0, 0), (0, 0, 64, 48))  # the caller's own copy: the cache is unaffected
    again = load_image_file(path)
    assert again is not first and np.array_equal(np.asarray(again), np.asarray(picture()))
    path.write_bytes(encoded(picture(size=(32, 32)), "PNG"))
    assert load_image_file(path).size == (32, 32)


def test_the_file_cache_is_bounded_by_count_and_by_memory(tmp_path):
    cache = media._FileCache(max_items=2, max_bytes=100)
    loads = []

    def load(path: str) -> bytes:
        loads.append(Path(path).name)
        return Path(path).read_bytes()

    for name, size in (("a", 10), ("b", 10), ("c", 10), ("big", 200)):
        (tmp_path / name).write_bytes(bytes(size))
    for name in ("a", "b", "a", "c", "a", "b", "big", "big"):
        cache.get(tmp_path / name, load, len)
    # a and b cached; c evicts b (a was used last); b comes back; "big" never fits.
    assert loads == ["a", "b", "c", "b", "big", "big"]
