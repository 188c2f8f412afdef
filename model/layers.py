"""The two layers both encoders are built of, in numpy float32: Linear and LayerNorm.

Weights come in PyTorch layout ((out, in) for a Linear) and stay as the file stores them: a float32
weight is used as it is (every call is one GEMM `x @ W.T`; BLAS reads the transposed operand at the
speed of a contiguous copy), a bf16 one is widened to float32 at each call and dropped after it, so
that only one matrix at a time is ever held in float32 (the real encoders: 1.6 GiB instead of 3.3).
Widening is one exact shift at ~1.6 G values/s (0.3 s per forward of each real encoder, more with
the memory traffic: bench/encoders.py's "bf16 file vs f32 file" rows).
Outputs are updated in place (the buffer is the layer's own).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.gguf_weights import GGUFWeights, to_float32


@dataclass
class Linear:
    """y = x @ W.T + b, W (out, in) held as row blocks, each float32 or bf16 bits as stored."""
    blocks: tuple[np.ndarray, ...]   # (out_i, in) each; W is them stacked top to bottom
    factors: tuple[float, ...]       # each block's rows times this once widened (a folded-in scale)
    bias: np.ndarray                 # (out,) float32, the factors already applied

    @classmethod
    def of(cls, weight: np.ndarray, bias: np.ndarray) -> "Linear":
        """From a PyTorch-layout (out, in) weight: float32 (kept, not copied) or bf16 bits."""
        return cls.stack([(weight, bias, 1.0)])

    @classmethod
    def stack(cls, parts: list[tuple[np.ndarray, np.ndarray, float]]) -> "Linear":
        """One Linear from several (weight, bias, factor) with the same input, outputs in order: q, k
        and v as one GEMM, with the attention's score scale folded into q. float32 weights are
        stacked and scaled once here; bf16 ones stay apart and are scaled as they are widened."""
        weights = [w if w.dtype == np.uint16 else np.asarray(w, np.float32) for w, _, _ in parts]
        bias = np.concatenate([np.asarray(b, np.float32) * np.float32(f) for _, b, f in parts])
        factors = tuple(float(f) for _, _, f in parts)
        if all(w.dtype == np.float32 for w in weights):
            if len(parts) > 1 or factors[0] != 1.0:
                weights = [np.concatenate([w * np.float32(f) for w, f in zip(weights, factors)])]
            return cls((weights[0],), (1.0,), bias)
        return cls(tuple(weights), factors, bias)

    @classmethod
    def load(cls, w: GGUFWeights, name: str) -> "Linear":
        return cls.of(w.stored(f"{name}.weight"), w.tensor(f"{name}.bias"))

    @property
    def out_features(self) -> int:
        return self.bias.shape[0]

    @property
    def is_float32(self) -> bool:
        """W is held as one float32 matrix (`stack` makes float32 weights one block)."""
        return len(self.blocks) == 1 and self.blocks[0].dtype == np.float32

    def weight(self) -> np.ndarray:
        """W (out, in) in float32: the stored matrix itself, or a widened copy."""
        if self.is_float32:
            return self.blocks[0]
        out = np.empty((self.out_features, self.blocks[0].shape[1]), np.float32)
        row = 0
        for block, factor in zip(self.blocks, self.factors):
            rows = out[row:row + block.shape[0]]
            to_float32(block, out=rows)
            if factor != 1.0:
                rows *= np.float32(factor)
            row += block.shape[0]
        return out

    def widened(self) -> "Linear":
        """This Linear with its weight in float32 (itself if it is): for a loop that calls it many times."""
        return self if self.is_float32 else Linear((self.weight(),), (1.0,), self.bias)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.weight().T
        y += self.bias
        return y


@dataclass
class LayerNorm:
    weight: np.ndarray
    bias: np.ndarray
    eps: float

    @classmethod
    def load(cls, w: GGUFWeights, name: str, eps: float) -> "LayerNorm":
        return cls(w.tensor(f"{name}.weight"), w.tensor(f"{name}.bias"), eps)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        xc = x - x.mean(-1, keepdims=True)
        var = np.einsum("...i,...i->...", xc, xc)[..., None] / np.float32(x.shape[-1])
        xc *= np.float32(1) / np.sqrt(var + np.float32(self.eps))
        xc *= self.weight
        xc += self.bias
        return xc
