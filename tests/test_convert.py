"""The converter: both layouts, what it writes, and clear errors on bad input."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import gguf
import llama_cpp
import numpy as np
import pytest

from convert.checkpoint import CheckpointError
from convert.pipeline import convert_checkpoint
from convert.safetensors_file import SafetensorsFile, save_safetensors
from model.format import AUDIO, IMAGE, AudioKey, read_manifest
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


def test_quantised_decoder_goes_through_llama_cpp(native, tmp_path):
    convert_checkpoint(native, tmp_path, "q8_0", quiet=True)
    reader = gguf.GGUFReader(tmp_path / "backbone.gguf")
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_qkv.weight"] == gguf.GGMLQuantizationType.Q8_0
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


def test_interrupted_conversion_leaves_nothing_that_looks_complete(native, tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert_checkpoint(native, out, "f32", quiet=True)   # a finished earlier run
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
        convert_checkpoint(native, out, "f32", quiet=True)
    assert not (out / "manifest.json").exists()   # the folder no longer claims to be complete
    assert not list(out.glob("*.tmp"))


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
