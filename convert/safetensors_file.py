"""Read safetensors files with numpy alone (bf16 included), lazily through mmap.

The real checkpoint is bf16, which numpy cannot name; torch is not a runtime
dependency of the converter, so the format (8-byte header length, JSON header,
raw little-endian data) is read here directly.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """One .safetensors file: tensor names, shapes, and float32 loads on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > 100 * 1024 * 1024:
                raise ValueError(f"{self.path}: not a safetensors file (header of {header_len} bytes)")
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._entries: dict[str, dict] = header
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")

    def names(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def load(self, name: str) -> np.ndarray:
        """The tensor as float32 (bf16 widened exactly)."""
        entry = self._entries[name]
        dtype = entry["dtype"]
        if dtype not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {dtype}")
        begin, end = entry["data_offsets"]
        raw = self._mmap[self._data_start + begin:self._data_start + end]
        array = raw.view(_DTYPES[dtype]).reshape(entry["shape"])
        if dtype == "BF16":
            # bf16 is the top half of a float32.
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array.astype(np.float32)


class SafetensorsFolder:
    """Every *.safetensors file directly in a folder, as one name -> tensor mapping."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {self.folder}")
        self._where: dict[str, SafetensorsFile] = {}
        for path in files:
            st = SafetensorsFile(path)
            for name in st.names():
                self._where[name] = st

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def load(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise KeyError(f"tensor {name!r} not found in {self.folder}")
        return self._where[name].load(name)


def save_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], bf16: bool = False) -> None:
    """Write float tensors (optionally as bf16, rounded to nearest even). Used to build test and bench checkpoints."""
    header, chunks, offset = {}, [], 0
    for name, array in tensors.items():
        a = np.ascontiguousarray(array, dtype=np.float32)
        if bf16:
            bits = a.view(np.uint32)
            rounded = bits + 0x7FFF + ((bits >> 16) & 1)
            data, dtype = (rounded >> 16).astype(np.uint16), "BF16"
        else:
            data, dtype = a, "F32"
        blob = data.tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + len(blob)]}
        chunks.append(blob)
        offset += len(blob)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in chunks:
            f.write(blob)
