"""Phi-4-multimodal vision encoder in numpy: image -> embeddings for the `<|image|>` placeholders.

    image --make_crops--> global view + 448px crops (model/image_crops.py)
          --SigLIP tower (NaViT positions, key-padding mask, pre-LN blocks) to the feature layer-->
          --2x2 average pool--> 16x16 tokens per crop
          --HD layout: sub-image rows + sub_sep, glb_sep, global rows + sub_sep-->
          --projector: Linear -> GELU(erf) -> Linear--> (n_tokens, text_hidden)

Weights and every hyperparameter come from the GGUF written by convert/vision_encoder.py
(phi4mm.md §3). Everything is float32; crops go through the tower in batches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from model.gguf_weights import GGUFWeights, load_gguf
from model.image_crops import ImageCrops, make_crops, num_image_tokens

ARCH = "phi4mm-vision"
MASKED = np.finfo(np.float32).min  # additive bias on padded keys, as the reference's eager attention


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
        if w.arch != ARCH:
            raise ValueError(f"not a vision encoder GGUF: architecture is {w.arch!r}, expected {ARCH!r}")
        for key, want in (("token_compression", "avg_pool_2d"), ("hd_transform_order", "sub_glb"),
                          ("projector.hidden_act", "gelu")):
            if w.get(key) != want:
                raise ValueError(f"unsupported {ARCH}.{key} = {w.get(key)!r} (expected {want!r})")
        return cls(
            hidden=int(w.get("embedding_length")), intermediate=int(w.get("feed_forward_length")),
            heads=int(w.get("attention.head_count")), layers=int(w.get("block_count")),
            eps=float(w.get("attention.layer_norm_epsilon")), act=str(w.get("hidden_act")),
            image_size=int(w.get("image_size")), patch_size=int(w.get("patch_size")),
            crop_size=int(w.get("crop_size")), max_crops=int(w.get("dynamic_hd")),
            mean=tuple(float(x) for x in w.get("image_mean")), std=tuple(float(x) for x in w.get("image_std")),
            text_hidden=int(w.get("projector.embedding_length")),
        )


# -- building blocks ------------------------------------------------------------------------------

def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + np.float32(eps)) * weight + bias


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """gelu_pytorch_tanh."""
    c = np.float32(np.sqrt(2.0 / np.pi))
    return np.float32(0.5) * x * (np.float32(1.0) + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))


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


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in place (x is a scratch buffer)."""
    x -= x.max(-1, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(-1, keepdims=True)
    return x


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

class Block:
    """Pre-LN transformer block: x += attn(ln1(x)); x += mlp(ln2(x))."""

    def __init__(self, w: GGUFWeights, i: int, cfg: VisionConfig):
        t = lambda name: w.tensor(f"v.blk.{i}.{name}")
        self.ln1_w, self.ln1_b = t("ln1.weight"), t("ln1.bias")
        self.q_w, self.q_b = t("attn_q.weight"), t("attn_q.bias")   # (C, C), (C,)
        self.k_w, self.k_b = t("attn_k.weight"), t("attn_k.bias")
        self.v_w, self.v_b = t("attn_v.weight"), t("attn_v.bias")
        self.o_w, self.o_b = t("attn_out.weight"), t("attn_out.bias")
        self.ln2_w, self.ln2_b = t("ln2.weight"), t("ln2.bias")
        self.up_w, self.up_b = t("ffn_up.weight"), t("ffn_up.bias")       # (F, C), (F,)
        self.down_w, self.down_b = t("ffn_down.weight"), t("ffn_down.bias")  # (C, F), (C,)
        self.cfg = cfg
        self.act = ACTIVATIONS[cfg.act]

    def attention(self, x: np.ndarray, key_bias: np.ndarray) -> np.ndarray:
        B, T, C = x.shape
        H = self.cfg.heads
        hd = C // H
        q = (x @ self.q_w.T + self.q_b).reshape(B, T, H, hd).transpose(0, 2, 1, 3)  # (B, H, T, hd)
        k = (x @ self.k_w.T + self.k_b).reshape(B, T, H, hd).transpose(0, 2, 1, 3)
        v = (x @ self.v_w.T + self.v_b).reshape(B, T, H, hd).transpose(0, 2, 1, 3)
        att = q @ k.transpose(0, 1, 3, 2)                             # (B, H, T, T)
        att *= np.float32(hd ** -0.5)
        att += key_bias[:, None, None, :]                             # padded keys get ~0 weight
        att = softmax(att)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C)           # (B, T, C)
        return y @ self.o_w.T + self.o_b

    def mlp(self, x: np.ndarray) -> np.ndarray:
        return self.act(x @ self.up_w.T + self.up_b) @ self.down_w.T + self.down_b

    def __call__(self, x: np.ndarray, key_bias: np.ndarray) -> np.ndarray:
        x = x + self.attention(layer_norm(x, self.ln1_w, self.ln1_b, self.cfg.eps), key_bias)
        x = x + self.mlp(layer_norm(x, self.ln2_w, self.ln2_b, self.cfg.eps))
        return x


class VisionEncoder:
    def __init__(self, weights: GGUFWeights, crop_batch: int = 4):
        self.cfg = cfg = VisionConfig.from_gguf(weights)
        if cfg.act not in ACTIVATIONS:
            raise ValueError(f"unsupported vision activation {cfg.act!r}")
        if cfg.hidden % cfg.heads:
            raise ValueError(f"vision width {cfg.hidden} is not divisible by {cfg.heads} heads")
        t = weights.tensor
        self.patch_w = t("v.patch_embd.weight")          # (C, 3, P, P)
        self.patch_b = t("v.patch_embd.bias")            # (C,)
        self.pos_emb = t("v.position_embd.weight")       # (side^2, C)
        self.blocks = [Block(weights, i, cfg) for i in range(cfg.layers)]
        self.sub_sep = t("v.sub_sep")                    # (C,) after every row of tokens
        self.glb_sep = t("v.glb_sep")                    # (C,) between the sub-image and the global view
        self.up_w, self.up_b = t("mm.up.weight"), t("mm.up.bias")          # (D, C), (D,)
        self.down_w, self.down_b = t("mm.down.weight"), t("mm.down.bias")  # (D, D), (D,)
        self.crop_batch = max(1, int(crop_batch))        # crops per tower batch (attention is B*H*T*T)
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

    def patch_embed(self, pixels: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) -> (B, m*m, C): the stride-P PxP convolution as one matmul, patches row-major."""
        B, ch, S, _ = pixels.shape
        P = self.cfg.patch_size
        m = S // P
        patches = pixels[:, :, :m * P, :m * P].reshape(B, ch, m, P, m, P).transpose(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(B, m * m, ch * P * P)                  # (B, m*m, 3*P*P)
        return patches @ self.patch_w.reshape(self.cfg.hidden, -1).T + self.patch_b

    def tower(self, pixels: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """(B, 3, S, S) pixels, (B, m, m) patch masks -> (B, m*m, C) feature-layer states."""
        side = self.cfg.image_size // self.cfg.patch_size
        x = self.patch_embed(pixels)                                     # (B, T, C)
        x = x + self.pos_emb[navit_position_ids(masks, side)]            # (B, T, C)
        valid = masks.reshape(masks.shape[0], -1).astype(bool)           # (B, T)
        key_bias = np.where(valid, np.float32(0.0), MASKED).astype(np.float32)
        for block in self.blocks:
            x = block(x, key_bias)
        return x

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

    def encode_crops(self, pixels: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """All crops of an image, `crop_batch` at a time -> (N, m2, m2, C) pooled features."""
        pixels = np.asarray(pixels, dtype=np.float32)
        out = []
        for start in range(0, pixels.shape[0], self.crop_batch):
            chunk = slice(start, start + self.crop_batch)
            out.append(self.pool(self.tower(pixels[chunk], masks[chunk])))
        return np.concatenate(out)

    # -- HD layout + projector -----------------------------------------------------------------------

    def hd_layout(self, pooled: np.ndarray, masks: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
        """Pooled crops (N, m2, m2, C) -> token sequence (n_tokens, C) in 'sub_glb' order."""
        N, m2, _, C = pooled.shape
        down, across = image_size[0] // self.cfg.crop_size, image_size[1] // self.cfg.crop_size
        # global view: m2 rows of m2 tokens, each row followed by sub_sep
        glb = np.concatenate([pooled[0], np.broadcast_to(self.sub_sep, (m2, 1, C))], axis=1)  # (m2, m2+1, C)
        # sub-image: crops tiled row-major into a (down*m2, across*m2) token grid
        sub = pooled[1:1 + down * across].reshape(down, across, m2, m2, C)
        sub = sub.transpose(0, 2, 1, 3, 4).reshape(down * m2, across * m2, C)
        # the token grid's mask samples every other patch; cut the fully padded rows / columns
        mask2 = masks[1:1 + down * across, 0::2, 0::2].reshape(down, across, m2, m2)
        mask2 = mask2.transpose(0, 2, 1, 3).reshape(down * m2, across * m2)
        useful_h, useful_w = int(mask2[:, 0].sum()), int(mask2[0, :].sum())
        sub = sub[:useful_h, :useful_w]
        sub = np.concatenate([sub, np.broadcast_to(self.sub_sep, (useful_h, 1, C))], axis=1)  # (uh, uw+1, C)
        return np.concatenate([sub.reshape(-1, C), self.glb_sep[None, :], glb.reshape(-1, C)])

    def project(self, tokens: np.ndarray) -> np.ndarray:
        """(n, C) -> (n, D): Linear -> GELU(erf) -> Linear."""
        return gelu_erf(tokens @ self.up_w.T + self.up_b) @ self.down_w.T + self.down_b

    def embed_crops(self, pixels: np.ndarray, masks: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
        """Preprocessed crops ((1+N, 3, S, S), (1+N, m, m), canvas (H, W)) -> (n_tokens, D)."""
        masks = np.asarray(masks, dtype=np.float32)
        pooled = self.encode_crops(pixels, masks)
        return self.project(self.hd_layout(pooled, masks, image_size)).astype(np.float32)

    def embed(self, image: Image.Image, max_crops: int | None = None) -> np.ndarray:
        """A PIL image -> (n_tokens, text_hidden) float32 embeddings, in placeholder order."""
        crops = self.preprocess(image, max_crops)
        out = self.embed_crops(crops.pixels, crops.masks, crops.image_size)
        if out.shape[0] != crops.num_tokens:  # the placeholder count must match exactly
            raise RuntimeError(f"vision encoder produced {out.shape[0]} embeddings, expected {crops.num_tokens}")
        return out
