"""Write the Phi-4-multimodal vision encoder (SigLIP tower + HD separators + projector) as a GGUF
that `model/vision_encoder.py` runs with numpy (docs/model.md, "Vision encoder").

Input names are transformers-native, with `model.embed_tokens_extend.image_embed.` stripped.
Only the blocks the feature layer uses are written (`hidden_states[-2]` of a 27-block tower:
blocks 0..25); the last block, `post_layernorm` and the pooling `head` are dropped.

The file's names, shapes and metadata keys are those of model/format.py (`Arch.VISION`,
`VisionTensor`, `VisionKey`); `_GLOBAL` and `_BLOCK` below map the native names onto them.
The two HD separators are stored flat, (1, 1, 1, C) and (1, 1, C) -> (C,).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

import numpy as np

from convert.gguf_out import TensorSource, metadata_writer, write_gguf
from model.format import ENCODER_STORAGE_TYPES, VISION_LAYOUT, Arch, VisionKey, VisionTensor, arch_key

ARCH = Arch.VISION

TensorLike = Union[np.ndarray, Callable[[], np.ndarray]]

# native module of `img_processor.encoder.layers.{bid}` -> GGUF module; both have .weight and .bias.
_BLOCK = {
    "layer_norm1": VisionTensor.BLK_LN1,
    "self_attn.q_proj": VisionTensor.BLK_ATTN_Q,
    "self_attn.k_proj": VisionTensor.BLK_ATTN_K,
    "self_attn.v_proj": VisionTensor.BLK_ATTN_V,
    "self_attn.out_proj": VisionTensor.BLK_ATTN_OUT,
    "layer_norm2": VisionTensor.BLK_LN2,
    "mlp.fc1": VisionTensor.BLK_FFN_UP,
    "mlp.fc2": VisionTensor.BLK_FFN_DOWN,
}

# native tensor -> GGUF tensor, outside the blocks.
_GLOBAL = {
    "img_processor.embeddings.patch_embedding.weight": VisionTensor.PATCH_EMBD + ".weight",
    "img_processor.embeddings.patch_embedding.bias": VisionTensor.PATCH_EMBD + ".bias",
    "img_processor.embeddings.position_embedding.weight": VisionTensor.POSITION_EMBD + ".weight",
    "sub_img_feature_extensor": VisionTensor.SUB_SEP,
    "global_img_feature_extensor": VisionTensor.GLB_SEP,
    "img_projection_up.weight": VisionTensor.MM_UP + ".weight",
    "img_projection_up.bias": VisionTensor.MM_UP + ".bias",
    "img_projection_down.weight": VisionTensor.MM_DOWN + ".weight",
    "img_projection_down.bias": VisionTensor.MM_DOWN + ".bias",
}

_FLATTEN = {VisionTensor.SUB_SEP, VisionTensor.GLB_SEP}  # stored as (C,)

_SUPPORTED_ACT = ("gelu_pytorch_tanh", "gelu_new", "gelu")

# The reference image processor's defaults (docs/model.md, "Vision encoder").
DEFAULT_DYNAMIC_HD = 36
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


def used_blocks(num_hidden_layers: int, feature_layer: int) -> int:
    """Blocks run to reach `hidden_states[feature_layer]` (index 0 = the embeddings)."""
    n = feature_layer if feature_layer >= 0 else num_hidden_layers + 1 + feature_layer
    if not 1 <= n <= num_hidden_layers:
        raise ValueError(f"feature_layer {feature_layer} does not select a block output of a "
                         f"{num_hidden_layers}-block tower")
    return n


def _processor_value(processor_config: Mapping | None, key: str, default):
    if not processor_config:
        return default
    nested = processor_config.get("image_processor")  # transformers 5 processor_config.json
    if isinstance(nested, Mapping) and key in nested:
        return nested[key]
    return processor_config.get(key, default)


def vision_metadata(vision_config: Mapping, text_hidden: int, processor_config: Mapping | None = None) -> dict:
    """Every hyperparameter model/ needs, keyed `phi4mm-vision.<VisionKey>`."""
    def need(key):
        if key not in vision_config or vision_config[key] is None:
            raise ValueError(f"vision_config lacks {key!r}")
        return vision_config[key]

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    if hidden % heads:
        raise ValueError(f"vision hidden_size {hidden} is not divisible by {heads} heads")
    image_size, patch_size = int(need("image_size")), int(need("patch_size"))
    crop_size = int(vision_config.get("crop_size") or image_size)
    act = str(vision_config.get("hidden_act", "gelu_pytorch_tanh"))
    if act not in _SUPPORTED_ACT:
        raise ValueError(f"vision hidden_act {act!r} is not supported (expected one of {_SUPPORTED_ACT})")
    layers = int(need("num_hidden_layers"))
    feature_layer = int(vision_config.get("feature_layer", -2))
    mean = [float(x) for x in _processor_value(processor_config, "image_mean", DEFAULT_MEAN)]
    std = [float(x) for x in _processor_value(processor_config, "image_std", DEFAULT_STD)]
    dynamic_hd = int(_processor_value(processor_config, "dynamic_hd", DEFAULT_DYNAMIC_HD))
    values = {
        VisionKey.EMBEDDING_LENGTH: hidden,
        VisionKey.FEED_FORWARD_LENGTH: int(need("intermediate_size")),
        VisionKey.HEAD_COUNT: heads,
        VisionKey.LAYER_NORM_EPS: float(vision_config.get("layer_norm_eps", 1e-6)),
        VisionKey.BLOCK_COUNT: used_blocks(layers, feature_layer),
        VisionKey.SOURCE_BLOCK_COUNT: layers,
        VisionKey.FEATURE_LAYER: feature_layer,
        VisionKey.HIDDEN_ACT: act,
        VisionKey.NUM_CHANNELS: int(vision_config.get("num_channels", 3)),
        VisionKey.IMAGE_SIZE: image_size,
        VisionKey.PATCH_SIZE: patch_size,
        VisionKey.CROP_SIZE: crop_size,
        VisionKey.DYNAMIC_HD: dynamic_hd,
        VisionKey.IMAGE_MEAN: mean,
        VisionKey.IMAGE_STD: std,
        VisionKey.PROJECTOR_EMBEDDING_LENGTH: int(text_hidden),
        **VISION_LAYOUT,
    }
    return {arch_key(ARCH, key): value for key, value in values.items()}


def _shape_of(name: str, value: TensorLike, shapes: Mapping[str, Sequence[int]] | None) -> tuple[int, ...]:
    if isinstance(value, np.ndarray):
        return tuple(value.shape)
    if shapes is not None and name in shapes:
        return tuple(int(n) for n in shapes[name])
    if hasattr(value, "shape"):
        return tuple(int(n) for n in value.shape)
    raise ValueError(f"tensor {name!r} is given as a loader; pass its shape in `shapes`")


def write_vision_encoder(
    tensors: Mapping[str, TensorLike],
    vision_config: Mapping,
    path: str | os.PathLike,
    outtype: str = "f32",
    shapes: Mapping[str, Sequence[int]] | None = None,
    processor_config: Mapping | None = None,
    progress: bool = True,
) -> Path:
    """Write `vision-encoder.gguf`.

    tensors: native name (prefix `model.embed_tokens_extend.image_embed.` stripped) -> either a
        numpy array or a zero-argument loader returning one (then `shapes[name]` gives its shape,
        so nothing is loaded before it is written). Names that are not needed (unused blocks,
        post_layernorm, head) are ignored.
    vision_config: the native `vision_config` dict of config.json.
    processor_config: optional image-processor settings (`dynamic_hd`, `image_mean`, `image_std`;
        either flat or under `image_processor`); the reference defaults otherwise.
    outtype: one of ENCODER_STORAGE_TYPES (1-D tensors always stay f32).
    """
    if outtype not in ENCODER_STORAGE_TYPES:
        raise ValueError(f"vision encoder outtype must be one of {', '.join(ENCODER_STORAGE_TYPES)}, got {outtype!r}")
    layers = int(vision_config.get("num_hidden_layers") or 0)
    n_used = used_blocks(layers, int(vision_config.get("feature_layer", -2)))

    wanted = dict(_GLOBAL)
    for bid in range(n_used):
        for native, module in _BLOCK.items():
            for part in ("weight", "bias"):
                wanted[f"img_processor.encoder.layers.{bid}.{native}.{part}"] = f"{module.format(bid=bid)}.{part}"
    missing = [n for n in wanted if n not in tensors]
    if missing:
        raise ValueError(f"vision encoder tensors missing: {', '.join(missing[:5])}"
                         + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))

    text_hidden = _shape_of("img_projection_up.weight", tensors["img_projection_up.weight"], shapes)[0]
    metadata = vision_metadata(vision_config, text_hidden, processor_config)
    hidden = metadata[arch_key(ARCH, VisionKey.EMBEDDING_LENGTH)]

    sources = []
    for src, dst in wanted.items():
        value = tensors[src]
        shape = _shape_of(src, value, shapes)
        if dst in _FLATTEN:
            if int(np.prod(shape)) != hidden:
                raise ValueError(f"{src} has shape {shape}; expected {hidden} values")
            shape = (hidden,)

        def load(value=value, flatten=dst in _FLATTEN) -> np.ndarray:
            array = np.asarray(value if isinstance(value, np.ndarray) else value(), dtype=np.float32)
            return array.reshape(-1) if flatten else array
        sources.append(TensorSource(dst, shape, load))

    metadata["general.name"] = "Phi-4-multimodal vision encoder"
    return write_gguf(path, ARCH, metadata_writer(metadata), sources, storage=outtype, progress=progress)
