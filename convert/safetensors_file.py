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


class SafetensorsError(ValueError):
    """A .safetensors file that is truncated or corrupt; the message names it."""


class SafetensorsFile:
    """One .safetensors file: tensor names, shapes, and float32 loads on demand.

    Opening checks the header and that every tensor lies within the file, so a truncated
    download fails here with a message instead of deep inside a load."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path} is not a safetensors file ({size} bytes); "
                                       f"is the download complete?")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > min(100 * 1024 * 1024, size - 8):
                raise SafetensorsError(f"{self.path} is truncated or not a safetensors file (a header of "
                                       f"{header_len} bytes in a file of {size}); is the download complete?")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SafetensorsError(f"{self.path} is not a safetensors file (its header is not JSON: {e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path} is not a safetensors file (its header is not an object)")
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._entries: dict[str, dict] = header
        end = self._data_start
        for name, entry in header.items():
            try:
                dtype, shape, (begin, stop) = entry["dtype"], entry["shape"], entry["data_offsets"]
                begin, stop = int(begin), int(stop)
                count = int(np.prod(shape, dtype=np.int64))
                itemsize = np.dtype(_DTYPES[dtype]).itemsize if dtype in _DTYPES else None
            except (TypeError, ValueError, KeyError) as e:
                raise SafetensorsError(f"{self.path} is corrupt: tensor {name!r} has no valid dtype, shape "
                                       f"and data_offsets ({type(e).__name__}: {e})") from None
            if not 0 <= begin <= stop or (itemsize is not None and stop - begin != count * itemsize):
                raise SafetensorsError(f"{self.path} is corrupt: tensor {name!r} of shape {shape} {dtype} "
                                       f"has data_offsets [{begin}, {stop}]")
            end = max(end, self._data_start + stop)
        if end > size:
            raise SafetensorsError(f"{self.path} is truncated: its tensors need {end} bytes, the file has "
                                   f"{size}; is the download complete?")
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
            raise SafetensorsError(f"{self.path}: tensor {name} has unsupported dtype {dtype}")
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
