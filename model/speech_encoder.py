"""Phi-4-multimodal speech encoder: 16 kHz samples -> audio embeddings for the decoder.

    samples (n,) float32 16 kHz mono
    -> log-mel (T, 80)                       model/audio_features.py
    -> conformer (T', H), T' = ceil(T / 8)   model/conformer.py
    -> projector for the mode (T', P):       Linear(H, P) -> GELU(erf) -> Linear(P, P)
         "speech": audio only in the prompt; "vision": image and audio both present
         (docs/model.md, "Speech encoder")

The rows of `embed` replace the prompt's audio placeholder tokens one for one; their number is
`num_tokens(len(samples))` (= the reference processor's `audio_embed_sizes`).

`embed` takes 16 kHz mono; model/audio_io.py `to_model_audio` brings other rates and channel
counts there (a mono mix, libsoxr resampling).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from model.audio_features import FeatureConfig, LogMel, num_audio_tokens
from model.conformer import ConformerEncoder, gelu
from model.format import AUDIO_MODES, Arch, AudioKey, AudioTensor
from model.gguf_weights import GGUFWeights, load_gguf
from model.layers import Linear


@dataclass
class Projector:
    up: Linear     # H -> P
    down: Linear   # P -> P

    def __call__(self, x: np.ndarray) -> np.ndarray:   # (T', H) -> (T', P)
        return self.down(gelu(self.up(x)))


@dataclass
class SpeechEncoder:
    features: LogMel
    encoder: ConformerEncoder
    projectors: dict[str, Projector]
    audio_token_id: int

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SpeechEncoder":
        return cls.from_weights(load_gguf(path))

    @classmethod
    def from_weights(cls, w: GGUFWeights) -> "SpeechEncoder":
        if w.arch != Arch.AUDIO:
            raise ValueError(f"not a speech-encoder GGUF: architecture {w.arch!r}, expected {Arch.AUDIO!r}")
        fcfg = FeatureConfig.from_gguf(w)
        features = LogMel(fcfg, w.tensor(AudioTensor.MEL_FILTERS))
        projectors = {mode: Projector(Linear.load(w, AudioTensor.PROJ_UP.format(mode=mode)),
                                      Linear.load(w, AudioTensor.PROJ_DOWN.format(mode=mode)))
                      for mode in AUDIO_MODES}
        return cls(features, ConformerEncoder.load(w), projectors, int(w.get(AudioKey.AUDIO_TOKEN_ID)))

    @property
    def sample_rate(self) -> int:
        return self.features.cfg.sample_rate

    @property
    def hidden_size(self) -> int:
        """Width of the embeddings (the decoder's hidden size)."""
        return self.projectors["speech"].down.out_features

    def num_tokens(self, n_samples: int) -> int:
        """Audio tokens for a clip of `n_samples` at 16 kHz; ValueError for clips under one window (400 samples)."""
        return num_audio_tokens(n_samples, self.features.cfg)

    def encode(self, samples: np.ndarray) -> np.ndarray:
        """(n,) 16 kHz mono -> conformer output (n_tokens, H), before the projector."""
        return self.encoder(self.features(samples))

    def project(self, hidden: np.ndarray, mode: str = "speech") -> np.ndarray:
        if mode not in self.projectors:
            raise ValueError(f"mode must be one of {AUDIO_MODES}, got {mode!r}")
        return self.projectors[mode](hidden)

    def embed(self, samples: np.ndarray, mode: str = "speech") -> np.ndarray:
        """(n,) float32 16 kHz mono -> (n_tokens, hidden_size) float32 embeddings."""
        if mode not in self.projectors:
            raise ValueError(f"mode must be one of {AUDIO_MODES}, got {mode!r}")
        out = self.project(self.encode(samples), mode)
        assert out.shape[0] == self.num_tokens(len(samples))
        return out
