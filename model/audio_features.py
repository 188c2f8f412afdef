"""Log-mel features and audio token counts, as transformers' Phi4MultimodalFeatureExtractor.

Per 25 ms frame (win 400, hop 160 at 16 kHz, no centering, no padding):
    pre-emphasis y[n] - 0.97*y[n-1] (y[-1] := y[0]), x 32768        float32
    x symmetric Hamming window, rFFT with n_fft 512 (zero-padded)   float64, as the reference
    power |S|^2 of the complex64 spectrum                            float32
    log(max(power @ mel_filters, 1.0))                              float32, (n_frames, n_mels)
The mel bank comes from the GGUF (computed by convert/audio_encoder.py exactly as transformers does).
Global CMVN is part of the encoder, not of the features.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.format import AudioKey


@dataclass(frozen=True)
class FeatureConfig:
    """Front-end settings; the defaults are Phi-4-multimodal's (and transformers')."""
    sample_rate: int = 16000
    n_mels: int = 80
    win_length: int = 400
    hop_length: int = 160
    n_fft: int = 512
    preemphasis: float = 0.97
    pcm_scale: float = 32768.0
    log_floor: float = 1.0
    compression_rate: int = 8   # encoder time reduction: frames per audio token
    downsample_rate: int = 1    # extra (qformer) compression, 1 for Phi-4-multimodal
    feat_stride: int = 1

    @classmethod
    def from_gguf(cls, weights) -> "FeatureConfig":
        g, K = weights.get, AudioKey
        return cls(
            sample_rate=int(g(K.FE_SAMPLE_RATE)), n_mels=int(g(K.FE_N_MELS)), win_length=int(g(K.FE_WIN_LENGTH)),
            hop_length=int(g(K.FE_HOP_LENGTH)), n_fft=int(g(K.FE_N_FFT)), preemphasis=float(g(K.FE_PREEMPHASIS)),
            pcm_scale=float(g(K.FE_PCM_SCALE)), log_floor=float(g(K.FE_LOG_FLOOR)),
            compression_rate=int(g(K.FE_COMPRESSION_RATE)), downsample_rate=int(g(K.FE_DOWNSAMPLE_RATE)),
            feat_stride=int(g(K.FE_FEAT_STRIDE)),
        )


DEFAULT_FEATURES = FeatureConfig()


def num_audio_frames(n_samples: int, cfg: FeatureConfig = DEFAULT_FEATURES) -> int:
    """Feature frames of a clip; a ValueError below one window (the reference refuses such clips)."""
    n_samples = int(n_samples)
    if n_samples < cfg.win_length:
        raise ValueError(f"audio too short: {n_samples} samples, need at least {cfg.win_length} "
                         f"({1000 * cfg.win_length / cfg.sample_rate:g} ms at {cfg.sample_rate} Hz)")
    return (n_samples - cfg.win_length) // cfg.hop_length + 1


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def num_audio_tokens(n_samples: int, cfg: FeatureConfig = DEFAULT_FEATURES) -> int:
    """Audio placeholder tokens for a 16 kHz clip of `n_samples`, as the reference processor counts them.

    ceil(ceil(frames * feat_stride / compression_rate) / downsample_rate); e.g. 1 s -> 13, 30 s -> 375.
    """
    frames = num_audio_frames(n_samples, cfg) * cfg.feat_stride
    return _ceil_div(_ceil_div(frames, cfg.compression_rate), cfg.downsample_rate)


class LogMel:
    """samples (n,) 16 kHz mono -> log-mel features (n_frames, n_mels) float32."""

    def __init__(self, cfg: FeatureConfig, mel_filters: np.ndarray, block_frames: int = 4096):
        n_freq = cfg.n_fft // 2 + 1
        self.cfg = cfg
        self.mel_filters = np.ascontiguousarray(mel_filters, dtype=np.float32).reshape(n_freq, cfg.n_mels)
        self.window = np.hamming(cfg.win_length)          # float64, symmetric = hamming_window(periodic=False)
        self.block_frames = block_frames                  # frames per FFT batch: bounds memory on long clips

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        cfg = self.cfg
        x = np.asarray(samples)
        if x.ndim != 1:
            raise ValueError(f"expected mono samples of shape (n,), got {x.shape}; use model.audio_io.to_model_audio")
        x = x.astype(np.float32, copy=False)              # the reference converts its input to float32 first
        n_frames = num_audio_frames(len(x), cfg)
        frames = np.lib.stride_tricks.sliding_window_view(x, cfg.win_length)[::cfg.hop_length]  # (T, win) view
        out = np.empty((n_frames, cfg.n_mels), dtype=np.float32)
        pre = np.float32(cfg.preemphasis)
        for s in range(0, n_frames, self.block_frames):
            f = frames[s:s + self.block_frames]                                   # (B, win) float32
            prev = np.concatenate([f[:, :1], f[:, :-1]], axis=1)                  # y[n-1], y[-1] := y[0]
            f = (f - pre * prev) * np.float32(cfg.pcm_scale)                      # float32
            spec = np.fft.rfft(self.window * f, n=cfg.n_fft, axis=1)              # (B, n_fft//2+1) complex128
            spec = spec.astype(np.complex64)
            power = np.abs(spec) ** 2                                             # float32
            mel = power @ self.mel_filters                                        # (B, n_mels)
            out[s:s + len(f)] = np.log(np.maximum(mel, np.float32(cfg.log_floor)))
        return out
