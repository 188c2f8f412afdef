"""Giving freed memory back to the system.

glibc keeps what a process frees in its heaps and per-thread arenas for later use: after the
encoders' weights are loaded (each tensor widened to float32, q, k and v fused) or a request has decoded an image and run the encoders, the freed gigabytes stay in the
resident size although nothing uses them. `malloc_trim(0)` returns them. Dask documents the same
effect and remedy: https://distributed.dask.org/en/stable/worker-memory.html#memory-not-released-back-to-the-os
"""
from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any


def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None where the C library is another (macOS, Windows, musl)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _malloc_trim()


def give_back_free_memory() -> None:
    """Return the C heap's free memory to the system (a few ms); nothing where glibc is not the C library."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)
