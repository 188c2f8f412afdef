"""One PEFT adapter -> a llama.cpp LoRA GGUF, `general.type = adapter` (docs/model.md, "GGUF files").

Tensors keep PEFT's layout: `<base>.lora_a` is (r, n_in), `<base>.lora_b` is (n_out, r).
The true alpha is stored, so llama.cpp's `scale * alpha / r` at scale 1.0 equals PEFT.
"""
from __future__ import annotations

from pathlib import Path

import gguf

from convert.backbone import LORA_TARGETS, tensor_name
from convert.checkpoint import LM_LORA_TARGET, LoraAdapter
from convert.gguf_out import TensorSource, write_gguf
from model.format import Arch


def gguf_base_name(module: str) -> str:
    """`model.layers.3.self_attn.qkv_proj` -> `blk.3.attn_qkv.weight`, the backbone tensor it adapts."""
    m = LM_LORA_TARGET.match(module)
    return tensor_name(LORA_TARGETS[m.group(2)], int(m.group(1)))


def write_lora(adapter: LoraAdapter, path: Path, outtype: str = "f32", progress: bool = True) -> Path:
    """Write the adapter's GGUF, its matrices stored as `outtype` (one of STORAGE_TYPES)."""
    sources = []
    for module, (load_a, load_b) in adapter.pairs.items():
        base = gguf_base_name(module)
        a_shape, b_shape = adapter.shapes[module]
        sources.append(TensorSource(base + ".lora_a", a_shape, load_a))
        sources.append(TensorSource(base + ".lora_b", b_shape, load_b))

    def metadata(w: gguf.GGUFWriter) -> None:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, adapter.alpha)
        w.add_name(f"Phi 4 Multimodal {adapter.name} LoRA")

    return write_gguf(path, Arch.DECODER, metadata, sources, storage=outtype, progress=progress)
