"""Dynamic multi-crop ("HD") preprocessing of one image for the Phi-4-multimodal vision encoder.

Reproduces transformers' `Phi4MultimodalImageProcessor` (docs/model.md, "Vision encoder") without torch:

1. RGB conversion as transformers does it (transparency composited on white).
2. Crop grid: ceil(W/448) x ceil(H/448) crops, or, when that exceeds `max_crops`, the grid
   (i, j), i*j <= max_crops, whose aspect ratio i/j is closest to W/H.
3. Resize so the image fills the grid along one side, keeping its aspect ratio, then pad the
   other side with white. The resize is torchvision's uint8 bilinear antialiased resize as
   torch runs it on CPU (PIL-SIMD's fixed-point algorithm, int16 weights) - `resize_bilinear_aa`.
4. Patch mask (1 = image, 0 = padding) at patch resolution, 32 x 32 per crop.
5. Normalise ((x/255 - mean) / std), cut into 448 x 448 crops (row-major), and prepend the
   global view: the whole normalised canvas shrunk to 448 x 448 by PyTorch's bicubic
   interpolation (align_corners=False, A = -0.75, no antialias) - `resize_bicubic`.

The token count is `num_image_tokens(width, height, max_crops)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image

DEFAULT_CROP_SIZE = 448
DEFAULT_PATCH_SIZE = 14
DEFAULT_MAX_CROPS = 36
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


@dataclass
class CropGeometry:
    """Where an image of `width` x `height` lands on its crop canvas."""
    grid: tuple[int, int]          # (crops across, crops down)
    canvas: tuple[int, int]        # (canvas width, canvas height) = crop_size * grid
    resized: tuple[int, int]       # (width, height) of the image after resizing
    padding: tuple[int, int]       # (right, bottom) white padding in pixels
    mask: np.ndarray               # (rows, cols) float32 patch mask of the canvas, 1 = image


@dataclass
class ImageCrops:
    """The encoder's input for one image."""
    pixels: np.ndarray             # (1 + n_crops, 3, S, S) float32; [0] is the global view
    masks: np.ndarray              # (1 + n_crops, S/P, S/P) float32 patch masks; the global one is all ones
    image_size: tuple[int, int]    # (height, width) of the padded canvas, as the reference's `image_sizes`
    num_tokens: int                # embeddings this image produces

    @property
    def grid(self) -> tuple[int, int]:
        """(crops down, crops across)."""
        crop = self.pixels.shape[-1]
        return self.image_size[0] // crop, self.image_size[1] // crop


# -- geometry ---------------------------------------------------------------------------------

def _closest_aspect_ratio(aspect_ratio: float, target_ratios, width: int, height: int, crop_size: int):
    best_diff, best = float("inf"), (1, 1)
    area = width * height
    for ratio in target_ratios:
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff, best = diff, ratio
        elif diff == best_diff and area > 0.5 * crop_size * crop_size * ratio[0] * ratio[1]:
            best = ratio  # on a tie a large image takes the later (larger) grid
    return best


def crop_grid(width: int, height: int, max_crops: int = DEFAULT_MAX_CROPS,
              crop_size: int = DEFAULT_CROP_SIZE) -> tuple[int, int]:
    """(crops across, crops down) for an image of `width` x `height` pixels."""
    if max_crops < 1:
        raise ValueError(f"max_crops must be at least 1, got {max_crops}")
    across, down = math.ceil(width / float(crop_size)), math.ceil(height / float(crop_size))
    if across * down <= max_crops:
        return across, down
    # Built exactly as the reference builds it: ties are broken by this (deterministic) order.
    targets = {(i, j) for n in range(1, max_crops + 1) for i in range(1, n + 1) for j in range(1, n + 1)
               if 1 <= i * j <= max_crops}
    targets = sorted(targets, key=lambda r: r[0] * r[1])
    return _closest_aspect_ratio(width / height, targets, width, height, crop_size)


def crop_geometry(width: int, height: int, max_crops: int = DEFAULT_MAX_CROPS,
                  crop_size: int = DEFAULT_CROP_SIZE, patch_size: int = DEFAULT_PATCH_SIZE) -> CropGeometry:
    """Grid, resized size, padding and patch mask; ValueError where the reference refuses the image."""
    if width < 1 or height < 1:
        raise ValueError(f"empty image ({width}x{height})")
    mask_size = crop_size // patch_size
    across, down = crop_grid(width, height, max_crops, crop_size)
    target_w, target_h = crop_size * across, crop_size * down
    ratio_w, ratio_h = target_w / width, target_h / height
    if ratio_w < ratio_h:
        new_w, new_h = target_w, int(height * ratio_w)
        pad_w, pad_h = 0, target_h - new_h
    else:
        new_w, new_h = int(width * ratio_h), target_h
        pad_w, pad_h = target_w - new_w, 0
    mask = np.ones((mask_size * down, mask_size * across), dtype=np.float32)
    if pad_w >= patch_size:
        mask[:, -math.floor(pad_w / patch_size):] = 0
    if pad_h >= patch_size:
        mask[-math.floor(pad_h / patch_size):, :] = 0
    if min(new_h, target_h) < 10 or min(new_w, target_w) < 10:
        raise ValueError(f"the aspect ratio of a {width}x{height} image is too extreme: it would be resized to "
                         f"{new_w}x{new_h} pixels (at least 10 are needed on each side)")
    return CropGeometry(grid=(across, down), canvas=(target_w, target_h), resized=(new_w, new_h),
                        padding=(pad_w, pad_h), mask=mask)


def _pooled_mask(mask: np.ndarray, mask_size: int) -> np.ndarray:
    """The canvas patch mask as the 2x2-pooled token grid sees it: every other patch row and column,
    taken crop by crop (rows, cols) -> (down * ceil(m/2), across * ceil(m/2))."""
    down, across = mask.shape[0] // mask_size, mask.shape[1] // mask_size
    crops = mask.reshape(down, mask_size, across, mask_size)[:, 0::2, :, 0::2]  # (down, m2, across, m2)
    return crops.reshape(down * crops.shape[1], across * crops.shape[3])


def tokens_for_mask(mask: np.ndarray, mask_size: int) -> int:
    """Embeddings for a canvas with this patch mask: the sub-image rows (each with a separator),
    one global separator, the global view's m2 rows of m2 + 1 (m2 = ceil(mask_size / 2))."""
    pooled = _pooled_mask(mask, mask_size)
    m2 = (mask_size + 1) // 2
    return int(m2 * m2 + 1 + pooled.sum() + pooled[:, 0].sum() + m2)


def num_image_tokens(width: int, height: int, max_crops: int = DEFAULT_MAX_CROPS,
                     crop_size: int = DEFAULT_CROP_SIZE, patch_size: int = DEFAULT_PATCH_SIZE) -> int:
    """How many embeddings (= `<|image|>` placeholder tokens) an image of `width` x `height` becomes."""
    geometry = crop_geometry(width, height, max_crops, crop_size, patch_size)
    return tokens_for_mask(geometry.mask, crop_size // patch_size)


# -- resampling -------------------------------------------------------------------------------

def _aa_bilinear_int16_weights(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """PyTorch's `_compute_indices_int16_weights_aa` for the triangle filter.

    Returns tap indices (out, k) into the input, int weights (out, k) and their precision (bits):
    out[i] = clamp((2^(p-1) + sum_k in[idx[i,k]] * w[i,k]) >> p, 0, 255).
    """
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    taps = int(math.ceil(support)) * 2 + 1
    center = scale * (np.arange(out_size) + 0.5)                                  # (out,)
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)                # int(): toward zero, as C
    xsize = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin
    j = np.arange(taps)[None, :]                                                  # (1, taps)
    inside = j < xsize[:, None]                                                   # (out, taps)
    w = np.maximum(1.0 - np.abs((j + xmin[:, None] - center[:, None] + 0.5) * invscale), 0.0)
    w = np.where(inside, w, 0.0)
    total = np.cumsum(w, axis=1)[:, -1:]                   # summed left to right, as the reference's loop
    weights = np.divide(w, total, out=w.copy(), where=total != 0.0)
    index = np.where(inside, xmin[:, None] + j, 0)
    w_max = weights.max()
    precision = 0
    while precision < 22 and int(0.5 + w_max * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weights * (1 << precision)
    int_weights = np.where(weights < 0, (-0.5 + scaled).astype(np.int64), (0.5 + scaled).astype(np.int64))
    return index, int_weights, precision


def _aa_pass(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One separable pass of the uint8 antialiased bilinear resize along `axis` (0 rows, 1 columns)."""
    index, weights, precision = _aa_bilinear_int16_weights(image.shape[axis], out_size)
    shape = [1, 1, 1]
    shape[axis] = out_size
    # int32 is enough: the weights sum to about 2^precision <= 2^22, times 255
    acc = np.full(image.shape[:axis] + (out_size,) + image.shape[axis + 1:], 1 << (precision - 1), np.int32)
    for k in range(index.shape[1]):
        taps = np.take(image, index[:, k], axis=axis).astype(np.int32)   # (.., out, .., C)
        acc += taps * weights[:, k].astype(np.int32).reshape(shape)
    return np.clip(acc >> precision, 0, 255).astype(np.uint8)


def resize_bilinear_aa(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H, W, C) uint8 -> (height, width, C) uint8, equal to torchvision `resize` of a uint8 tensor
    (bilinear, antialias=True) on CPU: columns first, then rows, rounding to uint8 in between."""
    if image.shape[1] != width:
        image = _aa_pass(image, width, axis=1)
    if image.shape[0] != height:
        image = _aa_pass(image, height, axis=0)
    return image


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """PyTorch's cubic convolution coefficients for taps at -1, 0, 1, 2 given fraction t: (n,) -> (n, 4)."""
    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):   # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _bicubic_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Tap indices (out, 4) and float32 weights (out, 4) of PyTorch's bicubic interpolate along one axis."""
    scale = np.float32(in_size) / np.float32(out_size)               # float32, as the CPU kernel
    dst = np.arange(out_size, dtype=np.float32) + np.float32(0.5)
    # scale * (dst + 0.5) - 0.5 rounded once to float32 (the kernel's fused multiply-add);
    # no clamping at 0 for cubic
    src = (np.float64(scale) * dst.astype(np.float64) - 0.5).astype(np.float32)
    base = np.floor(src)
    weights = _cubic_weights((src - base).astype(np.float64)).astype(np.float32)   # (out, 4)
    taps = base.astype(np.int64)[:, None] + np.arange(-1, 3)[None, :]
    return np.clip(taps, 0, in_size - 1), weights                    # edge pixels repeat


def _cubic_pass(image: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    taps, weights = _bicubic_taps(image.shape[axis], out_size)
    shape = [1] * image.ndim
    shape[axis] = out_size
    out = 0.0
    for k in range(4):
        out = out + np.take(image, taps[:, k], axis=axis) * weights[:, k].reshape(shape)
    return out


def resize_bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """(C, H, W) float32 -> (C, height, width) float32, as PyTorch's bicubic interpolate
    (align_corners=False, A = -0.75, border indices clamped, no antialias): rows, then columns."""
    image = np.asarray(image, dtype=np.float32)
    return _cubic_pass(_cubic_pass(image, height, axis=1), width, axis=2).astype(np.float32)


# -- the transform ------------------------------------------------------------------------------

def to_rgb(image: Image.Image) -> np.ndarray:
    """PIL image -> (H, W, 3) uint8; transparency is composited onto white (as transformers does).

    16-bit greyscale (modes I;16, I;16L, I;16B, I;16N, and I, the mode of 16-bit PNG, TIFF and PGM
    samples in some Pillow versions) keeps its top byte (value >> 8): Pillow's own conversion clips
    at 255, which turns almost every pixel of a 16-bit image white. Mode I is taken as 16-bit
    values; anything outside 0..65535 is clipped. Every other mode converts as transformers
    converts it (CMYK by Pillow's formula, without an ICC profile).
    """
    if image.mode == "I" or image.mode.startswith("I;16"):
        image = _grey16_to_8bit(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _grey16_to_8bit(image: Image.Image) -> Image.Image:
    """A 16-bit greyscale image (I;16*, I) -> L (LA when a grey value is marked transparent)."""
    values = np.asarray(image)  # uint16 in the image's byte order, or int32 for mode I
    grey = (np.clip(values, 0, 65535).astype(np.uint16) >> 8).astype(np.uint8)
    transparency = image.info.get("transparency")
    if isinstance(transparency, int):  # a PNG tRNS grey level, compared at full depth
        alpha = np.where(values == transparency, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey, alpha], axis=-1), "LA")
    return Image.fromarray(grey, "L")


def make_crops(image: Image.Image | np.ndarray, max_crops: int = DEFAULT_MAX_CROPS,
               crop_size: int = DEFAULT_CROP_SIZE, patch_size: int = DEFAULT_PATCH_SIZE,
               mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD) -> ImageCrops:
    """A PIL image (or an (H, W, 3) uint8 array) -> global view + crops, masks, canvas size, token count."""
    rgb = to_rgb(image) if isinstance(image, Image.Image) else np.asarray(image)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {rgb.shape} {rgb.dtype}")
    height, width = rgb.shape[:2]
    geo = crop_geometry(width, height, max_crops, crop_size, patch_size)
    (new_w, new_h), (canvas_w, canvas_h) = geo.resized, geo.canvas
    mask_size = crop_size // patch_size

    resized = resize_bilinear_aa(rgb, new_h, new_w)                   # (new_h, new_w, 3) uint8
    canvas = np.full((canvas_h, canvas_w, 3), 255, dtype=np.uint8)    # white padding right / bottom
    canvas[:new_h, :new_w] = resized

    # (x/255 - mean)/std, computed as the reference's fused float32 (x - 255 mean) / (255 std)
    shift = (np.asarray(mean, dtype=np.float32) * np.float32(255.0)).astype(np.float32)
    scale = (np.asarray(std, dtype=np.float32) * np.float32(255.0)).astype(np.float32)
    hd = (canvas.transpose(2, 0, 1).astype(np.float32) - shift[:, None, None]) / scale[:, None, None]  # (3, Hc, Wc)

    down, across = canvas_h // crop_size, canvas_w // crop_size
    crops = hd.reshape(3, down, crop_size, across, crop_size).transpose(1, 3, 0, 2, 4)
    crops = crops.reshape(down * across, 3, crop_size, crop_size)     # row-major crop order
    global_view = resize_bicubic(hd, crop_size, crop_size)            # (3, S, S)

    crop_masks = geo.mask.reshape(down, mask_size, across, mask_size).transpose(0, 2, 1, 3)
    crop_masks = crop_masks.reshape(down * across, mask_size, mask_size)
    masks = np.concatenate([np.ones((1, mask_size, mask_size), np.float32), crop_masks])
    pixels = np.concatenate([global_view[None], crops]).astype(np.float32)
    return ImageCrops(pixels=np.ascontiguousarray(pixels), masks=masks, image_size=(canvas_h, canvas_w),
                      num_tokens=tokens_for_mask(geo.mask, mask_size))
