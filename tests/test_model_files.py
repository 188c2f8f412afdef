"""A converted folder whose GGUFs are damaged is refused with a message, never a crash.

llama.cpp can abort the whole process on a truncated or corrupt GGUF, and numpy fails with
"cannot reshape array"; read_manifest checks every listed file's header first (model/format.py),
so LocalEngine.load gets the check for free. Uses the tiny converted checkpoint of test_convert.py.
"""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from convert.pipeline import convert_checkpoint
from model.format import GGUFFileError, ManifestError, read_manifest
from model.gguf_weights import load_gguf
from tests.tiny_checkpoint import build_reference, save_native

pytestmark = pytest.mark.slow  # a transformers reference checkpoint, converted

FILES = {"backbone.gguf": "files.backbone", "lora-vision.gguf": "files.lora.vision",
         "lora-speech.gguf": "files.lora.speech", "vision-encoder.gguf": "files.vision_encoder",
         "audio-encoder.gguf": "files.audio_encoder"}


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-1000])


def _garbage(path):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())


def _empty(path):
    path.write_bytes(b"")


DAMAGE = {"truncated": (_truncate, "is truncated: tensor "), "garbage": (_garbage, "is not a GGUF file"),
          "empty": (_empty, "is empty")}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    src = save_native(build_reference(seed=1), tmp_path_factory.mktemp("native"))
    out = tmp_path_factory.mktemp("converted") / "model"
    convert_checkpoint(src, out, "f32", quiet=True)
    return out


def _damaged(model, tmp_path, name, damage):
    folder = shutil.copytree(model, tmp_path / "model")
    DAMAGE[damage][0](folder / name)
    return folder


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("name", list(FILES))
def test_read_manifest_names_the_damaged_file_and_the_fix(model, tmp_path, name, damage):
    folder = _damaged(model, tmp_path, name, damage)
    with pytest.raises(ManifestError) as caught:
        read_manifest(folder)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{folder / name} (listed in manifest.json as {FILES[name]!r}) {DAMAGE[damage][1]}")
    assert message.endswith(f": rerun python -m convert CHECKPOINT {folder}")


LOAD = """
import sys
from app.engine import LocalEngine
from app.engine_api import EngineError
try:
    LocalEngine.load(sys.argv[1], n_ctx=64).close()
except EngineError as e:
    print(f"EngineError: {e}", file=sys.stderr)
    sys.exit(3)
print("loaded")
"""


def _load_in_subprocess(folder):
    """LocalEngine.load(folder) where an abort in llama.cpp cannot take the tests down."""
    return subprocess.run([sys.executable, "-c", LOAD, str(folder)], capture_output=True, text=True, timeout=300)


def test_the_intact_folder_loads(model):
    run = _load_in_subprocess(model)
    assert run.returncode == 0 and run.stdout.strip() == "loaded", run.stderr


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("name", list(FILES))
def test_the_engine_refuses_a_damaged_file_with_a_message(model, tmp_path, name, damage):
    folder = _damaged(model, tmp_path, name, damage)
    run = _load_in_subprocess(folder)
    assert run.returncode == 3, f"exit {run.returncode}: {run.stderr[-2000:]}"   # not an abort (negative)
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith(f"EngineError: {folder / name} (listed in manifest.json as {FILES[name]!r}) "
                           f"{DAMAGE[damage][1]}"), line
    assert line.endswith(f"rerun python -m convert CHECKPOINT {folder}")


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("name", ["vision-encoder.gguf", "audio-encoder.gguf"])
def test_load_gguf_names_a_damaged_encoder(model, tmp_path, name, damage):
    folder = _damaged(model, tmp_path, name, damage)
    with pytest.raises(GGUFFileError) as caught:
        load_gguf(folder / name)
    message = str(caught.value)
    assert message.startswith(f"{folder / name} {DAMAGE[damage][1]}") and "reshape" not in message
    assert message.endswith(f"rerun python -m convert CHECKPOINT {folder}")
    load_gguf(model / name)   # the intact one reads
