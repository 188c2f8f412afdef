"""The Phi-4-multimodal conformer (speech encoder body) in numpy, float32.

    features (T, n_mels)
    -> global CMVN                          (x - mean) * invstd
    -> dw_striding conv subsampling (x8)    (T', H), T' = ceil(T / 8)
    -> windows of 500 frames if T' > 500    zero-padded, each attended independently (as transformers)
    -> N conformer blocks                   macaron FFN, MHSA + T5-style relative bias, GLU causal conv, FFN
    -> (T', H)

Shapes: T feature frames, L frames in one window, H width, nh heads of d = H / nh, C conv channels.
Weights come from a GGUF written by convert/audio_encoder.py (names documented there).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


# -- elementwise ----------------------------------------------------------------------------------

def silu(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x / (np.float32(1) + np.exp(-x))


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, np.float32(0))


_ERF_A = [-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02]
_ERF_B = [-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02]


def erf(x: np.ndarray) -> np.ndarray:
    """float32 erf (rational approximation used by Eigen/XLA; |error| < 5e-7)."""
    x = np.clip(x, np.float32(-4), np.float32(4))
    x2 = x * x
    p = np.float32(_ERF_A[0])
    for c in _ERF_A[1:]:
        p = p * x2 + np.float32(c)
    q = np.float32(_ERF_B[0])
    for c in _ERF_B[1:]:
        q = q * x2 + np.float32(c)
    return x * p / q


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, as torch.nn.functional.gelu."""
    return np.float32(0.5) * x * (np.float32(1) + erf(x * np.float32(0.7071067811865476)))


ACTIVATIONS = {"swish": silu, "silu": silu, "relu": relu, "gelu": gelu}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r} (one of {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


# -- layers ---------------------------------------------------------------------------------------

@dataclass
class Linear:
    weight: np.ndarray  # (out, in)
    bias: np.ndarray    # (out,)

    @classmethod
    def load(cls, w, name: str) -> "Linear":
        return cls(w.tensor(f"{name}.weight"), w.tensor(f"{name}.bias"))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias


@dataclass
class LayerNorm:
    weight: np.ndarray
    bias: np.ndarray
    eps: float

    @classmethod
    def load(cls, w, name: str, eps: float) -> "LayerNorm":
        return cls(w.tensor(f"{name}.weight"), w.tensor(f"{name}.bias"), eps)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        xc = x - mu
        var = (xc * xc).mean(-1, keepdims=True)
        return xc / np.sqrt(var + np.float32(self.eps)) * self.weight + self.bias


@dataclass
class FeedForward:
    """LN -> Linear(H, 2I) -> value * act(gate) -> Linear(I, H). NB: first half is the value, second the gate."""
    norm: LayerNorm
    up: Linear
    down: Linear
    act: object

    @classmethod
    def load(cls, w, name: str, eps: float, act) -> "FeedForward":
        return cls(LayerNorm.load(w, f"{name}.norm", eps), Linear.load(w, f"{name}.up"),
                   Linear.load(w, f"{name}.down"), act)

    def __call__(self, x: np.ndarray) -> np.ndarray:   # (L, H) -> (L, H)
        h = self.up(self.norm(x))                       # (L, 2I)
        value, gate = np.split(h, 2, axis=-1)           # (L, I) each
        return self.down(value * self.act(gate))


@dataclass
class Attention:
    """Multi-head self-attention over one window, with an additive (nh, L, L) relative-position bias."""
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    n_head: int
    head_dim: int

    @classmethod
    def load(cls, w, name: str, n_head: int, head_dim: int) -> "Attention":
        return cls(*(Linear.load(w, f"{name}.{p}") for p in "qkvo"), n_head, head_dim)

    def __call__(self, x: np.ndarray, bias: np.ndarray) -> np.ndarray:
        L = x.shape[0]
        q = self.q(x).reshape(L, self.n_head, self.head_dim).transpose(1, 0, 2)  # (nh, L, d)
        k = self.k(x).reshape(L, self.n_head, self.head_dim).transpose(1, 0, 2)
        v = self.v(x).reshape(L, self.n_head, self.head_dim).transpose(1, 0, 2)
        # transformers also adds a constant +1 (its all-true bool mask) here: softmax ignores it.
        s = (q @ k.transpose(0, 2, 1)) * np.float32(self.head_dim ** -0.5) + bias  # (nh, L, L)
        s = np.exp(s - s.max(-1, keepdims=True))
        p = s / s.sum(-1, keepdims=True)
        y = (p @ v).transpose(1, 0, 2).reshape(L, self.n_head * self.head_dim)    # (L, H)
        return self.o(y)


@dataclass
class ConvModule:
    """LN -> pointwise GLU -> causal depthwise conv -> pointwise -> act -> pointwise."""
    norm: LayerNorm
    glu: Linear          # (2E, H)
    glu_b1: np.ndarray   # (E,)
    glu_b2: np.ndarray   # (E,)
    glu_act: object
    dw_weight: np.ndarray  # (H*m, K)
    dw_bias: np.ndarray    # (H*m,)
    multiplier: int
    pw: Linear           # (D, H*m)
    act: object
    out: Linear          # (E, D)

    @classmethod
    def load(cls, w, name: str, eps: float, glu_act, act, multiplier: int) -> "ConvModule":
        return cls(LayerNorm.load(w, f"{name}.norm", eps), Linear.load(w, f"{name}.glu"),
                   w.tensor(f"{name}.glu_b1"), w.tensor(f"{name}.glu_b2"), glu_act,
                   w.tensor(f"{name}.dw.weight"), w.tensor(f"{name}.dw.bias"), multiplier,
                   Linear.load(w, f"{name}.pw"), act, Linear.load(w, f"{name}.out"))

    def __call__(self, x: np.ndarray) -> np.ndarray:   # (L, H) -> (L, E)
        L = x.shape[0]
        z = self.glu(self.norm(x))                      # (L, 2E)
        value, gate = np.split(z, 2, axis=-1)
        z = (value + self.glu_b1) * self.glu_act(gate + self.glu_b2)  # (L, E = H)
        if self.multiplier > 1:
            z = np.repeat(z, self.multiplier, axis=1)   # depthwise output channel o reads input channel o // m
        K = self.dw_weight.shape[1]
        zp = np.concatenate([np.zeros((K - 1, z.shape[1]), z.dtype), z])      # causal: K-1 zeros on the left
        y = self.dw_bias + sum(zp[i:i + L] * self.dw_weight[:, i] for i in range(K))  # (L, H*m)
        return self.out(self.act(self.pw(y)))


@dataclass
class ConformerBlock:
    ffn_in: FeedForward
    attn_norm: LayerNorm
    attn: Attention
    conv: ConvModule
    ffn_out: FeedForward
    norm: LayerNorm

    def __call__(self, x: np.ndarray, bias: np.ndarray) -> np.ndarray:  # (L, H) -> (L, H)
        x = x + np.float32(0.5) * self.ffn_in(x)
        x = x + self.attn(self.attn_norm(x), bias)
        x = x + self.conv(x)
        x = x + np.float32(0.5) * self.ffn_out(x)
        return self.norm(x)


@dataclass
class RelativeBias:
    """T5-style bias without bucketing: bias[h, i, j] = table[clip(j - i, -D, D-1) (+ D, or abs if symmetric), h]."""
    table: np.ndarray   # (buckets, nh)
    max_distance: int
    symmetric: bool

    def __call__(self, L: int) -> np.ndarray:          # -> (nh, L, L)
        pos = np.arange(L)
        rel = np.clip(pos[None, :] - pos[:, None], -self.max_distance, self.max_distance - 1)
        idx = np.abs(rel) if self.symmetric else rel + self.max_distance
        return np.ascontiguousarray(self.table[idx].transpose(2, 0, 1))


# -- conv subsampling -----------------------------------------------------------------------------

def _rows(x: np.ndarray, start: int, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of a sequence of which `x` holds rows [start, start + len(x)); zeros elsewhere."""
    out = np.zeros((hi - lo,) + x.shape[1:], x.dtype)
    s, e = max(lo, start), min(hi, start + len(x))
    out[s - lo:e - lo] = x[s - start:e - start]
    return out


@dataclass
class ConvSubsampling:
    """NeMo "dw_striding": Conv2d(1, C, 3, s2, p1) -> act, then per further x2:
    depthwise Conv2d(C, 3, s2, p1) -> pointwise Conv2d(C, C, 1) -> act; then Linear(C*F', H).
    Activations are kept channels-last (time, freq, C); time is processed in chunks so that
    long clips never hold the (T/2, 40, C) first-layer activation whole."""
    conv0_w: np.ndarray              # (9, C): im2col weight of the first conv
    conv0_b: np.ndarray              # (C,)
    dw: list[tuple[np.ndarray, np.ndarray]]   # per later layer: (3, 3, C) weight, (C,) bias
    pw: list[Linear]                 # per later layer: (C, C)
    out: Linear                      # (H, F' * C), input permuted to channels-last order f*C + c
    act: object
    chunk: int = 64                  # output frames per chunk

    @classmethod
    def load(cls, w) -> "ConvSubsampling":
        g = w.get
        n_layers = int(np.log2(int(g("subsampling.time_reduction"))))
        C, F = int(g("subsampling.conv_channels")), int(g("subsampling.final_freq"))
        conv0 = w.tensor("sub.conv0.weight")                                       # (C, 1, 3, 3)
        dw = [(w.tensor(f"sub.{i}.dw.weight")[:, 0].transpose(1, 2, 0).copy(), w.tensor(f"sub.{i}.dw.bias"))
              for i in range(1, n_layers)]
        pw = [Linear.load(w, f"sub.{i}.pw") for i in range(1, n_layers)]
        out_w = w.tensor("sub.out.weight")                                         # (H, C*F), index c*F + f
        H = out_w.shape[0]
        out_w = np.ascontiguousarray(out_w.reshape(H, C, F).transpose(0, 2, 1).reshape(H, F * C))
        return cls(np.ascontiguousarray(conv0.reshape(C, 9).T), w.tensor("sub.conv0.bias"), dw, pw,
                   Linear(out_w, w.tensor("sub.out.bias")), activation(str(g("subsampling.activation"))))

    @property
    def n_layers(self) -> int:
        return 1 + len(self.dw)

    def _layer(self, i: int, x: np.ndarray) -> np.ndarray:
        """Stride-2 layer i: input rows [2lo-1, 2hi) with zero rows as padding, (2n+1, F, Cin) -> (n, F', C)."""
        n = (x.shape[0] - 1) // 2
        xp = np.pad(x, ((0, 0), (1, 1), (0, 0)))                                 # zero padding in frequency
        F_out = (x.shape[1] - 1) // 2 + 1
        if i == 0:
            patches = np.lib.stride_tricks.sliding_window_view(xp[..., 0], (3, 3))[::2, ::2]  # (n, F', 3, 3)
            y = patches.reshape(n * F_out, 9) @ self.conv0_w + self.conv0_b     # (n*F', C)
        else:
            w, b = self.dw[i - 1]
            y = b + sum(xp[a:a + 2 * n - 1:2, c:c + 2 * F_out - 1:2] * w[a, c]
                        for a in range(3) for c in range(3))                     # (n, F', C) depthwise
            y = self.pw[i - 1](y.reshape(n * F_out, -1))                         # (n*F', C)
        return self.act(y).reshape(n, F_out, -1)

    def __call__(self, x: np.ndarray) -> np.ndarray:   # (T, n_mels) -> (ceil(T / 2^n), H)
        lengths = [x.shape[0]]
        for _ in range(self.n_layers):
            lengths.append((lengths[-1] + 1) // 2)      # Conv(k3, s2, p1): ceil(L / 2)
        T_out = lengths[-1]
        out = np.empty((T_out, self.out.weight.shape[0]), np.float32)
        for a in range(0, T_out, self.chunk):
            b = min(a + self.chunk, T_out)
            # rows each layer must produce, top-down: outputs [lo, hi) read inputs [2lo-1, 2hi)
            ranges = [(a, b)]
            for l in range(self.n_layers, 0, -1):
                lo, hi = ranges[0]
                ranges.insert(0, (max(2 * lo - 1, 0), min(2 * hi, lengths[l - 1])))
            y = x[ranges[0][0]:ranges[0][1], :, None]   # (rows, n_mels, 1)
            for l in range(1, self.n_layers + 1):
                lo, hi = ranges[l]
                y = self._layer(l - 1, _rows(y, ranges[l - 1][0], 2 * lo - 1, 2 * hi))
            out[a:b] = self.out(y.reshape(b - a, -1))
        return out


# -- encoder --------------------------------------------------------------------------------------

@dataclass
class ConformerEncoder:
    mean: np.ndarray     # (n_mels,)
    invstd: np.ndarray   # (n_mels,)
    subsampling: ConvSubsampling
    rel_bias: RelativeBias
    blocks: list[ConformerBlock]
    window: int          # frames per independent attention window (500)

    @classmethod
    def load(cls, w) -> "ConformerEncoder":
        g = w.get
        eps = float(g("attention.layer_norm_epsilon"))
        n_head, head_dim = int(g("attention.head_count")), int(g("attention.head_dim"))
        ffn_act = activation(str(g("activation.ffn")))
        conv_act, glu_act = activation(str(g("activation.conv"))), activation(str(g("activation.glu")))
        mult = int(g("conv.depthwise_multiplier"))
        blocks = [
            ConformerBlock(
                ffn_in=FeedForward.load(w, f"blk.{k}.ffn_in", eps, ffn_act),
                attn_norm=LayerNorm.load(w, f"blk.{k}.attn_norm", eps),
                attn=Attention.load(w, f"blk.{k}.attn", n_head, head_dim),
                conv=ConvModule.load(w, f"blk.{k}.conv", eps, glu_act, conv_act, mult),
                ffn_out=FeedForward.load(w, f"blk.{k}.ffn_out", eps, ffn_act),
                norm=LayerNorm.load(w, f"blk.{k}.norm", eps),
            )
            for k in range(int(g("block_count")))
        ]
        rel = RelativeBias(w.tensor("rel_bias.weight"), int(g("attention.bias_max_distance")),
                           bool(g("attention.bias_symmetric")))
        return cls(w.tensor("cmvn.mean"), w.tensor("cmvn.invstd"), ConvSubsampling.load(w), rel, blocks,
                   int(g("attention.window_frames")))

    def __call__(self, features: np.ndarray) -> np.ndarray:  # (T, n_mels) -> (T', H)
        if features.ndim != 2 or features.shape[0] == 0:
            raise ValueError(f"expected features of shape (frames >= 1, n_mels), got {features.shape}")
        x = (features.astype(np.float32, copy=False) - self.mean) * self.invstd
        x = self.subsampling(x)                                   # (T', H)
        T = x.shape[0]
        if T <= self.window:
            return self._blocks(x)
        # As transformers: zero-pad to a whole number of windows; every window (the padded last one
        # included, its padding unmasked) runs through the blocks on its own; the padding is cut off.
        n_win = -(-T // self.window)
        x = np.concatenate([x, np.zeros((n_win * self.window - T, x.shape[1]), x.dtype)])
        out = np.concatenate([self._blocks(win) for win in np.split(x, n_win)])
        return out[:T]

    def _blocks(self, x: np.ndarray) -> np.ndarray:          # (L, H) -> (L, H)
        bias = self.rel_bias(x.shape[0])                          # (nh, L, L)
        for block in self.blocks:
            x = block(x, bias)
        return x
