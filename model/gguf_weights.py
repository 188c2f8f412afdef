"""Read a GGUF written by `convert/` into numpy: metadata, and tensors as the file stores them.

Matrices stay in their file's 16-bit type in memory (the real encoders: 1.6 GiB in bf16 instead of
3.3 GiB in float32) and are widened to float32 one at a time where they are used (`to_float32`).
numpy has no bfloat16: a bf16 tensor is held as its uint16 bit patterns, the top halves of float32s.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from model.format import CONVERT_COMMAND, GGUFFileError, arch_key, read_gguf_header

# GGUF types read as they are (numpy dtype in memory). f16 (encoders converted before they were
# stored in bf16) is widened once read: numpy widens f16 at ~0.3 G values/s, too slow for every use.
# Anything else (q8_0) is dequantized to float32.
_READ = {
    gguf.GGMLQuantizationType.F32: np.dtype(np.float32),
    gguf.GGMLQuantizationType.F16: np.dtype(np.float16),
    gguf.GGMLQuantizationType.BF16: np.dtype(np.uint16),
}


def to_float32(stored: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A stored tensor (float32, or bf16 bits as uint16) as float32; into `out` if given.
    float32 comes back as it is (no copy) when there is no `out`."""
    if out is None:
        if stored.dtype == np.float32:
            return stored
        out = np.empty(stored.shape, np.float32)
    if stored.dtype == np.uint16:   # bf16: shift the bits into the top half (exact, one pass)
        np.left_shift(stored, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(out, stored)
    return out


@dataclass
class GGUFWeights:
    arch: str
    metadata: dict[str, object]   # key -> Python value (str, int, float, bool, list)
    tensors: dict[str, np.ndarray]  # name -> array in numpy (PyTorch) order: float32, or bf16 bits (uint16)

    def get(self, key: str) -> object:
        """Metadata `key` of this file's architecture (a VisionKey / AudioKey); a clear error when the file lacks it."""
        full = arch_key(self.arch, key)
        if full not in self.metadata:
            raise KeyError(f"GGUF is missing metadata {full!r}")
        return self.metadata[full]

    def stored(self, name: str) -> np.ndarray:
        """The tensor as held: float32, or bf16 bits (uint16), as the file stores it."""
        if name not in self.tensors:
            raise KeyError(f"GGUF is missing tensor {name!r}")
        return self.tensors[name]

    def tensor(self, name: str) -> np.ndarray:
        """The tensor as float32 (a widened copy when it is stored in 16 bits)."""
        return to_float32(self.stored(name))


def _field_value(field: gguf.ReaderField) -> object:
    kind = field.types[0]
    if kind == gguf.GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    if kind == gguf.GGUFValueType.ARRAY:
        if field.types[1] == gguf.GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        return [field.parts[i].tolist()[0] for i in field.data]
    value = field.parts[field.data[0]].tolist()[0]
    return bool(value) if kind == gguf.GGUFValueType.BOOL else value


def load_gguf(path: str | os.PathLike) -> GGUFWeights:
    """Metadata and tensors, shaped as numpy/PyTorch arrays: float32 and bf16 tensors as stored,
    the others (f16, q8_0) widened to float32.

    Tensors are read from the file into arrays of their own, one at a time: nothing keeps the file
    mapped, and loading holds no more than the weights (a mapped file's pages count in the resident
    size beside any copy made of them). A truncated or corrupt file raises GGUFFileError naming it
    (the header is checked first: gguf's reader would fail on it with numpy's "cannot reshape array")."""
    path = Path(path)
    fix = f"rerun {CONVERT_COMMAND} {path.parent}"
    try:
        read_gguf_header(path)
        reader = gguf.GGUFReader(path)
        metadata = {name: _field_value(field) for name, field in reader.fields.items()
                    if not name.startswith("GGUF.")}
        tensors = {}
        with open(path, "rb") as f:
            for t in reader.tensors:
                shape = tuple(int(n) for n in reversed(t.shape))  # ggml ne order -> numpy order
                dtype = _READ.get(t.tensor_type)
                if dtype is None:
                    values = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
                    tensors[t.name] = values.reshape(shape)
                    continue
                values = np.empty(shape, dtype)
                f.seek(t.data_offset)
                if f.readinto(memoryview(values).cast("B")) != values.nbytes:
                    raise GGUFFileError(path, f"ends inside tensor {t.name!r}")
                tensors[t.name] = values.astype(np.float32) if dtype == np.float16 else values
        del reader   # unmaps the file
    except GGUFFileError as e:
        raise GGUFFileError(path, e.problem, fix) from None
    except (ValueError, KeyError, IndexError, UnicodeDecodeError) as e:
        raise GGUFFileError(path, f"cannot be read as a GGUF ({type(e).__name__}: {e})", fix) from None
    arch = str(metadata.get("general.architecture", ""))
    return GGUFWeights(arch=arch, metadata=metadata, tensors=tensors)
