"""The Phi-4-multimodal conformer (speech encoder body) in numpy, float32.

    features (T, n_mels)
    -> global CMVN                          (x - mean) * invstd
    -> dw_striding conv subsampling (x8)    (T', H), T' = ceil(T / 8)
    -> windows of 500 frames if T' > 500    zero-padded, each attended independently (as transformers)
    -> N conformer blocks                   macaron FFN, MHSA + T5-style relative bias, GLU causal conv, FFN
    -> (T', H)

Shapes: T feature frames, L frames in one window, H width, nh heads of d = H / nh, C conv channels.
Weights come from a GGUF written by convert/audio_encoder.py, read by the names of model/format.py
(`AudioTensor`, `AudioKey`; docs/model.md, "Speech encoder").

Speed (bench/encoders.py): weights are used as transposed views (bf16 ones widened a matrix at a
time, model/layers.py), q/k/v are one GEMM with the score scale folded into q, the GLU biases are
folded into the GLU projection's, activations are updated in place where the buffer is ours, and the
subsampling's depthwise convolutions apply each tap to the output block it reaches instead of
building padded copies.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.format import AudioKey, AudioTensor
from model.layers import LayerNorm, Linear


# -- elementwise ----------------------------------------------------------------------------------

def silu_(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), in place."""
    t = np.negative(x)
    with np.errstate(over="ignore"):
        np.exp(t, out=t)
    t += np.float32(1)
    x /= t
    return x


def relu_(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, np.float32(0), out=x)


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


# in-place versions (they overwrite and return their argument; gelu returns a new array)
ACTIVATIONS = {"swish": silu_, "silu": silu_, "relu": relu_, "gelu": gelu}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r} (one of {sorted(ACTIVATIONS)})")
    return ACTIVATIONS[name]


# -- blocks ---------------------------------------------------------------------------------------

@dataclass
class FeedForward:
    """LN -> Linear(H, 2I) -> value * act(gate) -> Linear(I, H). NB: first half is the value, second the gate."""
    norm: LayerNorm
    up: Linear
    down: Linear
    act: object

    @classmethod
    def load(cls, w, bid: int, side: str, eps: float, act) -> "FeedForward":
        """Block `bid`'s feed-forward on `side` "in" (before attention) or "out" (after the conv)."""
        name = lambda module: module.format(bid=bid, side=side)
        return cls(LayerNorm.load(w, name(AudioTensor.BLK_FFN_NORM), eps), Linear.load(w, name(AudioTensor.BLK_FFN_UP)),
                   Linear.load(w, name(AudioTensor.BLK_FFN_DOWN)), act)

    def __call__(self, x: np.ndarray) -> np.ndarray:   # (L, H) -> (L, H)
        h = self.up(self.norm(x))                       # (L, 2I)
        inner = h.shape[1] // 2
        value = h[:, :inner]                            # views: scratch buffers from here on
        value *= self.act(h[:, inner:])
        return self.down(value)


@dataclass
class Attention:
    """Multi-head self-attention over one window, with an additive (nh, L, L) relative-position bias."""
    qkv: Linear     # (H, 3 * nh * d): [q / sqrt(d) | k | v], fused at load
    o: Linear
    n_head: int
    head_dim: int

    @classmethod
    def load(cls, w, bid: int, n_head: int, head_dim: int) -> "Attention":
        T = AudioTensor
        t = lambda module, part: w.tensor(f"{module.format(bid=bid)}.{part}")
        scale = np.float32(head_dim ** -0.5)            # the score scale, folded into q
        qkv = Linear.stack([(w.stored(f"{m.format(bid=bid)}.weight"), t(m, "bias"), f)
                            for m, f in ((T.BLK_ATTN_Q, scale), (T.BLK_ATTN_K, 1.0), (T.BLK_ATTN_V, 1.0))])
        return cls(qkv, Linear.load(w, T.BLK_ATTN_O.format(bid=bid)), n_head, head_dim)

    def __call__(self, x: np.ndarray, bias: np.ndarray) -> np.ndarray:
        L, nh, d = x.shape[0], self.n_head, self.head_dim
        qkv = self.qkv(x).reshape(L, 3, nh, d)
        q = np.ascontiguousarray(qkv[:, 0].transpose(1, 0, 2))    # (nh, L, d)
        k_t = np.ascontiguousarray(qkv[:, 1].transpose(1, 2, 0))  # (nh, d, L)
        v = np.ascontiguousarray(qkv[:, 2].transpose(1, 0, 2))    # (nh, L, d)
        # transformers also adds a constant +1 (its all-true bool mask) here: softmax ignores it.
        s = q @ k_t                                               # (nh, L, L)
        s += bias
        s -= s.max(-1, keepdims=True)
        np.exp(s, out=s)
        y = s @ v                                                 # (nh, L, d), normalised after the product
        y /= s.sum(-1, keepdims=True)
        return self.o(y.transpose(1, 0, 2).reshape(L, nh * d))


@dataclass
class ConvModule:
    """LN -> pointwise GLU -> causal depthwise conv -> pointwise -> act -> pointwise."""
    norm: LayerNorm
    glu: Linear          # (H, 2E), the GLU biases b1 / b2 folded into its bias
    glu_act: object
    dw_weight: np.ndarray  # (K, H*m): tap-major
    dw_bias: np.ndarray    # (H*m,)
    multiplier: int
    pw: Linear           # (H*m, D)
    act: object
    out: Linear          # (D, E)

    @classmethod
    def load(cls, w, bid: int, eps: float, glu_act, act, multiplier: int) -> "ConvModule":
        T = AudioTensor
        name = lambda module: module.format(bid=bid)
        glu = Linear.load(w, name(T.BLK_CONV_GLU))
        glu.bias = glu.bias + np.concatenate([w.tensor(name(T.BLK_CONV_GLU_B1)), w.tensor(name(T.BLK_CONV_GLU_B2))])
        return cls(LayerNorm.load(w, name(T.BLK_CONV_NORM), eps), glu, glu_act,
                   np.ascontiguousarray(w.tensor(name(T.BLK_CONV_DW) + ".weight").T),
                   w.tensor(name(T.BLK_CONV_DW) + ".bias"), multiplier,
                   Linear.load(w, name(T.BLK_CONV_PW)), act, Linear.load(w, name(T.BLK_CONV_OUT)))

    def __call__(self, x: np.ndarray) -> np.ndarray:   # (L, H) -> (L, E)
        z = self.glu(self.norm(x))                      # (L, 2E)
        E = z.shape[1] // 2
        z, gate = z[:, :E], z[:, E:]
        z *= self.glu_act(gate)                         # (L, E = H)
        if self.multiplier > 1:
            z = np.repeat(z, self.multiplier, axis=1)   # depthwise output channel o reads input channel o // m
        # causal depthwise conv: y[t] = b + sum_s z[t - s] * w[K-1-s], zeros before the start
        K = self.dw_weight.shape[0]
        y = z * self.dw_weight[K - 1]
        y += self.dw_bias
        for s in range(1, K):
            y[s:] += z[:-s] * self.dw_weight[K - 1 - s]
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
        half = np.float32(0.5)
        x = x + half * self.ffn_in(x)                   # a new array: the caller's x is left alone
        x += self.attn(self.attn_norm(x), bias)
        x += self.conv(x)
        f = self.ffn_out(x)
        f *= half
        x += f
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
        return np.ascontiguousarray(self.table.T[:, idx])


# -- conv subsampling -----------------------------------------------------------------------------

def _rows(x: np.ndarray, start: int, lo: int, hi: int) -> np.ndarray:
    """Rows [lo, hi) of a sequence of which `x` holds rows [start, start + len(x)); zeros elsewhere."""
    s, e = max(lo, start), min(hi, start + len(x))
    out = np.zeros((hi - lo,) + x.shape[1:], x.dtype)
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
    out: Linear                      # (F' * C, H), input permuted to channels-last order f*C + c
    act: object                      # in place
    chunk: int = 32                  # output frames per chunk (32: the fastest of 4..64 at 30 s)

    @classmethod
    def load(cls, w) -> "ConvSubsampling":
        g, T = w.get, AudioTensor
        n_layers = int(np.log2(int(g(AudioKey.SUBSAMPLING_TIME_REDUCTION))))
        C, F = int(g(AudioKey.SUBSAMPLING_CONV_CHANNELS)), int(g(AudioKey.SUBSAMPLING_FINAL_FREQ))
        conv0 = w.tensor(T.SUB_CONV0 + ".weight")                                  # (C, 1, 3, 3)
        dw = [(w.tensor(T.SUB_DW.format(i=i) + ".weight")[:, 0].transpose(1, 2, 0).copy(),
               w.tensor(T.SUB_DW.format(i=i) + ".bias"))
              for i in range(1, n_layers)]
        pw = [Linear.load(w, T.SUB_PW.format(i=i)) for i in range(1, n_layers)]
        out_w = w.stored(T.SUB_OUT + ".weight")                                    # (H, C*F), index c*F + f
        H = out_w.shape[0]
        out_w = out_w.reshape(H, C, F).transpose(0, 2, 1).reshape(H, F * C)
        return cls(np.ascontiguousarray(conv0.reshape(C, 9).T), w.tensor(T.SUB_CONV0 + ".bias"), dw, pw,
                   Linear.of(out_w, w.tensor(T.SUB_OUT + ".bias")), activation(str(g(AudioKey.SUBSAMPLING_ACTIVATION))))

    @property
    def n_layers(self) -> int:
        return 1 + len(self.dw)

    def _first(self, x: np.ndarray) -> np.ndarray:
        """First layer, Conv2d(1, C, 3, s2, p1) as an im2col matmul: (2n+1, F) rows (zero rows as
        padding) -> (n, F', C)."""
        n, F = (x.shape[0] - 1) // 2, x.shape[1]
        F_out = (F - 1) // 2 + 1
        xp = np.pad(x, ((0, 0), (1, 1)))                                         # zero padding in frequency
        patches = np.lib.stride_tricks.sliding_window_view(xp, (3, 3))[::2, ::2]  # (n, F', 3, 3)
        y = patches.reshape(n * F_out, 9) @ self.conv0_w                         # (n*F', C)
        y += self.conv0_b
        return self.act(y).reshape(n, F_out, -1)

    def _later(self, i: int, pw: Linear, x: np.ndarray, start: int, lo: int, hi: int) -> np.ndarray:
        """Later layer i with its pointwise conv `pw`: `x` (rows, F, C) holds the input rows
        [start, start + rows) that outputs [lo, hi) read (rows outside the sequence are zero)
        -> (hi - lo, F', C)."""
        w, b = self.dw[i - 1]
        y = _depthwise_s2(x, start, lo, hi, w, b)                                # (n, F', C)
        n, F_out = y.shape[:2]
        return self.act(pw(y.reshape(n * F_out, -1))).reshape(n, F_out, -1)

    def __call__(self, x: np.ndarray) -> np.ndarray:   # (T, n_mels) -> (ceil(T / 2^n), H)
        lengths = [x.shape[0]]
        for _ in range(self.n_layers):
            lengths.append((lengths[-1] + 1) // 2)      # Conv(k3, s2, p1): ceil(L / 2)
        T_out = lengths[-1]
        pw = [p.widened() for p in self.pw]             # weights widened once for all chunks
        out_wt = self.out.weight().T                    # (F' * C, H)
        out = np.empty((T_out, out_wt.shape[1]), np.float32)
        for a in range(0, T_out, self.chunk):
            b = min(a + self.chunk, T_out)
            # rows each layer must produce, top-down: outputs [lo, hi) read inputs [2lo-1, 2hi)
            ranges = [(a, b)]
            for l in range(self.n_layers, 0, -1):
                lo, hi = ranges[0]
                ranges.insert(0, (max(2 * lo - 1, 0), min(2 * hi, lengths[l - 1])))
            lo, hi = ranges[1]
            y = self._first(_rows(x[ranges[0][0]:ranges[0][1]], ranges[0][0], 2 * lo - 1, 2 * hi))
            for l in range(2, self.n_layers + 1):
                y = self._later(l - 1, pw[l - 2], y, ranges[l - 1][0], *ranges[l])
            np.matmul(y.reshape(b - a, -1), out_wt, out=out[a:b])
        out += self.out.bias
        return out


def _tap_range(lo: int, hi: int, offset: int, start: int, size: int) -> tuple[int, int, int]:
    """Outputs o in [lo, hi) of a stride-2 tap whose input 2*o + offset lies in [start, start + size):
    (o0, o1, index of o0's input relative to start)."""
    o0 = max(lo, -((start - offset) // -2))             # ceil((start - offset) / 2)
    o1 = min(hi, (start + size - 1 - offset) // 2 + 1)
    return o0, o1, 2 * o0 + offset - start


def _depthwise_s2(x: np.ndarray, start: int, lo: int, hi: int, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Depthwise 3x3 conv, stride 2, zero padding 1, channels-last: output (t, f) reads input rows
    2t-1..2t+1 and frequencies 2f-1..2f+1. `x` (rows, F, C) holds rows [start, start + rows); every
    row outside it is zero. Taps are applied to the output block they reach (no padded copies).
    -> (hi - lo, F', C)."""
    F = x.shape[1]
    F_out = (F - 1) // 2 + 1
    t0, t1, r = _tap_range(lo, hi, 0, start, len(x))    # the centre tap reaches every output
    assert (t0, t1) == (lo, hi)
    out = x[r:r + 2 * (hi - lo) - 1:2, 0:2 * F_out - 1:2] * w[1, 1]
    out += b
    tmp = np.empty_like(out)
    for a in range(3):
        t0, t1, r = _tap_range(lo, hi, a - 1, start, len(x))
        for c in range(3):
            f0, f1, q = _tap_range(0, F_out, c - 1, 0, F)
            if (a, c) == (1, 1) or t1 <= t0 or f1 <= f0:
                continue
            t = tmp[t0 - lo:t1 - lo, f0:f1]
            np.multiply(x[r:r + 2 * (t1 - t0) - 1:2, q:q + 2 * (f1 - f0) - 1:2], w[a, c], out=t)
            out[t0 - lo:t1 - lo, f0:f1] += t
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
        g, K, T = w.get, AudioKey, AudioTensor
        eps = float(g(K.LAYER_NORM_EPS))
        n_head, head_dim = int(g(K.HEAD_COUNT)), int(g(K.HEAD_DIM))
        ffn_act = activation(str(g(K.ACTIVATION_FFN)))
        conv_act, glu_act = activation(str(g(K.ACTIVATION_CONV))), activation(str(g(K.ACTIVATION_GLU)))
        mult = int(g(K.CONV_DEPTHWISE_MULTIPLIER))
        blocks = [
            ConformerBlock(
                ffn_in=FeedForward.load(w, k, "in", eps, ffn_act),
                attn_norm=LayerNorm.load(w, T.BLK_ATTN_NORM.format(bid=k), eps),
                attn=Attention.load(w, k, n_head, head_dim),
                conv=ConvModule.load(w, k, eps, glu_act, conv_act, mult),
                ffn_out=FeedForward.load(w, k, "out", eps, ffn_act),
                norm=LayerNorm.load(w, T.BLK_NORM.format(bid=k), eps),
            )
            for k in range(int(g(K.BLOCK_COUNT)))
        ]
        rel = RelativeBias(w.tensor(T.REL_BIAS + ".weight"), int(g(K.BIAS_MAX_DISTANCE)), bool(g(K.BIAS_SYMMETRIC)))
        return cls(w.tensor(T.CMVN_MEAN), w.tensor(T.CMVN_INVSTD), ConvSubsampling.load(w), rel, blocks,
                   int(g(K.WINDOW_FRAMES)))

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
