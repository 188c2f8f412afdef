"""The Phi-4-mini decoder -> `backbone.gguf` (llama.cpp architecture `phi3`).

Mirrors llama.cpp's `Phi3MiniModel` converter (docs/model.md, "GGUF files"): fused qkv and
gate_up tensors are kept fused, rotary is partial, the longrope factors are global tensors,
and tied embeddings are stored once (llama.cpp duplicates `token_embd` as `output`).
Tensor names are llama.cpp's own, from gguf-py's `TENSOR_NAMES`.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import MODEL_TENSOR

from convert.checkpoint import Checkpoint, CheckpointError, TextConfig
from convert.gguf_out import TensorSource, write_gguf
from convert.tokenizer import Vocab, add_vocab
from model.format import Arch

# native name pattern -> llama.cpp tensor; `{i}` is the layer index.
LAYER_TENSORS = {
    "model.layers.{i}.input_layernorm.weight": MODEL_TENSOR.ATTN_NORM,
    "model.layers.{i}.self_attn.qkv_proj.weight": MODEL_TENSOR.ATTN_QKV,
    "model.layers.{i}.self_attn.o_proj.weight": MODEL_TENSOR.ATTN_OUT,
    "model.layers.{i}.post_attention_layernorm.weight": MODEL_TENSOR.FFN_NORM,
    "model.layers.{i}.mlp.gate_up_proj.weight": MODEL_TENSOR.FFN_UP,
    "model.layers.{i}.mlp.down_proj.weight": MODEL_TENSOR.FFN_DOWN,
}

# LoRA target module (native, no `.weight`) -> the llama.cpp tensor it adapts.
LORA_TARGETS = {
    "self_attn.qkv_proj": MODEL_TENSOR.ATTN_QKV,
    "self_attn.o_proj": MODEL_TENSOR.ATTN_OUT,
    "mlp.gate_up_proj": MODEL_TENSOR.FFN_UP,
    "mlp.down_proj": MODEL_TENSOR.FFN_DOWN,
}


def tensor_name(tensor: MODEL_TENSOR, layer: int | None = None) -> str:
    """llama.cpp's name of a decoder weight: (ATTN_QKV, 3) -> `blk.3.attn_qkv.weight`."""
    return gguf.TENSOR_NAMES[tensor].format(bid=layer) + ".weight"


def expected_shapes(t: TextConfig) -> dict[str, tuple[int, ...]]:
    """Native name -> shape the config implies; a mismatch means a broken or foreign checkpoint."""
    qkv = t.num_heads * t.head_dim + 2 * t.num_kv_heads * t.head_dim
    per_layer = {
        "model.layers.{i}.input_layernorm.weight": (t.hidden_size,),
        "model.layers.{i}.self_attn.qkv_proj.weight": (qkv, t.hidden_size),
        "model.layers.{i}.self_attn.o_proj.weight": (t.hidden_size, t.num_heads * t.head_dim),
        "model.layers.{i}.post_attention_layernorm.weight": (t.hidden_size,),
        "model.layers.{i}.mlp.gate_up_proj.weight": (2 * t.intermediate_size, t.hidden_size),
        "model.layers.{i}.mlp.down_proj.weight": (t.hidden_size, t.intermediate_size),
    }
    shapes = {"model.embed_tokens.weight": (t.vocab_size, t.hidden_size), "model.norm.weight": (t.hidden_size,)}
    for i in range(t.num_layers):
        shapes.update({k.format(i=i): v for k, v in per_layer.items()})
    return shapes


def tensor_sources(ckpt: Checkpoint) -> list[TensorSource]:
    t = ckpt.text
    for name, shape in expected_shapes(t).items():
        if not ckpt.has(name):
            raise CheckpointError(f"decoder tensor {name} is missing")
        if ckpt.shape(name) != shape:
            raise CheckpointError(f"decoder tensor {name} has shape {ckpt.shape(name)}, config implies {shape}")

    def from_ckpt(native: str, gguf_name: str) -> TensorSource:
        return TensorSource(gguf_name, ckpt.shape(native), lambda: ckpt.load(native))

    def constant(name: str, values: list[float]) -> TensorSource:
        array = np.asarray(values, dtype=np.float32)
        return TensorSource(name, array.shape, lambda: array)

    sources = [from_ckpt("model.embed_tokens.weight", tensor_name(MODEL_TENSOR.TOKEN_EMBD)),
               from_ckpt("model.norm.weight", tensor_name(MODEL_TENSOR.OUTPUT_NORM))]
    if not t.tie_word_embeddings:
        if not ckpt.has("lm_head.weight"):
            raise CheckpointError("tie_word_embeddings is false but lm_head.weight is missing")
        sources.append(from_ckpt("lm_head.weight", tensor_name(MODEL_TENSOR.OUTPUT)))
    if t.long_factor is not None:
        sources.append(constant(tensor_name(MODEL_TENSOR.ROPE_FACTORS_LONG), t.long_factor))
        sources.append(constant(tensor_name(MODEL_TENSOR.ROPE_FACTORS_SHORT), t.short_factor))
    for i in range(t.num_layers):
        sources += [from_ckpt(native.format(i=i), tensor_name(tensor, i)) for native, tensor in LAYER_TENSORS.items()]
    return sources


def write_backbone(ckpt: Checkpoint, vocab: Vocab, path: Path, outtype: str = "f32", name: str | None = None,
                   progress: bool = True) -> Path:
    """Write the decoder GGUF stored as `outtype` (f32 or f16; quantised types are made from it by llama.cpp)."""
    t = ckpt.text
    sources = tensor_sources(ckpt)

    def metadata(w: gguf.GGUFWriter) -> None:
        w.add_name(name or "Phi 4 Multimodal Instruct")
        w.add_context_length(t.max_position_embeddings)
        w.add_embedding_length(t.hidden_size)
        w.add_feed_forward_length(t.intermediate_size)
        w.add_block_count(t.num_layers)
        w.add_head_count(t.num_heads)
        w.add_head_count_kv(t.num_kv_heads)
        w.add_layer_norm_rms_eps(t.rms_norm_eps)
        w.add_rope_dimension_count(t.rotary_dim)
        w.add_rope_freq_base(t.rope_theta)
        w.add_rope_scaling_orig_ctx_len(t.original_max_position_embeddings)
        w.add_rope_scaling_attn_factors(t.attention_factor)
        w.add_sliding_window(t.sliding_window)
        w.add_file_type(gguf.LlamaFileType.ALL_F32 if outtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        add_vocab(w, vocab, bos=t.bos_token_id, eos=t.eos_token_ids[0], pad=t.pad_token_id)

    return write_gguf(path, Arch.DECODER, metadata, sources, storage=outtype, progress=progress)
