"""Write one GGUF file safely: a temporary name first, renamed only when complete.

Every GGUF this project writes (decoder, LoRA adapters, encoders) goes through
`write_gguf`, so an interrupted conversion never leaves a file that looks done.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

import gguf
import numpy as np

# Storage types a user can ask for, and how each float tensor is stored.
OUTTYPES = ("f32", "f16", "q8_0")


def storage_type(name: str, shape: tuple[int, ...], outtype: str) -> gguf.GGMLQuantizationType:
    """f32 for 1-D tensors (norms, biases, small factors); the requested type otherwise."""
    if outtype == "f32" or len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    if outtype == "f16":
        return gguf.GGMLQuantizationType.F16
    if outtype == "q8_0":
        # q8_0 packs 32 values per block along the row; rows that do not divide stay f16.
        if shape[-1] % 32 == 0:
            return gguf.GGMLQuantizationType.Q8_0
        return gguf.GGMLQuantizationType.F16
    raise ValueError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")


def encode_tensor(data: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """numpy array -> the bytes-shaped array GGUFWriter stores for `qtype`."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def write_gguf(
    path: str | os.PathLike,
    arch: str,
    metadata: Callable[[gguf.GGUFWriter], None],
    tensors: Iterable[tuple[str, Callable[[], np.ndarray]]],
    outtype: str = "f32",
    progress: bool = True,
) -> Path:
    """Write a GGUF at `path` via `path.tmp`.

    `metadata(writer)` adds the key/values; `tensors` yields (name, load) pairs whose
    `load()` returns the float array, called once while writing so that a large model
    is never held in memory twice.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, arch=arch, use_temp_file=False)
    try:
        metadata(writer)
        loaders: list[tuple[str, Callable[[], np.ndarray]]] = list(tensors)
        # The header needs each tensor's shape and type up front; GGUFWriter gets them
        # from the arrays, so arrays are loaded here and released after writing.
        for name, load in loaders:
            data = load()
            qtype = storage_type(name, data.shape, outtype)
            writer.add_tensor(name, encode_tensor(data, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
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
