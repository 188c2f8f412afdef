"""Read a GGUF written by `convert/` into numpy: metadata and float32 tensors."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from model.format import CONVERT_COMMAND, GGUFFileError, arch_key, read_gguf_header


@dataclass
class GGUFWeights:
    arch: str
    metadata: dict[str, object]   # key -> Python value (str, int, float, bool, list)
    tensors: dict[str, np.ndarray]  # name -> float32 array in numpy (PyTorch) order

    def get(self, key: str) -> object:
        """Metadata `key` of this file's architecture (a VisionKey / AudioKey); a clear error when the file lacks it."""
        full = arch_key(self.arch, key)
        if full not in self.metadata:
            raise KeyError(f"GGUF is missing metadata {full!r}")
        return self.metadata[full]

    def tensor(self, name: str) -> np.ndarray:
        if name not in self.tensors:
            raise KeyError(f"GGUF is missing tensor {name!r}")
        return self.tensors[name]


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
    """All tensors dequantized to float32, shaped as numpy/PyTorch arrays.

    A truncated or corrupt file raises GGUFFileError naming it (the header is checked first:
    gguf's reader would fail on it with numpy's "cannot reshape array")."""
    path = Path(path)
    fix = f"rerun {CONVERT_COMMAND} {path.parent}"
    try:
        read_gguf_header(path)
        reader = gguf.GGUFReader(path)
        metadata = {name: _field_value(field) for name, field in reader.fields.items()
                    if not name.startswith("GGUF.")}
        tensors = {}
        for t in reader.tensors:
            shape = tuple(int(n) for n in reversed(t.shape))  # ggml ne order -> numpy order
            values = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            if np.may_share_memory(values, t.data):
                # A float32 tensor is a view of the memory-mapped file: copied, so that nothing keeps
                # the file mapped (its pages would stay in the resident size, beside the copies).
                values = values.copy()
            tensors[t.name] = values.reshape(shape)
    except GGUFFileError as e:
        raise GGUFFileError(path, e.problem, fix) from None
    except (ValueError, KeyError, IndexError, UnicodeDecodeError) as e:
        raise GGUFFileError(path, f"cannot be read as a GGUF ({type(e).__name__}: {e})", fix) from None
    arch = str(metadata.get("general.architecture", ""))
    return GGUFWeights(arch=arch, metadata=metadata, tensors=tensors)
