"""model/audio_io.py: any (samples, rate) an engine is given -> 16 kHz mono float32, or a clear ValueError.

These arrays never went through app/media: a front end or a library hands them to the engine as
they are. Every input is made here; nothing is downloaded.
"""
from __future__ import annotations

import numpy as np
import pytest

from model.audio_io import MODEL_SAMPLE_RATE, resample, to_model_audio, to_mono


def sine(n: int, rate: int = MODEL_SAMPLE_RATE, freq: float = 440.0, amplitude: float = 0.5) -> np.ndarray:
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(n) / rate)).astype(np.float32)


# -- sample formats ----------------------------------------------------------------------------

def test_float_is_kept_and_signed_pcm_is_scaled_as_before():
    x = sine(1000)
    assert to_mono(x).dtype == np.float32 and np.array_equal(to_mono(x), x)
    assert np.array_equal(to_mono(x.astype(np.float64)), x)
    assert to_mono(np.array([0.5, 1.5, -2.0], np.float32)).tolist() == [0.5, 1.5, -2.0]  # not clipped here
    pcm16 = np.array([-32768, -16384, 0, 16384, 32767], np.int16)
    assert to_mono(pcm16).tolist() == (pcm16.astype(np.float32) / 32768).tolist()
    assert to_mono(np.array([-2 ** 31, 2 ** 30], np.int32)).tolist() == [-1.0, 0.5]
    assert to_mono(np.array([-128, 64], np.int8)).tolist() == [-1.0, 0.5]


def test_unsigned_pcm_is_centred():
    # 8-bit PCM is unsigned, centred on 128: silence is 128, not 0.5 of full scale.
    assert to_mono(np.array([0, 64, 128, 192, 255], np.uint8)).tolist() == [-1.0, -0.5, 0.0, 0.5, 127 / 128]
    assert to_mono(np.full((100, 2), 128, np.uint8)).tolist() == [0.0] * 100
    assert to_mono(np.array([0, 32768, 65535], np.uint16)).tolist() == [-1.0, 0.0, 32767 / 32768]
    # The same tone as 8-bit unsigned and as float: the same signal.
    tone = sine(1600)
    u8 = np.clip(np.round(tone * 128 + 128), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(to_mono(u8), tone, atol=1 / 128)


@pytest.mark.parametrize("samples,what", [
    (np.array([True, False, True]), "bool"),
    (np.array([0.5 + 0.5j, 0.1j], np.complex64), "complex"),
    (np.array([0.5, 0.25], dtype=object), "object"),
    (np.array([[0.5, 0.25], [0.1, 0.2]], dtype=object), "object"),
    (np.array(["0.5", "0.25"]), "<U4"),
    ([0.5, None], "object"),
])
def test_arrays_that_are_not_samples_are_refused(samples, what):
    with pytest.raises(ValueError, match=f"audio samples must be integer PCM or float, got a {what} array"):
        to_mono(samples)
    with pytest.raises(ValueError, match="must be integer PCM or float"):
        to_model_audio(samples, 16_000)


def test_a_plain_list_of_numbers_still_works():
    assert to_mono([0.5, -0.25]).tolist() == [0.5, -0.25]
    assert to_mono([[0.5, 0.25], [-0.5, -0.25]]).tolist() == [0.375, -0.375]


# -- non-finite samples --------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_non_finite_samples_are_refused(bad, dtype):
    mono = sine(4800).astype(dtype)
    mono[1234] = bad
    stereo = np.stack([sine(4800), sine(4800)], 1).astype(dtype)
    stereo[10, 1] = bad
    for samples in (mono, stereo, stereo.T):
        with pytest.raises(ValueError, match="^the audio holds NaN or infinite samples$"):
            to_mono(samples)
        with pytest.raises(ValueError, match="NaN or infinite"):
            to_model_audio(samples, 48_000)


def test_values_too_large_for_float32_are_refused_too():
    with pytest.raises(ValueError, match="NaN or infinite"):
        to_mono(np.array([0.0, 1e300, 0.0]))  # finite in float64, infinite as the model's float32
    with pytest.raises(ValueError, match="NaN or infinite"):
        to_mono(np.full((4, 2), 3e38, np.float32))  # each finite; their sum overflows in the mix


# -- shapes ------------------------------------------------------------------------------------

def test_channels_last_is_averaged():
    left, right = sine(48_000, 48_000, 440), sine(48_000, 48_000, 660)
    mixed = to_mono(np.stack([left, right], 1))
    assert mixed.shape == (48_000,)
    np.testing.assert_allclose(mixed, (left + right) / 2, atol=1e-7)
    six = np.stack([sine(1000, freq=100 * (c + 1)) for c in range(6)], 1)
    np.testing.assert_allclose(to_mono(six), six.mean(axis=1), atol=1e-7)


@pytest.mark.parametrize("channels", [1, 2, 6, 8])
def test_channels_first_is_transposed(channels):
    clip = np.stack([sine(48_000, 48_000, 300 + 100 * c) for c in range(channels)], 1)  # (n, channels)
    expected = to_mono(clip)
    first = to_mono(clip.T)  # (channels, n), as librosa and torchaudio give it
    assert first.shape == (48_000,)
    np.testing.assert_allclose(first, expected, atol=1e-7)
    # ... and to the model: a second of audio, not `channels` samples reported as too short.
    assert to_model_audio(clip.T, 48_000).shape == (MODEL_SAMPLE_RATE,)


def test_channels_first_integer_pcm():
    stereo = np.stack([np.full(1000, 16384, np.int16), np.full(1000, -16384, np.int16)])  # (2, 1000)
    assert to_mono(stereo).tolist() == [0.0] * 1000


@pytest.mark.parametrize("shape,length", [
    ((2, 2), 2),      # both sides could be channels: taken as (n, channels)
    ((2, 5), 2),      # 2 frames of 5 channels, or 5 frames of 2: ambiguous, as it is
    ((5, 6), 5),      # e.g. a 6-channel clip of 5 frames
    ((1, 6), 1),      # one frame of 5.1 sound
    ((8, 8), 8),
    ((8, 9), 9),      # 9 channels is more than taken: channels-first
    ((1, 9), 9),      # one channel, channels-first
    ((9, 100), 9),    # more than 8 rows: 9 frames of 100 channels, as it is
    ((100, 2), 100),
])
def test_which_side_is_the_channels(shape, length):
    assert to_mono(np.zeros(shape, np.float32)).shape == (length,)


@pytest.mark.parametrize("shape", [(), (2, 3, 4), (1, 1, 100)])
def test_other_shapes_are_refused(shape):
    with pytest.raises(ValueError, match=r"audio must be \(samples,\) or \(samples, channels\)"):
        to_mono(np.zeros(shape, np.float32))


# -- rates -------------------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 44100, 48000, 96000])
def test_common_rates_come_to_16_khz_with_the_same_pitch(rate):
    clip = sine(rate, rate, 1000)  # one second of 1 kHz
    out = to_model_audio(clip, rate)
    assert out.dtype == np.float32 and out.shape == (MODEL_SAMPLE_RATE,)
    middle = out[2000:14000]
    assert np.argmax(np.abs(np.fft.rfft(middle * np.hanning(len(middle))))) * MODEL_SAMPLE_RATE / len(middle) \
        == pytest.approx(1000, abs=2)
    assert np.abs(middle).max() == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("rate", [8000, 16000, 22050, 44100, 48000, 96000])
def test_a_single_sample_at_any_rate(rate):
    out = to_model_audio(np.array([0.5], np.float32), rate)
    assert out.dtype == np.float32 and out.ndim == 1 and len(out) <= 2 and np.isfinite(out).all()


def test_a_sample_rate_must_be_positive():
    for rate in (0, -16000):
        with pytest.raises(ValueError, match="sample rate must be positive"):
            resample(sine(100), rate)
