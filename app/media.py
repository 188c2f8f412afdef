"""Read images and audio, from a file or from bytes: the one media boundary of the app.

Every front end (the Gradio page, the voice assistant, an HTTP API that receives base64 data)
reads media through here, so they accept the same formats and fail the same way:

    image = read_image("photo.jpg")              # or read_image(raw_bytes)
    info = image_info("anim.gif")                # width, height, format, frames: the header alone
    samples, rate = read_audio("question.flac")  # float32 in [-1, 1], (n,) or (n, channels)
    image = load_image_file(path)                # the same, cached while the file is unchanged

A `str` or `os.PathLike` is always a path; data is `bytes` (decode base64 before calling).
Bad content raises `MediaError` (a `ValueError`) with a message that says what is wrong, and
starts with the path when there is one. A file that cannot be opened at all (missing, no
permission) raises the usual `OSError`, so callers can tell "no such file" from "not media".

Images go through Pillow, restricted to the common web and camera formats. Audio goes through
a WAV reader written with the standard library (PCM and float WAV, the formats the app itself
writes, need no native library) and, for everything else (FLAC, OGG, MP3, WAV codecs such as
mu-law), through soundfile, which bundles libsndfile: no ffmpeg anywhere.
"""
from __future__ import annotations

import collections
import contextlib
import io
import os
import re
import struct
import threading
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator, TypeVar, Union

import numpy as np
from PIL import Image, ImageOps

Source = Union[str, os.PathLike, bytes]


class MediaError(ValueError):
    """The data is not an image or audio clip this app can read; the message says why."""


class WavError(MediaError):
    """A WAV file the standard-library reader does not understand (see `read_wav`)."""


# -- where the bytes come from ---------------------------------------------------------------

def is_data(source: Source) -> bool:
    """Whether `source` is a file's bytes (else a path)."""
    return isinstance(source, (bytes, bytearray, memoryview))


def _with_path(err: MediaError, source: Source) -> MediaError:
    """The same error (same class) with the path in front, when the source was a file."""
    if is_data(source):
        return err
    return type(err)(f"{os.fspath(source)}: {err}")


# -- images -----------------------------------------------------------------------------------

# A decompression bomb is a small file that declares a huge image: refused from its header,
# before any pixel is decoded. 64 megapixels is above the largest common phone photos (50 MP)
# and costs about 200 MB as RGB; the vision encoder shrinks every image to a few 448 px crops.
MAX_IMAGE_PIXELS = 64_000_000

# What browsers, phones and screenshots produce (JPEG includes cameras' multi-picture MPO; AVIF
# when this Pillow has it). Pillow knows many more (EPS would even run Ghostscript), but data
# from the network should only reach the decoders that need to be there.
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")


def image_formats() -> list[str]:
    """The image formats `read_image` reads with this Pillow (Pillow's names)."""
    Image.init()  # registers every plugin, once
    return [name for name in IMAGE_FORMATS if name in Image.OPEN]


def read_image(source: Source) -> Image.Image:
    """The image in `source` (a path or the file's bytes), decoded and detached from the file.

    The mode is the file's own (RGB, RGBA, L, P, ...), not converted: the vision encoder
    composites transparency onto white as transformers does (model/image_crops.py `to_rgb`),
    which a conversion to RGB here would lose. The image is turned upright by its EXIF
    orientation, as browsers show it (transformers' `load_image` does the same). An animated
    or multi-page image gives its first frame: `image_info` tells how many there are, so that a
    front end can say so (`ImageInfo.note`).
    """
    with _opened_image(source) as image:
        image.load()
        # Upright, and a copy in memory either way: nothing refers to the file any more.
        return ImageOps.exif_transpose(image)


@dataclass(frozen=True)
class ImageInfo:
    """What `image_info` reads from an image's header."""
    width: int    # as `read_image` returns the image: after its EXIF rotation
    height: int
    format: str   # Pillow's name: PNG, JPEG, MPO (a camera JPEG holding several pictures), GIF, WEBP...
    frames: int   # frames of an animation, pages of a TIFF, pictures of an MPO; 1 for a still image

    @property
    def animated(self) -> bool:
        """More than one frame, of which the model sees only the first. Not an MPO: its first
        picture is the photo itself, the others are previews or a stereo pair's second view."""
        return self.frames > 1 and self.format != "MPO"

    @property
    def note(self) -> str | None:
        """What a front end should tell the user about the image, or None: e.g. "animated GIF
        (12 frames): the model sees its first frame"."""
        if not self.animated:
            return None
        if self.format == "TIFF":
            return f"multi-page TIFF ({self.frames} pages): the model sees its first page"
        name = {"WEBP": "WebP"}.get(self.format, self.format)
        return f"animated {name} ({self.frames} frames): the model sees its first frame"


def image_info(source: Source) -> ImageInfo:
    """Size (after EXIF rotation, as `read_image` returns the image), format and frame count of
    the image in `source`, from its headers: no pixel is decoded. Same errors as `read_image`
    for data that is not an image, or too large a one."""
    with _opened_image(source) as image:
        width, height = image.size
        # EXIF orientations 5-8 are quarter turns: read_image swaps the sides.
        if _exif_of(image).get(0x0112) in (5, 6, 7, 8):
            width, height = height, width
        # GIF counts its frames by walking their headers (skipping the pixel data), up to where
        # the file ends; the other formats say it in a header.
        frames = getattr(image, "n_frames", 1)
        return ImageInfo(width=width, height=height, format=image.format or "", frames=int(frames))


def image_size(source: Source) -> tuple[int, int]:
    """(width, height) of the image as `read_image` returns it, from the header alone."""
    info = image_info(source)
    return info.width, info.height


def _exif_of(image: Image.Image) -> Image.Exif:
    """The image's EXIF without decoding it. Pillow's PNG reader decodes the whole image to
    look for an EXIF chunk after the pixel data; here the chunk headers are walked instead, and
    only a PNG that has such a chunk is decoded."""
    if image.format == "PNG" and "exif" not in image.info and not _png_has_late_exif(image.fp):
        return Image.Image.getexif(image)  # what the chunks before the pixel data hold
    return image.getexif()


def _png_has_late_exif(stream: BinaryIO) -> bool:
    """Whether a PNG holds EXIF after its first IDAT chunk (where Pillow's header reading stops):
    an eXIf chunk, or ImageMagick's "Raw profile type exif" text chunk."""
    position = stream.tell()
    try:
        at, seen_idat = 8, False  # after the PNG signature
        while True:
            stream.seek(at)
            header = stream.read(8)
            if len(header) < 8 or header[4:] == b"IEND":
                return False
            length, kind = struct.unpack(">I4s", header)
            if kind == b"IDAT":
                seen_idat = True
            elif seen_idat and kind == b"eXIf":
                return True
            elif (seen_idat and kind in (b"tEXt", b"zTXt", b"iTXt")
                  and stream.read(22) == b"Raw profile type exif\0"):  # the keyword, then NUL
                return True
            at += 12 + length  # length, type, body, CRC
    finally:
        stream.seek(position)


@contextlib.contextmanager
def _opened_image(source: Source) -> Iterator[Image.Image]:
    """Pillow's lazy image (header read, size checked, no pixel decoded yet); any failure of
    the body to decode it becomes a MediaError. The file is closed on the way out."""
    if is_data(source):
        stream: BinaryIO = io.BytesIO(source)
    else:
        stream = open(source, "rb")  # OSError (missing file...) goes to the caller as it is
    try:
        with stream:
            if stream.seek(0, io.SEEK_END) == 0:
                raise MediaError("empty data" if is_data(source) else "empty file")
            stream.seek(0)
            with _open_checked(stream) as image:
                yield image
    except MediaError as err:
        raise _with_path(err, source) from None
    except MemoryError:
        raise
    except Exception as err:  # Pillow's decoders raise OSError, SyntaxError, ValueError, struct.error...
        raise _with_path(MediaError(f"damaged or truncated image data ({_reason(err)})"), source) from None


def _open_checked(stream: BinaryIO) -> Image.Image:
    try:
        image = Image.open(stream, formats=image_formats())
    except Image.UnidentifiedImageError:
        names = ", ".join("WebP" if name == "WEBP" else name for name in image_formats())
        raise MediaError(f"not an image in a format this app reads ({names})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:  # the warning: under -W error
        # Pillow's own, larger, limit fired first; its message holds the pixel count.
        found = re.search(r"\((\d+) pixels\)", str(err))
        size = f"{int(found[1]):,} pixels" if found else str(err)
        raise MediaError(f"image too large: {size}; the limit is {MAX_IMAGE_PIXELS:,} pixels") from None
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        image.close()
        raise MediaError(f"image too large: {width} x {height} = {width * height:,} pixels; "
                         f"the limit is {MAX_IMAGE_PIXELS:,} pixels")
    return image


def _reason(err: BaseException) -> str:
    return str(err) or type(err).__name__


# -- audio ------------------------------------------------------------------------------------

def read_audio(source: Source) -> tuple[np.ndarray, int]:
    """(samples, rate) of the audio in `source` (a path or the file's bytes).

    samples: float32 in [-1, 1], shape (n,) for mono or (n, channels). PCM and float WAV are
    read by the standard-library reader below; FLAC, OGG (Vorbis, Opus), MP3 and other WAV
    codecs by libsndfile (soundfile). Float samples beyond [-1, 1] (a float WAV may hold them:
    a clipped recording, or a mix too loud) are clipped to it. NaN or infinite samples are
    refused with a MediaError: no value would be right in their place, and the speech encoder
    would carry them into every later frame.
    """
    try:
        if is_data(source):
            data = bytes(source)
        else:
            with open(source, "rb") as f:  # OSError (missing file...) goes to the caller as it is
                data = f.read()
        samples, rate = _decode_audio(data, "empty data" if is_data(source) else "empty file")
        if not np.isfinite(samples).all():
            raise MediaError("the audio holds NaN or infinite samples")
    except MediaError as err:
        raise _with_path(err, source) from None
    np.clip(samples, -1.0, 1.0, out=samples)
    return samples, rate


def audio_duration(source: Source) -> float:
    """Seconds of audio in `source` (a path or the file's bytes): from the header where libsndfile
    reads it (an engine counts a clip's tokens before anything decodes it), else by decoding it."""
    try:
        import soundfile

        info = soundfile.info(io.BytesIO(bytes(source)) if is_data(source) else os.fspath(source))
        if info.samplerate > 0 and info.frames > 0:
            _check_rate(info.samplerate)
            return info.frames / info.samplerate
    except MediaError as err:
        raise _with_path(err, source) from None
    except Exception:  # no header libsndfile reads (e.g. a WAV written to a pipe): decode it
        pass
    samples, rate = read_audio(source) if is_data(source) else load_audio_file(source)
    return len(samples) / rate


def audio_formats() -> list[str]:
    """The common audio formats `read_audio` reads with the libraries installed here (for error
    messages and file pickers; libsndfile also reads rarer ones: AU, CAF, W64...)."""
    formats = ["WAV"]
    try:
        import soundfile
    except (ImportError, OSError):  # OSError: the package is there but libsndfile is not
        return formats
    known = soundfile.available_formats()
    ogg = [codec.capitalize() for codec in ("VORBIS", "OPUS") if codec in soundfile.available_subtypes("OGG")]
    for name, label in (("FLAC", "FLAC"), ("OGG", f"OGG ({', '.join(ogg)})" if ogg else "OGG"),
                        ("MP3", "MP3"), ("AIFF", "AIFF")):
        if name in known:
            formats.append(label)
    return formats


# The sample rates of recordings: telephone speech is 8 kHz (4 kHz leaves room for old formats),
# studio converters stop at 768 kHz. A header outside them is a damaged or forged file, and
# believing it is costly: 32 kB of samples declared at 1 Hz are 4.4 hours, 1 GB once resampled
# to the speech encoder's 16 kHz.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 4_000, 768_000


def _check_rate(rate: int) -> None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise MediaError(f"a sample rate of {rate:,} Hz is not a recording's (this app reads "
                         f"{MIN_SAMPLE_RATE:,}-{MAX_SAMPLE_RATE:,} Hz): a damaged or forged header")


def _decode_audio(data: bytes, empty: str) -> tuple[np.ndarray, int]:
    if not data:
        raise MediaError(empty)
    if data[:4] in (b"RIFF", b"RIFX") and data[8:12] == b"WAVE":
        try:
            samples, rate = parse_wav(data)
        except WavError as err:
            # mu-law, ADPCM, big-endian...: libsndfile may know it. If not, the WAV reader's
            # reason is the more precise one.
            try:
                samples, rate = _read_with_soundfile(data)
            except MediaError:
                raise err from None
    else:
        samples, rate = _read_with_soundfile(data)
    if samples.size == 0:
        raise MediaError("no audio samples")
    _check_rate(rate)
    return samples, rate


def _read_with_soundfile(data: bytes) -> tuple[np.ndarray, int]:
    try:
        import soundfile
    except (ImportError, OSError) as err:
        raise MediaError(f"not a WAV file, and other audio formats need soundfile (libsndfile), which is "
                         f"unavailable: {_reason(err)}; pip install soundfile") from None
    try:
        with soundfile.SoundFile(io.BytesIO(data)) as f:
            channels, rate = f.channels, f.samplerate
            if channels < 1 or rate < 1:
                raise MediaError(f"bad header: {channels} channel(s) at {rate} Hz")
            samples = f.read(dtype="float32", always_2d=False)
    except MediaError:
        raise
    except (RuntimeError, ValueError, TypeError) as err:  # soundfile.LibsndfileError is a RuntimeError
        why = getattr(err, "error_string", None) or _reason(err)
        raise MediaError(f"not a WAV file or any other audio format this app reads ({why}); "
                         f"readable formats: {', '.join(audio_formats())}") from None
    return samples, int(rate)


# -- WAV with the standard library --------------------------------------------------------------
# The stdlib `wave` module reads neither float nor (before Python 3.12) extensible files, so the
# RIFF chunks are walked here. A data chunk whose size is unknown (espeak-ng `--stdout` and
# other writers to a pipe put 0xFFFFFFFF-ish values there) runs to the end of the file.

PCM, IEEE_FLOAT, EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
CONVERT_HINT = "convert it first, e.g.: sox IN.wav -b 16 -e signed-integer OUT.wav"


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """(samples, rate) of a PCM or float WAV file: float32 in [-1, 1], shape (n,) or (n, channels).

    The standard-library reader alone (8/16/24/32-bit PCM, 32/64-bit float, plain or
    WAVE_FORMAT_EXTENSIBLE headers); `read_audio` also reads what this refuses.
    """
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
    if bits < 8 or bits % 8 or block_align != width * channels:
        raise WavError(f"bad header: {bits}-bit samples in {block_align}-byte frames of {channels} channel(s)")
    usable = len(pcm) - len(pcm) % block_align  # a truncated last frame is dropped
    samples = _decode_wav_samples(pcm[:usable], tag, width)
    samples = samples.reshape(-1, channels)
    return (samples[:, 0] if channels == 1 else samples), int(rate)


def _decode_wav_samples(raw: bytes, tag: int, width: int) -> np.ndarray:
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


# -- cached reads of files ----------------------------------------------------------------------
# A conversation reads its attachments again on every turn. Entries are keyed by the file's
# path, modification time and size, so an edited file is read afresh; they are bounded by count
# and by memory, since one phone photo is ~36 MB decoded and a long recording more.

T = TypeVar("T")


class _FileCache:
    """A thread-safe LRU of decoded files (the page serves requests from several threads)."""

    def __init__(self, max_items: int, max_bytes: int) -> None:
        self.max_items, self.max_bytes = max_items, max_bytes
        self._entries: collections.OrderedDict[tuple, tuple[Any, int]] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, path: str | os.PathLike, load: Callable[[str], T], nbytes: Callable[[T], int]) -> T:
        stat = os.stat(path)
        key = (os.path.abspath(path), stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key][0]
        value = load(os.fspath(path))  # outside the lock: decoding can take a while
        size = nbytes(value)
        with self._lock:
            if key not in self._entries and size <= self.max_bytes:
                self._entries[key] = (value, size)
                self._bytes += size
                while len(self._entries) > self.max_items or self._bytes > self.max_bytes:
                    _, (_, dropped) = self._entries.popitem(last=False)
                    self._bytes -= dropped
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


_images = _FileCache(max_items=32, max_bytes=256 * 2**20)
_audio = _FileCache(max_items=16, max_bytes=256 * 2**20)


def load_image_file(path: str | os.PathLike) -> Image.Image:
    """`read_image(path)`, cached while the file is unchanged. Returns a copy: the caller may
    change it (copying is cheap next to decoding)."""
    return _images.get(path, read_image, _image_nbytes).copy()


def load_audio_file(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """`read_audio(path)`, cached while the file is unchanged. The samples are shared by every
    caller and so read-only: copy them to change them."""
    return _audio.get(path, _read_audio_read_only, lambda clip: clip[0].nbytes)


def clear_caches() -> None:
    """Forget every cached file (tests, or to free memory)."""
    _images.clear()
    _audio.clear()


def _read_audio_read_only(path: str) -> tuple[np.ndarray, int]:
    samples, rate = read_audio(path)
    samples.setflags(write=False)
    return samples, rate


def _image_nbytes(image: Image.Image) -> int:
    width, height = image.size
    return width * height * len(image.getbands())
