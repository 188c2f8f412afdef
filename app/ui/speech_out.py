"""Spoken replies through espeak-ng, when it is installed (it is optional: the app never needs it)."""
from __future__ import annotations

import subprocess
from pathlib import Path

from app.voice.speaker import ESPEAK, available, speakable

MAX_CHARS = 3000  # a spoken reply longer than this is cut: nobody listens to pages of speech


def speak_to_file(text: str, path: str | Path, voice: str | None = None) -> Path:
    """Write `text` as speech to a WAV file; raises RuntimeError if espeak-ng is missing or fails."""
    if not available():
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    command = [ESPEAK, "-w", str(path)] + (["-v", voice] if voice else []) + ["--", speakable(text)[:MAX_CHARS]]
    run = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        raise RuntimeError(f"espeak-ng failed: {run.stderr.strip()[:200]}")
    return Path(path)
