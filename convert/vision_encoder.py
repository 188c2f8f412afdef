"""Write the Phi-4-multimodal vision encoder (SigLIP tower + HD separators + projector) as a GGUF
that `model/vision_encoder.py` runs with numpy (phi4mm.md §3).

Input names are transformers-native, with `model.embed_tokens_extend.image_embed.` stripped.
Only the blocks the feature layer uses are written (`hidden_states[-2]` of a 27-block tower:
blocks 0..25); the last block, `post_layernorm` and the pooling `head` are dropped.

GGUF tensor names (arch `phi4mm-vision`; numpy shapes, C = vision width, D = text width):

    img_processor.embeddings.patch_embedding.weight      -> v.patch_embd.weight      (C, 3, P, P)
    img_processor.embeddings.patch_embedding.bias        -> v.patch_embd.bias        (C,)
    img_processor.embeddings.position_embedding.weight   -> v.position_embd.weight   ((S/P)^2, C)
    img_processor.encoder.layers.{i}.layer_norm1.{w,b}   -> v.blk.{i}.ln1.{weight,bias}
    img_processor.encoder.layers.{i}.self_attn.q_proj.*  -> v.blk.{i}.attn_q.*      (C, C), (C,)
    img_processor.encoder.layers.{i}.self_attn.k_proj.*  -> v.blk.{i}.attn_k.*
    img_processor.encoder.layers.{i}.self_attn.v_proj.*  -> v.blk.{i}.attn_v.*
    img_processor.encoder.layers.{i}.self_attn.out_proj.*-> v.blk.{i}.attn_out.*
    img_processor.encoder.layers.{i}.layer_norm2.{w,b}   -> v.blk.{i}.ln2.{weight,bias}
    img_processor.encoder.layers.{i}.mlp.fc1.*           -> v.blk.{i}.ffn_up.*      (F, C), (F,)
    img_processor.encoder.layers.{i}.mlp.fc2.*           -> v.blk.{i}.ffn_down.*    (C, F), (C,)
    sub_img_feature_extensor      (1, 1, 1, C)           -> v.sub_sep               (C,)  after each row
    global_img_feature_extensor   (1, 1, C)              -> v.glb_sep               (C,)  between sub and global
    img_projection_up.{weight,bias}                      -> mm.up.{weight,bias}     (D, C), (D,)
    img_projection_down.{weight,bias}                    -> mm.down.{weight,bias}   (D, D), (D,)

Metadata (all under `phi4mm-vision.`): see `vision_metadata`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Sequence, Union

import numpy as np

from convert.gguf_out import TensorSource, metadata_writer, write_gguf

ARCH = "phi4mm-vision"

TensorLike = Union[np.ndarray, Callable[[], np.ndarray]]

_BLOCK = {
    "layer_norm1.weight": "ln1.weight", "layer_norm1.bias": "ln1.bias",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.out_proj.weight": "attn_out.weight", "self_attn.out_proj.bias": "attn_out.bias",
    "layer_norm2.weight": "ln2.weight", "layer_norm2.bias": "ln2.bias",
    "mlp.fc1.weight": "ffn_up.weight", "mlp.fc1.bias": "ffn_up.bias",
    "mlp.fc2.weight": "ffn_down.weight", "mlp.fc2.bias": "ffn_down.bias",
}

_GLOBAL = {
    "img_processor.embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "img_processor.embeddings.patch_embedding.bias": "v.patch_embd.bias",
    "img_processor.embeddings.position_embedding.weight": "v.position_embd.weight",
    "sub_img_feature_extensor": "v.sub_sep",
    "global_img_feature_extensor": "v.glb_sep",
    "img_projection_up.weight": "mm.up.weight",
    "img_projection_up.bias": "mm.up.bias",
    "img_projection_down.weight": "mm.down.weight",
    "img_projection_down.bias": "mm.down.bias",
}

_FLATTEN = {"v.sub_sep", "v.glb_sep"}  # stored as (C,)

_SUPPORTED_ACT = ("gelu_pytorch_tanh", "gelu_new", "gelu")

# The reference image processor's defaults (phi4mm.md §3.4).
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
    """Every hyperparameter model/ needs, keyed `phi4mm-vision.<name>`."""
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
    k = f"{ARCH}."
    return {
        k + "embedding_length": hidden,                      # C
        k + "feed_forward_length": int(need("intermediate_size")),
        k + "attention.head_count": heads,
        k + "attention.layer_norm_epsilon": float(vision_config.get("layer_norm_eps", 1e-6)),
        k + "block_count": used_blocks(layers, feature_layer),  # blocks stored = blocks run
        k + "source_block_count": layers,                    # blocks of the original tower
        k + "feature_layer": feature_layer,
        k + "hidden_act": act,
        k + "num_channels": int(vision_config.get("num_channels", 3)),
        k + "image_size": image_size,                        # tower input; positions = (image_size/patch)^2
        k + "patch_size": patch_size,
        k + "crop_size": crop_size,                          # HD crop side in pixels
        k + "dynamic_hd": dynamic_hd,                        # default max crops per image
        k + "image_mean": mean,
        k + "image_std": std,
        k + "token_compression": "avg_pool_2d",              # 2x2 average pool of the patch grid
        k + "hd_transform_order": "sub_glb",                 # sub-image rows, glb_sep, global rows
        k + "projector.embedding_length": int(text_hidden),  # D
        k + "projector.hidden_act": "gelu",                  # exact erf GELU between mm.up and mm.down
    }


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
    outtype: "f32" or "f16" (1-D tensors always stay f32).
    """
    if outtype not in ("f32", "f16"):
        raise ValueError(f"vision encoder outtype must be f32 or f16, got {outtype!r}")
    layers = int(vision_config.get("num_hidden_layers") or 0)
    n_used = used_blocks(layers, int(vision_config.get("feature_layer", -2)))

    wanted = dict(_GLOBAL)
    for i in range(n_used):
        for src, dst in _BLOCK.items():
            wanted[f"img_processor.encoder.layers.{i}.{src}"] = f"v.blk.{i}.{dst}"
    missing = [n for n in wanted if n not in tensors]
    if missing:
        raise ValueError(f"vision encoder tensors missing: {', '.join(missing[:5])}"
                         + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))

    text_hidden = _shape_of("img_projection_up.weight", tensors["img_projection_up.weight"], shapes)[0]
    metadata = vision_metadata(vision_config, text_hidden, processor_config)
    hidden = metadata[f"{ARCH}.embedding_length"]

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
    return write_gguf(path, ARCH, metadata_writer(metadata), sources, outtype=outtype, progress=progress)
