"""Quantise a GGUF with llama.cpp's own quantiser (through llama-cpp-python)."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

# outtype -> (llama.cpp's file type, the type of the two most sensitive tensors: the output matrix
# and the token embeddings; None: the file type's own choice). q4_0 is what llama.cpp repacks for
# fast AVX2 / NEON matrix products; q4_0_q8 keeps those two tensors at 8 bits.
FTYPES = {"q8_0": (7, None), "q4_k_m": (15, None), "q4_0": (2, None), "q4_0_q8": (2, "q8_0")}
_GGML_TYPES = {"q8_0": 8, "q6_k": 14}  # GGML_TYPE_Q8_0, GGML_TYPE_Q6_K


def quantize(src: Path, dst: Path, outtype: str, threads: int | None = None) -> Path:
    """Write `dst` (via `dst.tmp`) as `outtype` from the f16/f32 GGUF `src`."""
    import llama_cpp

    if outtype not in FTYPES:
        raise ValueError(f"llama.cpp quantisation supports {', '.join(FTYPES)}, not {outtype!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    ftype, sensitive = FTYPES[outtype]
    params.ftype = ftype
    if sensitive is not None:
        params.output_tensor_type = params.token_embedding_type = _GGML_TYPES[sensitive]
    params.nthread = threads or os.cpu_count() or 1
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0:
            raise RuntimeError(f"llama.cpp failed to quantise {src} to {outtype} (code {rc})")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
