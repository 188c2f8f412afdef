"""Phi-4-multimodal speech encoder: 16 kHz samples -> audio embeddings for the decoder.

    samples (n,) float32 16 kHz mono
    -> log-mel (T, 80)                       model/audio_features.py
    -> conformer (T', H), T' = ceil(T / 8)   model/conformer.py
    -> projector for the mode (T', P):       Linear(H, P) -> GELU(erf) -> Linear(P, P)
         "speech": audio only in the prompt; "vision": image and audio both present (phi4mm.md §4.3)

The rows of `embed` replace the prompt's audio placeholder tokens one for one; their number is
`num_tokens(len(samples))` (= the reference processor's `audio_embed_sizes`).

Input at other rates or with channels: `embed_any(samples, rate, mode)` mixes to mono and resamples
with model/audio_io.py (libsoxr); `embed` itself takes 16 kHz mono only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from model.audio_features import FeatureConfig, LogMel, num_audio_tokens
from model.audio_io import to_model_audio
from model.conformer import ConformerEncoder, gelu
from model.gguf_weights import GGUFWeights, load_gguf
from model.layers import Linear

ARCH = "phi4mm-audio"
MODES = ("speech", "vision")


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
        if w.arch != ARCH:
            raise ValueError(f"not a speech-encoder GGUF: architecture {w.arch!r}, expected {ARCH!r}")
        fcfg = FeatureConfig.from_gguf(w)
        features = LogMel(fcfg, w.tensor("fe.mel_filters"))
        projectors = {m: Projector(Linear.load(w, f"proj.{m}.up"), Linear.load(w, f"proj.{m}.down")) for m in MODES}
        return cls(features, ConformerEncoder.load(w), projectors, int(w.get("audio_token_id")))

    @property
    def sample_rate(self) -> int:
        return self.features.cfg.sample_rate

    @property
    def hidden_size(self) -> int:
        """Width of the embeddings (the decoder's hidden size)."""
        return self.projectors["speech"].down.wt.shape[1]

    def num_tokens(self, n_samples: int) -> int:
        """Audio tokens for a clip of `n_samples` at 16 kHz; ValueError for clips under one window (400 samples)."""
        return num_audio_tokens(n_samples, self.features.cfg)

    def encode(self, samples: np.ndarray) -> np.ndarray:
        """(n,) 16 kHz mono -> conformer output (n_tokens, H), before the projector."""
        return self.encoder(self.features(samples))

    def project(self, hidden: np.ndarray, mode: str = "speech") -> np.ndarray:
        if mode not in self.projectors:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        return self.projectors[mode](hidden)

    def embed(self, samples: np.ndarray, mode: str = "speech") -> np.ndarray:
        """(n,) float32 16 kHz mono -> (n_tokens, hidden_size) float32 embeddings."""
        if mode not in self.projectors:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        out = self.project(self.encode(samples), mode)
        assert out.shape[0] == self.num_tokens(len(samples))
        return out

    def embed_any(self, samples: np.ndarray, rate: int, mode: str = "speech") -> np.ndarray:
        """Any rate, mono or (n, channels), float or integer PCM -> embeddings (mono mix, libsoxr resampling)."""
        return self.embed(to_model_audio(samples, rate), mode)
