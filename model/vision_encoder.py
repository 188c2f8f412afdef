"""Phi-4-multimodal vision encoder in numpy: image -> embeddings for the `<|image|>` placeholders.

    image --make_crops--> global view + 448px crops (model/image_crops.py)
          --SigLIP tower (NaViT positions, key-padding mask, pre-LN blocks) to the feature layer-->
          --2x2 average pool--> 16x16 tokens per crop
          --HD layout: sub-image rows + sub_sep, glb_sep, global rows + sub_sep-->
          --projector: Linear -> GELU(erf) -> Linear--> (n_tokens, text_hidden)

Weights and every hyperparameter come from the GGUF written by convert/vision_encoder.py, read by
the names of model/format.py (docs/model.md, "Vision encoder"). Everything is computed in float32
(bf16 weights are widened a matrix at a time, model/layers.py); crops go through the tower in batches.

Speed (bench/encoders.py): q/k/v are one Linear (the 1/sqrt(d) score scale folded into q), so
every projection is one plain GEMM over the packed tokens of all crops
of a batch; attention runs per crop and head on contiguous (tokens, d) blocks with the softmax
normalised after the product with v. Padded patches are masked as keys, so they are dropped as
keys, and when embedding an image (`embed_crops`) the padded patches whose pools the HD layout cuts
are not computed at all.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from model.format import VISION_LAYOUT, Arch, VisionKey, VisionTensor, arch_key
from model.gguf_weights import GGUFWeights, load_gguf
from model.image_crops import ImageCrops, make_crops, num_image_tokens
from model.layers import LayerNorm, Linear


@dataclass
class VisionConfig:
    hidden: int                   # C, tower width
    intermediate: int             # F, tower MLP width
    heads: int
    layers: int                   # blocks run (= stored); their output is the feature layer
    eps: float                    # LayerNorm epsilon
    act: str                      # tower MLP activation
    image_size: int               # tower's native input side; positions = (image_size/patch)^2
    patch_size: int
    crop_size: int
    max_crops: int                # default dynamic_hd
    mean: tuple[float, ...]
    std: tuple[float, ...]
    text_hidden: int              # D, projector output

    @classmethod
    def from_gguf(cls, w: GGUFWeights) -> "VisionConfig":
        if w.arch != Arch.VISION:
            raise ValueError(f"not a vision encoder GGUF: architecture is {w.arch!r}, expected {Arch.VISION!r}")
        for key, want in VISION_LAYOUT.items():
            if w.get(key) != want:
                raise ValueError(f"unsupported {arch_key(w.arch, key)} = {w.get(key)!r} (expected {want!r})")
        K = VisionKey
        return cls(
            hidden=int(w.get(K.EMBEDDING_LENGTH)), intermediate=int(w.get(K.FEED_FORWARD_LENGTH)),
            heads=int(w.get(K.HEAD_COUNT)), layers=int(w.get(K.BLOCK_COUNT)),
            eps=float(w.get(K.LAYER_NORM_EPS)), act=str(w.get(K.HIDDEN_ACT)),
            image_size=int(w.get(K.IMAGE_SIZE)), patch_size=int(w.get(K.PATCH_SIZE)),
            crop_size=int(w.get(K.CROP_SIZE)), max_crops=int(w.get(K.DYNAMIC_HD)),
            mean=tuple(float(x) for x in w.get(K.IMAGE_MEAN)), std=tuple(float(x) for x in w.get(K.IMAGE_STD)),
            text_hidden=int(w.get(K.PROJECTOR_EMBEDDING_LENGTH)),
        )


# -- building blocks ------------------------------------------------------------------------------

def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """gelu_pytorch_tanh, in place (x is a scratch buffer): 0.5 x (1 + tanh(c (x + 0.044715 x^3)))."""
    c = np.float32(np.sqrt(2.0 / np.pi))
    t = x * x
    t *= np.float32(0.044715) * c
    t += c
    t *= x                       # c (x + 0.044715 x^3)
    np.tanh(t, out=t)
    t += np.float32(1.0)
    x *= np.float32(0.5)
    x *= t
    return x


def _erfc(z: np.ndarray) -> np.ndarray:
    """erfc for z >= 0 in float64, ~1.2e-7 relative (Numerical Recipes' Chebyshev fit); numpy has none."""
    t = 1.0 / (1.0 + 0.5 * z)
    poly = -z * z - 1.26551223 + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (
        -0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (
            -0.82215223 + t * 0.17087277))))))))
    return t * np.exp(poly)


def gelu_erf(x: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, torch.nn.functional.gelu's default: x * Phi(x)."""
    x64 = x.astype(np.float64)
    tail = 0.5 * _erfc(np.abs(x64) / np.sqrt(2.0))                  # Phi(-|x|), no cancellation
    return (x64 * np.where(x64 >= 0, 1.0 - tail, tail)).astype(np.float32)


ACTIVATIONS = {"gelu_pytorch_tanh": gelu_tanh, "gelu_new": gelu_tanh, "gelu": gelu_erf}


def attend(q: np.ndarray, k_t: np.ndarray, v: np.ndarray) -> np.ndarray:
    """One head: softmax(q k^T) v for q (n, d) (already scaled), k_t (d, m), v (m, d) -> (n, d).
    The softmax is normalised after the product with v (n*d divisions instead of n*m)."""
    s = q @ k_t                               # (n, m)
    s -= s.max(-1, keepdims=True)
    np.exp(s, out=s)
    out = s @ v
    out /= s.sum(-1, keepdims=True)
    return out


def navit_position_ids(masks: np.ndarray, positions_per_side: int) -> np.ndarray:
    """NaViT position ids (N, m*m) for patch masks (N, m, m): the valid nh x nw patches of a crop
    are spread over the full positions_per_side^2 grid by bucketing their fractional coordinates
    (float32, as the reference); padded patches get id 0."""
    n, rows, cols = masks.shape
    valid = masks.astype(bool)
    nb_h = valid[:, :, 0].sum(1).astype(np.float32)                 # (N,) valid patch rows
    nb_w = valid[:, 0, :].sum(1).astype(np.float32)                 # (N,) valid patch columns
    side = positions_per_side
    boundaries = (np.arange(1, side, dtype=np.float64) / side).astype(np.float32)  # (side-1,)
    top = np.float32(1.0 - 1e-6)
    with np.errstate(divide="ignore", invalid="ignore"):            # an all-padded crop: ids unused
        frac_h = np.arange(rows, dtype=np.float32)[None, :] * (np.float32(1.0) / nb_h)[:, None]  # (N, m)
        frac_w = np.arange(cols, dtype=np.float32)[None, :] * (np.float32(1.0) / nb_w)[:, None]
    bucket_h = np.searchsorted(boundaries, np.minimum(frac_h, top), side="right")  # (N, m)
    bucket_w = np.searchsorted(boundaries, np.minimum(frac_w, top), side="right")
    pos = bucket_h[:, :, None] * side + bucket_w[:, None, :]         # (N, m, m)
    return np.where(valid, pos, 0).reshape(n, rows * cols)


# -- the model --------------------------------------------------------------------------------------

@dataclass
class Segment:
    """One crop's tokens inside the packed (tokens, C) activations of a tower batch."""
    start: int
    end: int
    keys: np.ndarray | None   # positions (within the segment) of the unpadded patches; None = all


class Block:
    """Pre-LN transformer block: x += attn(ln1(x)); x += mlp(ln2(x)).

    Works on packed tokens (N, C): the crops of a batch one after the other (each possibly
    without the padded patches nobody needs), attention within each crop (`Segment`)."""

    def __init__(self, w: GGUFWeights, i: int, cfg: VisionConfig):
        T = VisionTensor
        name = lambda module: module.format(bid=i)
        t = lambda module, part: w.tensor(f"{name(module)}.{part}")
        self.heads, self.head_dim = cfg.heads, cfg.hidden // cfg.heads
        scale = np.float32(self.head_dim ** -0.5)               # folded into q
        self.ln1 = LayerNorm.load(w, name(T.BLK_LN1), cfg.eps)
        self.qkv = Linear.stack([(w.stored(f"{name(m)}.weight"), t(m, "bias"), f)     # C -> 3C
                                 for m, f in ((T.BLK_ATTN_Q, scale), (T.BLK_ATTN_K, 1.0), (T.BLK_ATTN_V, 1.0))])
        self.o = Linear.load(w, name(T.BLK_ATTN_OUT))                      # C -> C
        self.ln2 = LayerNorm.load(w, name(T.BLK_LN2), cfg.eps)
        self.up = Linear.load(w, name(T.BLK_FFN_UP))                       # C -> F
        self.down = Linear.load(w, name(T.BLK_FFN_DOWN))                   # F -> C
        self.act = ACTIVATIONS[cfg.act]

    def attention(self, x: np.ndarray, segments: list[Segment]) -> np.ndarray:
        N, C = x.shape
        H, hd = self.heads, self.head_dim
        qkv = self.qkv(x)                                             # (N, 3C) = [q*scale | k | v]
        y = np.empty((N, C), np.float32)
        for seg in segments:
            n = seg.end - seg.start
            t = qkv[seg.start:seg.end].reshape(n, 3, H, hd)
            kv = t[:, 1:] if seg.keys is None else t[seg.keys, 1:]     # (m, 2, H, hd), padded keys dropped
            q = np.ascontiguousarray(t[:, 0].transpose(1, 0, 2))      # (H, n, hd)
            k_t = np.ascontiguousarray(kv[:, 0].transpose(1, 2, 0))   # (H, hd, m)
            v = np.ascontiguousarray(kv[:, 1].transpose(1, 0, 2))     # (H, m, hd)
            out = y[seg.start:seg.end].reshape(n, H, hd)
            if k_t.shape[-1] == 0:     # every patch padded: the reference's mask makes the weights uniform
                out[:] = t[:, 2].mean(0)
                continue
            for h in range(H):
                out[:, h] = attend(q[h], k_t[h], v[h])
        return self.o(y)

    def mlp(self, x: np.ndarray) -> np.ndarray:
        return self.down(self.act(self.up(x)))

    def __call__(self, x: np.ndarray, segments: list[Segment]) -> np.ndarray:
        """x (N, C) is updated in place and returned."""
        x += self.attention(self.ln1(x), segments)
        x += self.mlp(self.ln2(x))
        return x


class VisionEncoder:
    def __init__(self, weights: GGUFWeights, crop_batch: int = 4):
        self.cfg = cfg = VisionConfig.from_gguf(weights)
        if cfg.act not in ACTIVATIONS:
            raise ValueError(f"unsupported vision activation {cfg.act!r}")
        if cfg.hidden % cfg.heads:
            raise ValueError(f"vision width {cfg.hidden} is not divisible by {cfg.heads} heads")
        t, T = weights.tensor, VisionTensor
        # the stride-P PxP patch convolution as one Linear over flattened patches: 3*P*P -> C
        self.patch_embd = Linear.of(weights.stored(T.PATCH_EMBD + ".weight").reshape(cfg.hidden, -1),
                                    t(T.PATCH_EMBD + ".bias"))
        self.pos_emb = t(T.POSITION_EMBD + ".weight")    # (side^2, C)
        self.blocks = [Block(weights, i, cfg) for i in range(cfg.layers)]
        self.sub_sep = t(T.SUB_SEP)                      # (C,) after every row of tokens
        self.glb_sep = t(T.GLB_SEP)                      # (C,) between the sub-image and the global view
        self.mm_up = Linear.load(weights, T.MM_UP)       # C -> D
        self.mm_down = Linear.load(weights, T.MM_DOWN)   # D -> D
        self.crop_batch = max(1, int(crop_batch))        # crops per tower batch (bounds the activations)
        side = cfg.image_size // cfg.patch_size
        if self.pos_emb.shape != (side * side, cfg.hidden):
            raise ValueError(f"position embedding {self.pos_emb.shape} does not fit a {side}x{side} patch grid")

    @classmethod
    def load(cls, path: str | os.PathLike, crop_batch: int = 4) -> "VisionEncoder":
        return cls(load_gguf(path), crop_batch=crop_batch)

    # -- preprocessing --------------------------------------------------------------------------

    def preprocess(self, image: Image.Image, max_crops: int | None = None) -> ImageCrops:
        cfg = self.cfg
        return make_crops(image, max_crops=cfg.max_crops if max_crops is None else max_crops,
                          crop_size=cfg.crop_size, patch_size=cfg.patch_size, mean=cfg.mean, std=cfg.std)

    def num_tokens(self, width: int, height: int, max_crops: int | None = None) -> int:
        cfg = self.cfg
        return num_image_tokens(width, height, cfg.max_crops if max_crops is None else max_crops,
                                cfg.crop_size, cfg.patch_size)

    # -- tower ------------------------------------------------------------------------------------

    def patches(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) -> (B, m*m, 3*P*P) flattened PxP patches, row-major."""
        B, ch, S, _ = pixels.shape
        P = self.cfg.patch_size
        m = S // P
        patches = pixels[:, :, :m * P, :m * P].reshape(B, ch, m, P, m, P).transpose(0, 2, 4, 1, 3, 5)
        return patches.reshape(B, m * m, ch * P * P)

    def tower(self, pixels: np.ndarray, masks: np.ndarray, needed: np.ndarray | None = None) -> np.ndarray:
        """(B, 3, S, S) pixels, (B, m, m) patch masks -> (B, m*m, C) feature-layer states.

        needed: optional (B, m*m) bool, the patches whose states are wanted. Padded patches are
        masked as keys, so no other state depends on them: the padded patches not needed, and
        crops with nothing needed, are not computed (their rows come back zero). Every unpadded
        patch of a crop in use is computed (it is a key). The tokens of all crops are packed into
        one (tokens, C) matrix."""
        B = pixels.shape[0]
        side = self.cfg.image_size // self.cfg.patch_size
        valid = masks.reshape(B, -1) > 0                                 # (B, T): the keys
        if needed is None:
            keep = np.ones_like(valid)
        else:
            keep = (needed | valid) & needed.any(1, keepdims=True)
        T = valid.shape[1]
        rows = np.flatnonzero(keep)                                      # kept tokens in (B*T) order
        x = self.patch_embd(self.patches(pixels).reshape(B * T, -1)[rows])  # (N, C)
        x += self.pos_emb[navit_position_ids(masks, side).reshape(-1)[rows]]
        segments, start = [], 0
        for b in range(B):
            is_key = valid[b, keep[b]]                                   # per kept token of crop b
            if is_key.size:
                keys = None if is_key.all() else np.flatnonzero(is_key)
                segments.append(Segment(start, start + is_key.size, keys))
                start += is_key.size
        for block in self.blocks:
            x = block(x, segments)
        out = np.zeros((B * T, x.shape[1]), np.float32)
        out[rows] = x
        return out.reshape(B, T, -1)

    def needed_patches(self, masks: np.ndarray, image_size: tuple[int, int]) -> np.ndarray | None:
        """(N, m*m) bool: the patches of each crop that end up in the HD layout's tokens (the 2x2
        pools that `hd_layout` keeps); None when the patch grid is odd (reflection padding)."""
        N, m, _ = masks.shape
        if m % 2:
            return None
        m2 = m // 2
        down, across, useful_h, useful_w = self.sub_image_grid(masks, image_size)
        grid = np.zeros((down * m2, across * m2), bool)
        grid[:useful_h, :useful_w] = True
        cells = np.zeros((N, m2, m2), bool)
        cells[0] = True                                                  # the global view
        cells[1:1 + down * across] = grid.reshape(down, m2, across, m2).transpose(0, 2, 1, 3).reshape(-1, m2, m2)
        return cells.repeat(2, axis=1).repeat(2, axis=2).reshape(N, m * m)

    def pool(self, features: np.ndarray) -> np.ndarray:
        """(B, m*m, C) -> (B, m2, m2, C): 2x2 average pool (reflection-padded when m is odd)."""
        B, T, C = features.shape
        m = int(round(T ** 0.5))
        grid = features.reshape(B, m, m, C)
        if m % 2:
            grid = np.concatenate([grid, grid[:, m - 2:m - 1]], axis=1)
            grid = np.concatenate([grid, grid[:, :, m - 2:m - 1]], axis=2)
            m += 1
        return grid.reshape(B, m // 2, 2, m // 2, 2, C).mean(axis=(2, 4))

    def encode_crops(self, pixels: np.ndarray, masks: np.ndarray,
                     image_size: tuple[int, int] | None = None) -> np.ndarray:
        """All crops of an image, `crop_batch` at a time -> (N, m2, m2, C) pooled features.
        With the canvas `image_size`, only what the HD layout keeps is computed (the pools it
        drops, all padding, are left zero)."""
        pixels = np.asarray(pixels, dtype=np.float32)
        masks = np.asarray(masks, dtype=np.float32)
        needed = None if image_size is None else self.needed_patches(masks, image_size)
        out = []
        for start in range(0, pixels.shape[0], self.crop_batch):
            chunk = slice(start, start + self.crop_batch)
            out.append(self.pool(self.tower(pixels[chunk], masks[chunk], None if needed is None else needed[chunk])))
        return np.concatenate(out)

    # -- HD layout + projector -----------------------------------------------------------------------

    def sub_image_grid(self, masks: np.ndarray, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
        """(down, across, useful_h, useful_w): the canvas's crop grid, and how many rows and columns
        of its pooled token grid hold image (the rest is padding that the layout cuts). The token
        grid's mask samples every other patch."""
        down, across = image_size[0] // self.cfg.crop_size, image_size[1] // self.cfg.crop_size
        mask2 = masks[1:1 + down * across, 0::2, 0::2]
        m2 = mask2.shape[1]
        mask2 = mask2.reshape(down, across, m2, m2).transpose(0, 2, 1, 3).reshape(down * m2, across * m2)
        return down, across, int(mask2[:, 0].sum()), int(mask2[0, :].sum())

    def hd_layout(self, pooled: np.ndarray, masks: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
        """Pooled crops (N, m2, m2, C) -> token sequence (n_tokens, C) in 'sub_glb' order."""
        N, m2, _, C = pooled.shape
        down, across, useful_h, useful_w = self.sub_image_grid(masks, image_size)
        # global view: m2 rows of m2 tokens, each row followed by sub_sep
        glb = np.concatenate([pooled[0], np.broadcast_to(self.sub_sep, (m2, 1, C))], axis=1)  # (m2, m2+1, C)
        # sub-image: crops tiled row-major into a (down*m2, across*m2) token grid
        sub = pooled[1:1 + down * across].reshape(down, across, m2, m2, C)
        sub = sub.transpose(0, 2, 1, 3, 4).reshape(down * m2, across * m2, C)
        sub = sub[:useful_h, :useful_w]                                  # the fully padded rows / columns cut
        sub = np.concatenate([sub, np.broadcast_to(self.sub_sep, (useful_h, 1, C))], axis=1)  # (uh, uw+1, C)
        return np.concatenate([sub.reshape(-1, C), self.glb_sep[None, :], glb.reshape(-1, C)])

    def project(self, tokens: np.ndarray) -> np.ndarray:
        """(n, C) -> (n, D): Linear -> GELU(erf) -> Linear."""
        return self.mm_down(gelu_erf(self.mm_up(tokens)))

    def embed_crops(self, pixels: np.ndarray, masks: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
        """Preprocessed crops ((1+N, 3, S, S), (1+N, m, m), canvas (H, W)) -> (n_tokens, D)."""
        masks = np.asarray(masks, dtype=np.float32)
        pooled = self.encode_crops(pixels, masks, image_size)
        return self.project(self.hd_layout(pooled, masks, image_size)).astype(np.float32)

    def embed(self, image: Image.Image, max_crops: int | None = None) -> np.ndarray:
        """A PIL image -> (n_tokens, text_hidden) float32 embeddings, in placeholder order."""
        crops = self.preprocess(image, max_crops)
        out = self.embed_crops(crops.pixels, crops.masks, crops.image_size)
        if out.shape[0] != crops.num_tokens:  # the placeholder count must match exactly
            raise RuntimeError(f"vision encoder produced {out.shape[0]} embeddings, expected {crops.num_tokens}")
        return out
