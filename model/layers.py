"""The two layers both encoders are built of, in numpy float32: Linear and LayerNorm.

Weights come in PyTorch layout ((out, in) for a Linear); a Linear keeps the transposed view, so that
every call is one GEMM `x @ wt` (BLAS reads the transposed operand at the same speed as a contiguous
copy, and a copy would double the encoders' memory while they load); outputs are updated in place
(the buffer is the layer's own).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Linear:
    wt: np.ndarray      # (in, out): a transposed view of the (out, in) weight
    bias: np.ndarray    # (out,)

    @classmethod
    def of(cls, weight: np.ndarray, bias: np.ndarray) -> "Linear":
        """From a PyTorch-layout (out, in) weight."""
        return cls(np.asarray(weight, dtype=np.float32).T, np.asarray(bias, np.float32))

    @classmethod
    def load(cls, w, name: str) -> "Linear":
        return cls.of(w.tensor(f"{name}.weight"), w.tensor(f"{name}.bias"))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.wt
        y += self.bias
        return y


@dataclass
class LayerNorm:
    weight: np.ndarray
    bias: np.ndarray
    eps: float

    @classmethod
    def load(cls, w, name: str, eps: float) -> "LayerNorm":
        return cls(w.tensor(f"{name}.weight"), w.tensor(f"{name}.bias"), eps)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        xc = x - x.mean(-1, keepdims=True)
        var = np.einsum("...i,...i->...", xc, xc)[..., None] / np.float32(x.shape[-1])
        xc *= np.float32(1) / np.sqrt(var + np.float32(self.eps))
        xc *= self.weight
        xc += self.bias
        return xc
