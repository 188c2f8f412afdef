"""Write one GGUF file safely: a temporary name first, renamed only when complete.

Every GGUF this project writes (decoder, LoRA adapters, encoders) goes through
`write_gguf`, so an interrupted conversion never leaves a file that looks done.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import gguf
import numpy as np
from tqdm import tqdm

from model.format import STORAGE_TYPES

_PLAIN = {
    gguf.GGMLQuantizationType.F32: np.dtype(np.float32),
    gguf.GGMLQuantizationType.F16: np.dtype(np.float16),
}


def storage_type(name: str, shape: tuple[int, ...], storage: str) -> gguf.GGMLQuantizationType:
    """f32 for 1-D tensors (norms, biases, small factors); the file's storage type (STORAGE_TYPES) otherwise."""
    if storage == "f32" or len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    if storage == "f16":
        return gguf.GGMLQuantizationType.F16
    if storage == "bf16":
        return gguf.GGMLQuantizationType.BF16
    if storage == "q8_0":
        # q8_0 packs 32 values per block along the row; rows that do not divide stay f16.
        if shape[-1] % 32 == 0:
            return gguf.GGMLQuantizationType.Q8_0
        return gguf.GGMLQuantizationType.F16
    raise ValueError(f"unknown storage type {storage!r}; choose one of {', '.join(STORAGE_TYPES)}")


def encode_tensor(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """numpy array -> the bytes-shaped array GGUFWriter stores for `qtype`."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


@dataclass
class TensorSource:
    """A tensor to write: its name, numpy shape, and a loader called once while writing."""
    name: str
    shape: tuple[int, ...]
    load: Callable[[], np.ndarray]


def write_gguf(
    path: str | os.PathLike,
    arch: str,
    metadata: Callable[[gguf.GGUFWriter], None],
    tensors: Iterable[TensorSource],
    storage: str = "f32",
    progress: bool = True,
) -> Path:
    """Write a GGUF at `path` via `path.tmp`, streaming one tensor at a time.

    `metadata(writer)` adds the key/values; `storage` (one of STORAGE_TYPES) is how the
    matrices are stored. Each tensor is loaded, encoded and written before the next is
    loaded, so a large model is never held in memory whole.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    sources = list(tensors)
    writer = gguf.GGUFWriter(tmp, arch=arch, use_temp_file=False)
    try:
        metadata(writer)
        qtypes = []
        for src in sources:
            qtype = storage_type(src.name, src.shape, storage)
            byte_shape = gguf.quant_shape_to_byte_shape(src.shape, qtype)
            nbytes = int(np.prod(byte_shape))
            dtype = _PLAIN.get(qtype, np.dtype(np.uint8))
            shape = src.shape if qtype in _PLAIN else byte_shape
            writer.add_tensor_info(src.name, shape, dtype, nbytes, raw_dtype=qtype)
            qtypes.append(qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = tqdm(total=len(sources), desc=path.name, unit="tensor", disable=not progress)
        for src, qtype in zip(sources, qtypes):
            data = src.load()
            if tuple(data.shape) != tuple(src.shape):
                raise ValueError(f"tensor {src.name}: expected shape {src.shape}, got {tuple(data.shape)}")
            writer.write_tensor_data(encode_tensor(data, qtype))
            bar.update(1)
        bar.close()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return path


def metadata_writer(values: dict[str, Any]) -> Callable[[gguf.GGUFWriter], None]:
    """A `metadata` callback writing plain Python values with their natural GGUF types."""

    def add(writer: gguf.GGUFWriter) -> None:
        for key, value in values.items():
            if isinstance(value, bool):
                writer.add_bool(key, value)
            elif isinstance(value, int):
                writer.add_int32(key, value)
            elif isinstance(value, float):
                writer.add_float32(key, value)
            elif isinstance(value, str):
                writer.add_string(key, value)
            elif isinstance(value, (list, tuple)):
                writer.add_array(key, list(value))
            else:
                raise TypeError(f"metadata {key}: cannot store {type(value).__name__}")

    return add
