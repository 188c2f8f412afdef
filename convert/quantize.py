"""Quantise a GGUF with llama.cpp's own quantiser (through llama-cpp-python)."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

FTYPES = {"q8_0": 7, "q4_k_m": 15}  # LLAMA_FTYPE_MOSTLY_Q8_0, LLAMA_FTYPE_MOSTLY_Q4_K_M


def quantize(src: Path, dst: Path, outtype: str, threads: int | None = None) -> Path:
    """Write `dst` (via `dst.tmp`) as `outtype` from the f16/f32 GGUF `src`."""
    import llama_cpp

    if outtype not in FTYPES:
        raise ValueError(f"llama.cpp quantisation supports {', '.join(FTYPES)}, not {outtype!r}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[outtype]
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
