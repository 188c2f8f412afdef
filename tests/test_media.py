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
    ImageInfo,
    MediaError,
    WavError,
    audio_duration,
    image_info,
    image_size,
    load_audio_file,
    load_image_file,
    read_audio,
    read_image,
    read_wav,
)
from model.audio_io import MODEL_SAMPLE_RATE, to_model_audio, to_mono
from model.image_crops import make_crops, to_rgb
from tests.signals import encoded, png_chunk, png_header_only


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


def test_tiny_and_cut_images(tmp_path):
    for fmt in ("PNG", "JPEG"):
        data = encoded(picture(size=(256, 256)), fmt)
        for cut in (20, 100, len(data) - 200):
            with pytest.raises(MediaError):
                read_image(data[:cut])
    (tmp_path / "nothing.jpg").write_bytes(b"")
    with pytest.raises(MediaError, match="nothing.jpg: empty file"):
        image_info(tmp_path / "nothing.jpg")


def test_a_one_pixel_image_works():
    image = read_image(encoded(Image.new("RGB", (1, 1), (10, 200, 30)), "PNG"))
    assert image.size == (1, 1) and to_rgb(image).tolist() == [[[10, 200, 30]]]
    crops = make_crops(image)
    assert crops.pixels.shape == (2, 3, 448, 448) and np.isfinite(crops.pixels).all()


@pytest.mark.parametrize("size", [(20_000, 20), (20, 20_000)])
def test_a_long_thin_image_within_the_pixel_limit_works(size):
    image = read_image(encoded(Image.new("L", size, 90), "PNG"))
    assert image.size == size and image_size(encoded(image, "PNG")) == size
    crops = make_crops(image)  # the crop grid tops out at 36 x 1
    assert crops.pixels.shape == (37, 3, 448, 448) and np.isfinite(crops.pixels).all()
    assert crops.num_tokens > 0


# -- what reaches the vision encoder ------------------------------------------------------------

def transformers_rgb(image: Image.Image) -> np.ndarray:
    """transformers' `convert_to_rgb`: anything but RGB through RGBA, composited on white."""
    if image.mode == "RGB":
        return np.asarray(image)
    rgba = image.convert("RGBA")
    return np.asarray(Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255)), rgba).convert("RGB"))


def test_the_usual_modes_convert_exactly_as_transformers_does():
    rgba = picture("RGBA")
    palette = picture().quantize(64)
    palette_alpha = palette.copy()
    palette_alpha.info["transparency"] = bytes(range(0, 256, 4))  # an alpha per palette entry
    images = [picture(), rgba, picture("L"), palette, palette_alpha, rgba.convert("LA"), rgba.convert("CMYK"),
              picture().convert("1")]
    for image in images:
        data = encoded(image, "TIFF" if image.mode == "CMYK" else "PNG")
        for candidate in (image, read_image(data)):
            assert np.array_equal(to_rgb(candidate), transformers_rgb(candidate)), candidate.mode


def sixteen_bit_gradient() -> np.ndarray:
    """(4, 256) uint16: every high byte once per row, with low bytes that must not matter."""
    high = np.arange(256, dtype=np.uint16) << 8
    return high[None, :] + np.array([[0], [1], [128], [255]], np.uint16)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_greyscale_is_scaled_to_8_bits_not_saturated(fmt):
    values = sixteen_bit_gradient()
    image = read_image(encoded(Image.fromarray(values), fmt))
    assert image.mode.startswith("I")  # the file's own 16-bit samples
    rgb = to_rgb(image)
    expected = np.repeat((values >> 8).astype(np.uint8)[..., None], 3, axis=-1)
    assert np.array_equal(rgb, expected)
    crops = make_crops(image.resize((256, 64), Image.Resampling.NEAREST))
    assert -0.9 < crops.pixels[0].mean() < 0.9  # a grey ramp, not a white page


def test_16_bit_images_given_directly_are_scaled_too():
    values = sixteen_bit_gradient()
    expected = (values >> 8).astype(np.uint8)
    big_endian = Image.frombytes("I;16B", (256, 4), values.astype(">u2").tobytes())
    as_int32 = Image.fromarray(values.astype(np.int32))  # mode I: older Pillows' 16-bit PNGs
    for image, mode in ((Image.fromarray(values), "I;16"), (big_endian, "I;16B"), (as_int32, "I")):
        assert image.mode == mode
        assert np.array_equal(to_rgb(image)[..., 0], expected), mode
        assert np.array_equal(to_rgb(image)[..., 2], expected), mode
    # Mode I beyond 16 bits is clipped to the 16-bit range.
    odd = Image.fromarray(np.array([[-5, 70_000, 0x1234]], np.int32))
    assert to_rgb(odd)[0, :, 0].tolist() == [0, 255, 0x12]


def test_a_transparent_grey_level_of_a_16_bit_png_becomes_white():
    values = np.array([[0, 1000, 1001, 40000]], np.uint16)
    image = read_image(encoded(Image.fromarray(values), "PNG", transparency=1000))
    assert image.mode == "I;16" and image.info["transparency"] == 1000
    assert to_rgb(image)[0, :, 0].tolist() == [0, 255, 3, 156]  # 1001 >> 8 = 3: only 1000 itself is clear


def test_cmyk_jpegs_come_out_in_the_right_colours():
    inks = [(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255), (0, 0, 0, 0), (255, 255, 0, 0)]
    colours = [(0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 0, 0), (255, 255, 255), (0, 0, 255)]
    stripes = np.zeros((16, 16 * len(inks), 4), np.uint8)
    for i, ink in enumerate(inks):
        stripes[:, 16 * i:16 * (i + 1)] = ink
    cmyk = Image.frombytes("CMYK", (stripes.shape[1], 16), stripes.tobytes())
    image = read_image(encoded(cmyk, "JPEG", quality=95))  # Adobe-marked, its inks stored inverted
    assert image.mode == "CMYK"
    rgb = to_rgb(image).astype(int)
    for i, colour in enumerate(colours):
        assert np.abs(rgb[8, 16 * i + 8] - colour).max() <= 8, (inks[i], rgb[8, 16 * i + 8])


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_transparency_is_composited_on_white(fmt):
    indices = np.array([[0, 1, 2, 1]], np.uint8)
    image = Image.fromarray(indices, "L").convert("P")
    image.putpalette([200, 0, 0, 0, 0, 200, 10, 20, 30] + [0] * (3 * 253))
    read = read_image(encoded(image, fmt, transparency=1))  # entry 1 (blue) is clear
    assert read.mode == "P" and read.info["transparency"] == 1
    assert to_rgb(read)[0].tolist() == [[200, 0, 0], [255, 255, 255], [10, 20, 30], [255, 255, 255]]
    if fmt == "PNG":  # a partly transparent entry: blended with white like RGBA
        partly = read_image(encoded(image, "PNG", transparency=bytes([255, 0, 128])))
        assert to_rgb(partly)[0, 2].tolist() == [132, 137, 142]
        assert np.array_equal(to_rgb(partly), to_rgb(partly.convert("RGBA")))


# -- animated images and image_info ------------------------------------------------------------

def frames_of(count: int, size: tuple[int, int] = (60, 40)) -> list[Image.Image]:
    return [Image.new("RGB", size, (40 * i, 255 - 40 * i, 90)) for i in range(count)]


@pytest.mark.parametrize("fmt,note", [
    ("GIF", "animated GIF (5 frames): the model sees its first frame"),
    ("PNG", "animated PNG (5 frames): the model sees its first frame"),
    ("WEBP", "animated WebP (5 frames): the model sees its first frame"),
    ("TIFF", "multi-page TIFF (5 pages): the model sees its first page"),
])
def test_animated_images_give_their_first_frame_and_say_so(tmp_path, monkeypatch, fmt, note):
    frames = frames_of(5)
    data = encoded(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100,
                   **({"lossless": True} if fmt == "WEBP" else {}))
    image = read_image(data)
    assert image.size == (60, 40)
    assert to_rgb(image)[20, 30].tolist() == [0, 255, 90]  # the first frame's colour
    path = tmp_path / f"anim.{fmt.lower()}"
    path.write_bytes(data)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("image_info decoded pixels"))
    for source in (data, path):
        info = image_info(source)
        assert info == ImageInfo(width=60, height=40, format=fmt, frames=5)
        assert info.animated and info.note == note
    assert image_size(path) == (60, 40)


def test_still_images_have_one_frame_and_no_note():
    for fmt in ("GIF", "PNG", "JPEG", "WEBP"):
        info = image_info(encoded(picture(), fmt))
        assert info == ImageInfo(64, 48, fmt, 1) and not info.animated and info.note is None


def with_png_chunk_after_idat(png: bytes, kind: bytes, body: bytes) -> bytes:
    iend = png.rindex(b"IEND") - 4
    return png[:iend] + png_chunk(kind, body) + png[iend:]


def test_image_info_reads_the_exif_rotation_without_decoding(monkeypatch):
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 degrees counter-clockwise to display"
    jpeg = encoded(picture(size=(40, 20)), "JPEG", exif=exif)
    png = encoded(picture(size=(40, 20)), "PNG", exif=exif)  # eXIf before the pixel data, as Pillow writes it
    late = with_png_chunk_after_idat(encoded(picture(size=(40, 20)), "PNG"), b"eXIf", exif.tobytes())
    text = b"Raw profile type exif\0\0" + zlib.compress(b"\nexif\n   %d\n%s\n" % (len(exif.tobytes()) + 6,
                                                      (b"Exif\0\0" + exif.tobytes()).hex().encode()))
    late_text = with_png_chunk_after_idat(encoded(picture(size=(40, 20)), "PNG"), b"zTXt", text)
    plain = with_png_chunk_after_idat(encoded(picture(size=(40, 20)), "PNG"), b"tEXt", b"Comment\0hello")
    for data, size in ((jpeg, (20, 40)), (png, (20, 40)), (late, (20, 40)), (late_text, (20, 40)),
                       (plain, (40, 20))):
        assert read_image(data).size == size  # what the encoder gets, priced from the headers
        assert image_size(data) == size
    # Only a PNG with EXIF after its pixel data is decoded to find it.
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("image_info decoded pixels"))
    for data in (jpeg, png, plain):
        image_info(data)


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
    zero_bits = ok[:32] + struct.pack("<HH", 0, 0) + ok[36:]  # block align and bits per sample 0
    with pytest.raises(WavError, match="bad header: 0-bit samples"):
        read_audio(zero_bits)
    assert issubclass(WavError, MediaError) and issubclass(MediaError, ValueError)


def test_float_audio_beyond_full_scale_is_clipped():
    loud = np.array([0.25, 1.5, -3.0, 1e30, -1.0], np.float32)
    for encoding in ("f32", "f64"):
        samples, _ = read_audio(wav_bytes(loud, RATE, encoding))
        assert samples.dtype == np.float32 and samples.tolist() == [0.25, 1.0, -1.0, 1.0, -1.0]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("encoding", ["f32", "f64"])
def test_non_finite_audio_is_refused(tmp_path, bad, encoding):
    clip = tone(2)
    clip[800, 1] = bad  # one sample of one channel is enough
    data = wav_bytes(clip, RATE, encoding)
    with pytest.raises(MediaError, match="^the audio holds NaN or infinite samples$"):
        read_audio(data)
    path = tmp_path / "poisoned.wav"
    path.write_bytes(data)
    with pytest.raises(MediaError, match="poisoned.wav: the audio holds NaN or infinite samples"):
        load_audio_file(path)
    assert audio_duration(data) == pytest.approx(len(clip) / RATE)  # the header: the samples are refused when read


def test_non_finite_audio_through_libsndfile_is_refused():
    clip = tone(1)[:, 0].astype(np.float64)
    clip[5] = np.nan
    out = io.BytesIO()  # big-endian (RIFX) float WAV: the standard-library reader hands it to libsndfile
    soundfile.write(out, clip, RATE, format="WAV", subtype="DOUBLE", endian="BIG")
    assert out.getvalue()[:4] == b"RIFX"
    with pytest.raises(MediaError, match="^the audio holds NaN or infinite samples$"):
        read_audio(out.getvalue())


def lying_wav(samples: np.ndarray, encoding: str, riff_size: int | None = None, data_size: int | None = None,
              tail: bytes = b"") -> bytes:
    """`wav_bytes` with the RIFF and/or data chunk sizes replaced (as writers to a pipe leave them)."""
    data = bytearray(wav_bytes(samples, RATE, encoding) + tail)
    if riff_size is not None:
        struct.pack_into("<I", data, 4, riff_size)
    if data_size is not None:
        at = data.index(b"data")
        struct.pack_into("<I", data, at + 4, data_size)
    return bytes(data)


@pytest.mark.parametrize("riff_size,data_size", [(0xFFFFFFFF, None), (None, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
                                                 (None, 10 ** 9), (0, 0x7FFFF000), (None, 3201)])
def test_wav_headers_whose_sizes_lie_read_the_samples_that_are_there(riff_size, data_size):
    mono = tone(1)[:, 0]
    samples, rate = read_audio(lying_wav(mono, "s16", riff_size, data_size))
    assert rate == RATE and samples.shape == (1600,)
    np.testing.assert_allclose(samples, mono, atol=1e-4)
    # Stereo, with a trailing half frame that the overlong data size runs into: dropped.
    stereo = tone(2)
    samples, _ = read_audio(lying_wav(stereo, "s24", 0xFFFFFFFF, 0xFFFFFFFF, tail=b"\x01\x02\x03\x04"))
    assert samples.shape == (1600, 2)
    np.testing.assert_allclose(samples, stereo, atol=1e-6)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000, 96000])
def test_one_sample_of_audio_reads_at_any_rate(rate):
    samples, got = read_audio(wav_bytes(np.array([0.5], np.float32), rate, "s16"))
    assert got == rate and samples.shape == (1,) and samples[0] == 0.5
    out = to_model_audio(samples, rate)  # a sample or none: the HTTP API pads short clips with silence
    assert out.dtype == np.float32 and out.ndim == 1 and len(out) <= 2 and np.isfinite(out).all()


@pytest.mark.parametrize("encoding", ["s16", "s24", "f32", "f64"])
def test_six_channels_are_mixed_down(encoding):
    six = tone(6, 4800)
    samples, rate = read_audio(wav_bytes(six, RATE, encoding, extensible=True))
    assert rate == RATE and samples.shape == (4800, 6)
    np.testing.assert_allclose(samples, six, atol=1e-4)
    mono = to_mono(samples)
    assert mono.shape == (4800,)
    np.testing.assert_allclose(mono, six.mean(axis=1), atol=1e-4)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000, 96000])
@pytest.mark.parametrize("encoding", ["s16", "s24", "f64"])
def test_common_rates_resample_to_the_model_rate(rate, encoding):
    n = rate // 2  # half a second of a 440 Hz tone, stereo
    t = np.arange(n) / rate
    stereo = np.stack([0.5 * np.sin(2 * np.pi * 440 * t)] * 2, 1).astype(np.float32)
    samples, got = read_audio(wav_bytes(stereo, rate, encoding))
    assert got == rate and samples.shape == (n, 2)
    out = to_model_audio(samples, rate)
    assert out.dtype == np.float32 and abs(len(out) - MODEL_SAMPLE_RATE // 2) <= 1
    spectrum = np.abs(np.fft.rfft(out[1000:7000] * np.hanning(6000)))
    assert abs(np.argmax(spectrum) * MODEL_SAMPLE_RATE / 6000 - 440) < 3  # the same pitch
    assert abs(np.abs(out[1000:7000]).max() - 0.5) < 0.01                # the same loudness


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
