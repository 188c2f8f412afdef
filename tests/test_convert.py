"""The converter: both layouts, what it writes, and clear errors on bad input."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest

from convert.checkpoint import CheckpointError
from convert.pipeline import convert_checkpoint
from convert.safetensors_file import SafetensorsFile, save_safetensors
from model.format import AUDIO, IMAGE, AudioKey, ManifestError, read_manifest
from model.gguf_weights import load_gguf
from tests.tiny_checkpoint import build_reference, save_native, save_remote_code

pytestmark = pytest.mark.slow  # transformers reference checkpoints, converted and run by llama.cpp


@pytest.fixture(scope="module")
def ref():
    return build_reference(seed=1)


@pytest.fixture(scope="module")
def native(ref, tmp_path_factory):
    return save_native(ref, tmp_path_factory.mktemp("native"))


@pytest.fixture(scope="module")
def remote(ref, tmp_path_factory):
    return save_remote_code(ref, tmp_path_factory.mktemp("remote"))


def test_cli_detects_each_layout_and_writes_the_folder(native, remote, tmp_path):
    for src, layout in ((native, "transformers"), (remote, "remote-code")):
        out = tmp_path / layout
        run = subprocess.run([sys.executable, "-m", "convert", str(src), str(out), "--outtype", "f32"],
                             capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert f"in the {layout} layout" in run.stdout
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["layout"] == layout
        assert manifest["files"]["backbone"] == "backbone.gguf"
        assert manifest["files"]["lora"] == {"vision": "lora-vision.gguf", "speech": "lora-speech.gguf"}
        assert manifest["placeholders"]["image"]["token"] == "<|endoftext10|>"
        assert manifest["placeholders"]["image"]["id"] == 401
        assert manifest["placeholders"]["audio"]["id"] == 402
        assert not list(out.glob("*.tmp"))


def test_backbone_is_a_standard_phi3_gguf(native, tmp_path):
    convert_checkpoint(native, tmp_path, "f32", quiet=True)
    reader = gguf.GGUFReader(tmp_path / "backbone.gguf")
    fields = {name: f for name, f in reader.fields.items()}
    text = lambda k: bytes(fields[k].parts[fields[k].data[0]]).decode()
    value = lambda k: fields[k].parts[fields[k].data[0]].tolist()[0]
    assert text("general.architecture") == "phi3"
    assert text("tokenizer.ggml.pre") == "gpt-4o"
    assert "'<|assistant|>'" in text("tokenizer.chat_template")
    assert value("phi3.rope.dimension_count") == 12      # partial rotary: 0.75 * 16
    assert value("phi3.rope.scaling.original_context_length") == 256
    assert abs(value("phi3.rope.scaling.attn_factor") - np.sqrt(1 + np.log(4) / np.log(256))) < 1e-6
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight", "rope_factors_long.weight",
            "rope_factors_short.weight", "token_embd.weight"} <= names
    assert "output.weight" not in names  # tied embeddings are stored once
    lora = gguf.GGUFReader(tmp_path / "lora-vision.gguf")
    lf = lora.fields
    assert bytes(lf["general.type"].parts[lf["general.type"].data[0]]).decode() == "adapter"
    assert lf["adapter.lora.alpha"].parts[lf["adapter.lora.alpha"].data[0]].tolist()[0] == 16.0
    shapes = {t.name: tuple(reversed([int(x) for x in t.shape])) for t in lora.tensors}
    assert shapes["blk.0.attn_qkv.weight.lora_a"] == (8, 64)      # (r, n_in), as PEFT
    assert shapes["blk.0.attn_qkv.weight.lora_b"] == (128, 8)     # (n_out, r)


def test_stock_llama_cpp_loads_the_backbone_and_the_loras(native, tmp_path):
    convert_checkpoint(native, tmp_path, "f16", quiet=True)
    llm = llama_cpp.Llama(str(tmp_path / "backbone.gguf"), n_ctx=256, verbose=False)
    tokens = llm.tokenize(b"<|user|>Hello<|end|><|assistant|>", add_bos=False, special=True)
    assert tokens[0] == 406 and tokens[-1] == 404  # special tokens parsed as such
    out = llm.create_completion(llm.detokenize(tokens).decode(), max_tokens=4)
    assert out["choices"][0]["finish_reason"] in ("stop", "length")
    for name in ("vision", "speech"):
        adapter = llama_cpp.llama_adapter_lora_init(llm.model, str(tmp_path / f"lora-{name}.gguf").encode())
        assert adapter, name


@pytest.mark.parametrize("outtype,weights,sensitive", [
    ("q8_0", "Q8_0", None), ("q4_0", "Q4_0", None), ("q4_0_q8", "Q4_0", "Q8_0")])
def test_quantised_decoder_goes_through_llama_cpp(native, tmp_path, outtype, weights, sensitive):
    convert_checkpoint(native, tmp_path, outtype, quiet=True)
    reader = gguf.GGUFReader(tmp_path / "backbone.gguf")
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_qkv.weight"] == gguf.GGMLQuantizationType[weights]
    if sensitive:  # the output matrix and the token embeddings kept at 8 bits
        assert types["token_embd.weight"] == gguf.GGMLQuantizationType[sensitive]
        assert types.get("output.weight", types["token_embd.weight"]) == gguf.GGMLQuantizationType[sensitive]
    assert not (tmp_path / "backbone.f16.gguf.partial").exists()


def test_bf16_weights_are_read_exactly(tmp_path):
    a = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    save_safetensors(tmp_path / "x.safetensors", {"a": a}, bf16=True)
    back = SafetensorsFile(tmp_path / "x.safetensors").load("a")
    assert np.allclose(back, a, rtol=1 / 128)
    assert np.all((back.view(np.uint32) & 0xFFFF) == 0)  # exactly representable in bf16


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_clear_errors_on_bad_input(native, remote, tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        convert_checkpoint(tmp_path / "nope", tmp_path / "o1", quiet=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        convert_checkpoint(empty, tmp_path / "o2", quiet=True)

    wrong = _copy(native, tmp_path / "wrong")
    cfg = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type 'llama' is not Phi-4-multimodal"):
        convert_checkpoint(wrong, tmp_path / "o3", quiet=True)

    no_lora = _copy(native, tmp_path / "no_lora")
    shutil.rmtree(no_lora / "speech-lora")
    with pytest.raises(CheckpointError, match="speech-lora"):
        convert_checkpoint(no_lora, tmp_path / "o4", quiet=True)

    shape = _copy(native, tmp_path / "shape")
    cfg = json.loads((shape / "config.json").read_text())
    (shape / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 100}))
    with pytest.raises(CheckpointError, match="gate_up_proj.weight has shape"):
        convert_checkpoint(shape, tmp_path / "o5", quiet=True)

    with pytest.raises(CheckpointError, match="unknown outtype"):
        convert_checkpoint(native, tmp_path / "o6", "q2", quiet=True)

    run = subprocess.run([sys.executable, "-m", "convert", str(empty), str(tmp_path / "o7")],
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.startswith("error: no config.json")


def _one_line_failure(*args):
    """`python -m convert *args`: exit code 2 and one line on stderr, no traceback. Returns the line."""
    run = subprocess.run([sys.executable, "-m", "convert", *map(str, args), "--quiet"], capture_output=True, text=True)
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    return run.stderr.strip()


@pytest.mark.parametrize("cut", ["model.safetensors", "speech-lora/adapter_model.safetensors"])
def test_a_truncated_safetensors_file_is_one_clear_line(native, tmp_path, cut):
    src = _copy(native, tmp_path / "src")
    data = (src / cut).read_bytes()
    (src / cut).write_bytes(data[:len(data) // 2])
    line = _one_line_failure(src, tmp_path / "out")
    assert f"{src / cut} is truncated" in line and "is the download complete?" in line
    assert not (tmp_path / "out").exists()
    (src / cut).write_bytes(data[:5])
    assert f"{src / cut} is not a safetensors file" in _one_line_failure(src, tmp_path / "out")
    (src / cut).write_bytes(b"\xff" * 64)
    assert f"{src / cut} is truncated or not a safetensors file" in _one_line_failure(src, tmp_path / "out")


def test_out_being_a_file_is_one_clear_line(native, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    assert _one_line_failure(native, tmp_path / "file") == f"error: {tmp_path / 'file'} exists and is not a folder: " \
                                                           f"give the folder to write the model into"
    assert "a file is in the way" in _one_line_failure(native, tmp_path / "file" / "model")
    assert (tmp_path / "file").read_text() == "not a folder"


def _files(folder) -> dict:
    """Every file under `folder` (relative path -> bytes hash)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(folder) -> list:
    return [p.name for p in folder.rglob("*")
            if p.name.startswith(".converting-") or p.name.endswith((".tmp", ".partial"))]


MODEL_FILES = {"manifest.json", "backbone.gguf", "lora-vision.gguf", "lora-speech.gguf", "vision-encoder.gguf",
               "audio-encoder.gguf"}


@pytest.fixture(scope="module")
def old_model(native, tmp_path_factory):
    """A finished f32 conversion, copied by each test that converts over it."""
    out = tmp_path_factory.mktemp("old") / "model"
    convert_checkpoint(native, out, "f32", quiet=True)
    return out


def test_interrupted_conversion_keeps_the_old_model(native, old_model, tmp_path, monkeypatch):
    out = _copy(old_model, tmp_path / "out")
    before = _files(out)
    import convert.checkpoint as ck
    real_load = ck.Checkpoint.load
    calls = {"n": 0}

    def failing_load(self, name):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt
        return real_load(self, name)

    monkeypatch.setattr(ck.Checkpoint, "load", failing_load)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(native, out, "f16", quiet=True)
    assert _files(out) == before          # the old model, untouched, and nothing else
    assert read_manifest(out).outtype == "f32"


def test_a_failed_reconversion_keeps_the_old_model_loadable(native, old_model, tmp_path, monkeypatch):
    out = _copy(old_model, tmp_path / "out")
    before = _files(out)
    import convert.pipeline as pipeline
    written = []

    def full_disk(*args, **kwargs):
        written.extend(p.name for p in out.rglob("*.gguf"))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline, "write_audio_encoder", full_disk)   # the last file written
    with pytest.raises(OSError, match="No space left"):
        convert_checkpoint(native, out, "q8_0", quiet=True)
    assert "backbone.gguf" in written and len(written) > len(MODEL_FILES) - 1   # new files were staged by then
    assert _files(out) == before
    m = read_manifest(out)
    assert m.outtype == "f32" and m.backbone == out / "backbone.gguf"
    # and a fresh folder is not left behind, empty, either
    with pytest.raises(OSError):
        convert_checkpoint(native, tmp_path / "fresh", "f32", quiet=True)
    assert not (tmp_path / "fresh").exists()


def test_a_swap_cut_short_leaves_the_new_model(native, old_model, tmp_path, monkeypatch):
    """Killed while the new files take their final names: the manifest lists the staged ones."""
    out = _copy(old_model, tmp_path / "out")
    import convert.pipeline as pipeline
    real_place, placed = pipeline._place, []

    def place_then_die(src, dst):
        if len(placed) == 2:
            raise KeyboardInterrupt
        placed.append(dst.name)
        real_place(src, dst)

    monkeypatch.setattr(pipeline, "_place", place_then_die)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(native, out, "f16", quiet=True)
    m = read_manifest(out)                  # the new model, complete, where it was staged
    assert m.outtype == "f16" and m.backbone.parent.name.startswith(".converting-")
    assert llama_cpp.Llama(str(m.backbone), n_ctx=64, verbose=False)
    monkeypatch.setattr(pipeline, "_place", real_place)
    convert_checkpoint(native, out, "f16", quiet=True)
    assert set(_files(out)) == MODEL_FILES and read_manifest(out).backbone == out / "backbone.gguf"


def test_leftovers_are_removed_but_not_a_live_conversions(native, old_model, tmp_path):
    out = _copy(old_model, tmp_path / "out")
    for name in ("backbone.f16.gguf.partial", "backbone.gguf.tmp", "manifest.json.tmp"):
        (out / name).write_bytes(b"x")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / f".converting-{int(dead.stdout)}").mkdir()
    (out / f".converting-{int(dead.stdout)}" / "backbone.gguf.tmp").write_bytes(b"x")
    live = out / f".converting-{os.getppid()}"   # the process that runs pytest: alive
    live.mkdir()
    (out / "notes.txt").write_text("mine")       # not the converter's: kept
    convert_checkpoint(native, out, "f32", quiet=True)
    assert set(_files(out)) == MODEL_FILES | {"notes.txt"}
    assert live.is_dir()


KILLABLE = """
import pathlib, sys, time
import convert.pipeline as pipeline
real_quantize = pipeline.quantize

def slow_quantize(src, dst, outtype):
    pathlib.Path(sys.argv[1]).write_text(str(src))   # the f16 decoder is written: kill me now
    time.sleep(120)
    return real_quantize(src, dst, outtype)

pipeline.quantize = slow_quantize
from convert.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


def _start_and_stop(native, out, flag, sig):
    """`python -m convert native out --outtype q8_0`, stopped by `sig` once it has written files."""
    proc = subprocess.Popen([sys.executable, "-c", KILLABLE, str(flag), str(native), str(out), "--outtype", "q8_0",
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not flag.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the conversion never reached the quantiser"
        time.sleep(0.05)
    partial = Path(flag.read_text())
    assert partial.name == "backbone.f16.gguf.partial" and partial.parent.parent == out and partial.exists()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    return proc.returncode, stderr


@pytest.mark.parametrize("over_a_model", [True, False])
def test_a_killed_conversion_leaves_nothing_that_looks_new(native, old_model, tmp_path, over_a_model):
    out = _copy(old_model, tmp_path / "out") if over_a_model else tmp_path / "out"
    before = _files(out) if over_a_model else None
    code, _ = _start_and_stop(native, out, tmp_path / "flag", signal.SIGKILL)
    assert code == -signal.SIGKILL
    if over_a_model:
        assert read_manifest(out).outtype == "f32"
        assert {k: v for k, v in _files(out).items() if "/" not in k} == before   # the old files, as they were
    else:
        with pytest.raises(ManifestError, match="manifest.json not found"):
            read_manifest(out)
    assert _leftovers(out)       # the dead conversion's staging folder, with the partial f16 decoder

    # the next run, with another outtype, succeeds and leaves nothing behind
    run = subprocess.run([sys.executable, "-m", "convert", str(native), str(out), "--outtype", "f16", "--quiet"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert read_manifest(out).outtype == "f16"
    assert set(_files(out)) == MODEL_FILES and not _leftovers(out)


def test_a_terminated_conversion_cleans_up_at_once(native, old_model, tmp_path):
    out = _copy(old_model, tmp_path / "out")
    before = _files(out)
    code, stderr = _start_and_stop(native, out, tmp_path / "flag", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM and stderr.startswith("terminated: ") and "Traceback" not in stderr
    assert _files(out) == before and read_manifest(out).outtype == "f32"


def _respelled(native, folder, image_token="<|image|>", audio_token="<|audio|>"):
    """A copy of the native checkpoint whose tokenizer spells the placeholders (ids 401 and 402, which
    the config's vision_config.image_token_id / audio_config.audio_token_id name) as transformers'
    own Phi-4 tokenizer does, declared as transformers 5 saves them."""
    folder = _copy(native, folder)
    spelling = {"<|endoftext10|>": "<|image|>", "<|endoftext11|>": "<|audio|>"}
    tok = json.loads((folder / "tokenizer.json").read_text())
    for added in tok["added_tokens"]:
        added["content"] = spelling.get(added["content"], added["content"])
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "image_token": image_token,
                                                              "audio_token": audio_token}))
    return folder


def test_placeholder_ids_come_from_the_checkpoint_not_a_spelling(native, tmp_path):
    from transformers import AutoTokenizer

    src = _respelled(native, tmp_path / "respelled")
    tokenizer = AutoTokenizer.from_pretrained(src)   # what transformers' processor reads
    assert (tokenizer.image_token, tokenizer.audio_token) == ("<|image|>", "<|audio|>")
    assert tokenizer.convert_tokens_to_ids(["<|image|>", "<|audio|>"]) == [401, 402]

    manifest = convert_checkpoint(src, tmp_path / "out", "f32", quiet=True)
    assert manifest["placeholders"] == {"image": {"token": "<|image|>", "id": 401},
                                        "audio": {"token": "<|audio|>", "id": 402}}
    assert read_manifest(tmp_path / "out").placeholder_ids == {IMAGE: 401, AUDIO: 402}
    assert load_gguf(tmp_path / "out" / "audio-encoder.gguf").get(AudioKey.AUDIO_TOKEN_ID) == 402

    # the config's id and the tokenizer's declared token must name the same token
    clash = _respelled(native, tmp_path / "clash", image_token="<|audio|>")
    with pytest.raises(CheckpointError, match="image_token_id is 401, which the tokenizer spells <\\|image\\|>"):
        convert_checkpoint(clash, tmp_path / "o", quiet=True)
    assert not (tmp_path / "o").exists()   # refused before anything is written
