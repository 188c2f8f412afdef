"""model/format.py: the manifest's checks and messages, and the encoder GGUF names both sides use.

Fast: the encoder files here are written from small random arrays (no torch, no checkpoint).
"""
from __future__ import annotations

import json
from pathlib import Path
from dataclasses import dataclass, field

import gguf
import numpy as np
import pytest

from convert.audio_encoder import write_audio_encoder
from convert.vision_encoder import write_vision_encoder
from model.format import (
    AUDIO, IMAGE, MANIFEST_FILE, Arch, AudioKey, GGUFFileError, Manifest, ManifestError, Placeholder, VisionKey,
    arch_key, check_gguf, is_converted, read_gguf_header, read_manifest, write_manifest,
)
from model.gguf_weights import GGUFWeights, load_gguf
from model.speech_encoder import SpeechEncoder
from model.vision_encoder import VisionEncoder

# file -> (general.architecture, LoRA adapter?)
FILES = {"backbone.gguf": (Arch.DECODER, False), "lora-vision.gguf": (Arch.DECODER, True),
         "lora-speech.gguf": (Arch.DECODER, True), "vision-encoder.gguf": (Arch.VISION, False),
         "audio-encoder.gguf": (Arch.AUDIO, False)}


def stand_in_gguf(path, arch, adapter=False, tensors=None):
    """A small but whole GGUF of `arch` (a LoRA adapter when `adapter`); uint8 tensors are q8_0 blocks,
    uint16 ones bf16 bits."""
    w = gguf.GGUFWriter(path, arch=arch)
    if adapter:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_token_list([f"t{i}".encode() for i in range(50)])   # a string array to step over
    for name, array in (tensors or {"a.weight": np.arange(64, dtype=np.float32).reshape(8, 8),
                                    "b.bias": np.ones(5, np.float32)}).items():
        raw = {np.dtype(np.uint8): gguf.GGMLQuantizationType.Q8_0, np.dtype(np.uint16): gguf.GGMLQuantizationType.BF16}
        w.add_tensor(name, array, raw_dtype=raw.get(array.dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def converted_folder(folder):
    """A folder as the converter leaves it (small stand-ins for the GGUFs); returns the manifest dict."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, (arch, adapter) in FILES.items():
        stand_in_gguf(folder / name, arch, adapter)
    return write_manifest(folder, source="/checkpoints/phi4", layout="transformers", outtype="q4_k_m",
                          placeholders={IMAGE: Placeholder("<|image|>", 200010), AUDIO: Placeholder("<|audio|>", 200011)},
                          lora_alpha={"vision": 512.0, "speech": 640.0}, lora_rank={"vision": 256, "speech": 320},
                          original_context=4096, max_context=131072)


def edit(folder, change):
    """Rewrite the folder's manifest.json with `change(manifest dict)` applied."""
    raw = json.loads((folder / MANIFEST_FILE).read_text())
    change(raw)
    (folder / MANIFEST_FILE).write_text(json.dumps(raw))


def one_line_error(folder) -> str:
    with pytest.raises(ManifestError) as caught:
        read_manifest(folder)
    message = str(caught.value)
    assert "\n" not in message and "python -m convert CHECKPOINT" in message   # what to run is always said
    return message


# -- the manifest ---------------------------------------------------------------------------------

def test_a_written_manifest_reads_back(tmp_path):
    written = converted_folder(tmp_path)
    m = read_manifest(tmp_path)
    assert isinstance(m, Manifest) and m.folder == tmp_path
    assert m.backbone == tmp_path / "backbone.gguf"
    assert m.loras == {"vision": tmp_path / "lora-vision.gguf", "speech": tmp_path / "lora-speech.gguf"}
    assert m.vision_encoder == tmp_path / "vision-encoder.gguf"
    assert m.audio_encoder == tmp_path / "audio-encoder.gguf"
    assert m.placeholder_ids == {IMAGE: 200010, AUDIO: 200011}
    assert m.outtype == "q4_k_m" and m.raw == written
    # the keys app/engine.py reads from the JSON itself
    assert written["files"]["backbone"] == "backbone.gguf" and written["placeholders"]["image"]["id"] == 200010
    assert written["files"]["lora"] == {"vision": "lora-vision.gguf", "speech": "lora-speech.gguf"}
    assert not list(tmp_path.glob("*.tmp")) and is_converted(tmp_path)


def test_encoders_are_optional(tmp_path):
    converted_folder(tmp_path)

    def text_only(raw):
        del raw["files"]["vision_encoder"], raw["files"]["audio_encoder"]
        raw["placeholders"] = {}
    edit(tmp_path, text_only)
    m = read_manifest(tmp_path)
    assert m.vision_encoder is None and m.audio_encoder is None and m.placeholder_ids == {}


def test_missing_folder_or_manifest(tmp_path):
    for folder in (tmp_path / "nowhere", tmp_path):
        message = one_line_error(folder)
        assert "manifest.json not found: not a converted model folder, or the conversion did not finish" in message
        assert f"run: python -m convert CHECKPOINT {folder}" in message
        assert not is_converted(folder)


def test_not_json(tmp_path):
    converted_folder(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text('{"format": "phi4mm-local", ')
    assert "manifest.json is not JSON" in one_line_error(tmp_path)
    (tmp_path / MANIFEST_FILE).write_bytes(b"\xff\xfe")
    assert "manifest.json is not JSON" in one_line_error(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text("[1, 2]")
    assert "is not a phi4mm-local manifest" in one_line_error(tmp_path)


@pytest.mark.parametrize("version", [2, 0, "1", True, None])
def test_another_format_version(tmp_path, version):
    converted_folder(tmp_path)
    edit(tmp_path, lambda raw: raw.update(version=version))
    message = one_line_error(tmp_path)
    assert f"was written by another converter version (format {version}); this app reads format 1: " \
           f"rerun python -m convert CHECKPOINT {tmp_path}" in message


@pytest.mark.parametrize("path,key", [
    (("files", "backbone"), "files.backbone"),
    (("files",), "files.backbone"),
    (("outtype",), "outtype"),
    (("placeholders",), "placeholders"),
    (("placeholders", "audio"), "placeholders.audio.id"),       # the audio encoder needs it
    (("placeholders", "image", "id"), "placeholders.image.id"),
])
def test_missing_key_is_named(tmp_path, path, key):
    converted_folder(tmp_path)

    def drop(raw):
        for part in path[:-1]:
            raw = raw[part]
        del raw[path[-1]]
    edit(tmp_path, drop)
    assert f"lacks {key!r}" in one_line_error(tmp_path)


def test_wrong_type_is_named(tmp_path):
    converted_folder(tmp_path)
    edit(tmp_path, lambda raw: raw["placeholders"]["image"].update(id="200010"))
    assert "'placeholders.image.id' should be a token id, not '200010'" in one_line_error(tmp_path)
    converted_folder(tmp_path)
    edit(tmp_path, lambda raw: raw.update(files=["backbone.gguf"]))
    assert "'files' should be an object" in one_line_error(tmp_path)


def test_missing_listed_file_is_named(tmp_path):
    converted_folder(tmp_path)
    (tmp_path / "lora-speech.gguf").unlink()
    message = one_line_error(tmp_path)
    assert f"{tmp_path / 'lora-speech.gguf'} is missing (listed in manifest.json as 'files.lora.speech')" in message


def test_a_manifest_may_list_files_in_a_subfolder(tmp_path):
    """The converter's staging step: the manifest lists the finished files where they are."""
    converted_folder(tmp_path / ".converting-1")
    written = converted_folder(tmp_path)
    (tmp_path / MANIFEST_FILE).unlink()
    staged = write_manifest(tmp_path, **_fields(written), under=".converting-1")
    assert staged["files"]["backbone"] == ".converting-1/backbone.gguf"
    m = read_manifest(tmp_path)
    assert m.backbone == tmp_path / ".converting-1" / "backbone.gguf"
    assert m.loras["speech"] == tmp_path / ".converting-1" / "lora-speech.gguf"
    with pytest.raises(ValueError):
        write_manifest(tmp_path, **_fields(written), under="../elsewhere")


def _fields(raw):
    """write_manifest's arguments from a manifest dict it wrote."""
    return dict(source=raw["source"], layout=raw["layout"], outtype=raw["outtype"],
                placeholders={k: Placeholder(v["token"], v["id"]) for k, v in raw["placeholders"].items()},
                lora_alpha=raw["lora_alpha"], lora_rank=raw["lora_rank"],
                original_context=raw["context"]["original"], max_context=raw["context"]["max"])


# -- the GGUF files a manifest lists --------------------------------------------------------------

def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2] if len(data) < 2000 else data[:-1000])


def _garbage(path):
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def _empty(path):
    path.write_bytes(b"")


def _header_only(path):
    """Cut inside the key/values: the header itself runs past the end."""
    path.write_bytes(path.read_bytes()[:100])


DAMAGE = {"truncated": (_truncate, "is truncated"), "garbage": (_garbage, "is not a GGUF file"),
          "empty": (_empty, "is empty"), "header cut": (_header_only, "is truncated or corrupt")}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("name,key", [("backbone.gguf", "files.backbone"), ("lora-vision.gguf", "files.lora.vision"),
                                      ("lora-speech.gguf", "files.lora.speech"),
                                      ("vision-encoder.gguf", "files.vision_encoder"),
                                      ("audio-encoder.gguf", "files.audio_encoder")])
def test_a_damaged_gguf_is_named(tmp_path, name, key, damage):
    converted_folder(tmp_path)
    # a big last tensor, so that cutting 1000 bytes lands in tensor data, past a whole header
    arch, adapter = FILES[name]
    stand_in_gguf(tmp_path / name, arch, adapter, {"w": np.zeros((40, 64), np.float32)})
    read_manifest(tmp_path)
    spoil, problem = DAMAGE[damage]
    spoil(tmp_path / name)
    message = one_line_error(tmp_path)
    assert message.startswith(f"{tmp_path / name} (listed in manifest.json as {key!r}) {problem}"), message
    assert message.endswith(f"rerun python -m convert CHECKPOINT {tmp_path}")


@pytest.mark.parametrize("name,arch,adapter,problem", [
    ("backbone.gguf", "llama", False, "has general.architecture 'llama', not 'phi3'"),
    ("backbone.gguf", Arch.DECODER, True, "is a LoRA adapter (general.type 'adapter'), not a model"),
    ("lora-vision.gguf", Arch.DECODER, False, "is not a LoRA adapter (general.type is None, not 'adapter')"),
    ("vision-encoder.gguf", Arch.AUDIO, False, "has general.architecture 'phi4mm-audio', not 'phi4mm-vision'"),
    ("audio-encoder.gguf", Arch.VISION, False, "has general.architecture 'phi4mm-vision', not 'phi4mm-audio'"),
])
def test_a_gguf_of_another_kind_is_named(tmp_path, name, arch, adapter, problem):
    converted_folder(tmp_path)
    stand_in_gguf(tmp_path / name, arch, adapter)
    assert f"{tmp_path / name} (listed in manifest.json as " in one_line_error(tmp_path)
    assert problem in one_line_error(tmp_path)


def test_gguf_header_is_read_without_tensor_data(tmp_path):
    path = stand_in_gguf(tmp_path / "x.gguf", Arch.VISION, tensors={
        "f16": np.ones((4, 32), np.float16), "q": gguf.quants.quantize(np.ones((16, 32), np.float32), gguf.GGMLQuantizationType.Q8_0)})  # 544 bytes: no padding after
    header = read_gguf_header(path)
    assert (header.architecture, header.type, header.tensor_count) == (Arch.VISION, None, 2)
    assert check_gguf(path, Arch.VISION) == header
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-1])     # one byte short of the last tensor
    with pytest.raises(GGUFFileError, match=r"cut.gguf is truncated: tensor 'q' ends at byte \d+, but the file has"):
        read_gguf_header(tmp_path / "cut.gguf")
    with pytest.raises(GGUFFileError, match="no-such.gguf cannot be read"):
        read_gguf_header(tmp_path / "no-such.gguf")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_load_gguf_names_a_damaged_file(tmp_path, damage):
    path = stand_in_gguf(tmp_path / "audio-encoder.gguf", Arch.AUDIO, tensors={"w": np.zeros((40, 64), np.float32)})
    DAMAGE[damage][0](path)
    with pytest.raises(GGUFFileError) as caught:
        load_gguf(path)
    message = str(caught.value)
    assert message.startswith(f"{path} {DAMAGE[damage][1]}") and "reshape" not in message
    assert message.endswith(f"rerun python -m convert CHECKPOINT {tmp_path}")


# -- encoder GGUF names: what convert/ writes is what model/ reads ---------------------------------

@dataclass
class Recording(GGUFWeights):
    """GGUF contents that note which tensors and metadata keys a reader asks for."""
    tensors_read: set = field(default_factory=set)
    keys_read: set = field(default_factory=set)

    def stored(self, name):   # tensor() reads through stored()
        self.tensors_read.add(name)
        return super().stored(name)

    def get(self, key):
        self.keys_read.add(key)
        return super().get(key)


def recorded(path) -> Recording:
    w = load_gguf(path)
    return Recording(w.arch, w.metadata, w.tensors)


def keys_of(key_class) -> set[str]:
    return {value for name, value in vars(key_class).items() if name.isupper()}


def random_tensors(shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: (0.1 * rng.standard_normal(shape)).astype(np.float32) for name, shape in shapes.items()}


def vision_encoder_parts() -> tuple[dict, dict]:
    """Native tensors and config of a small whole vision encoder."""
    C, F, D, P, side = 8, 12, 6, 14, 2
    shapes = {
        "img_processor.embeddings.patch_embedding.weight": (C, 3, P, P),
        "img_processor.embeddings.patch_embedding.bias": (C,),
        "img_processor.embeddings.position_embedding.weight": (side * side, C),
        "sub_img_feature_extensor": (1, 1, 1, C), "global_img_feature_extensor": (1, 1, C),
        "img_projection_up.weight": (D, C), "img_projection_up.bias": (D,),
        "img_projection_down.weight": (D, D), "img_projection_down.bias": (D,),
    }
    block = {"layer_norm1": (C, C), "self_attn.q_proj": (C, C), "self_attn.k_proj": (C, C),
             "self_attn.v_proj": (C, C), "self_attn.out_proj": (C, C), "layer_norm2": (C, C),
             "mlp.fc1": (F, C), "mlp.fc2": (C, F)}
    for bid in range(2):
        for module, (n_out, n_in) in block.items():
            norm = module.startswith("layer_norm")
            shapes[f"img_processor.encoder.layers.{bid}.{module}.weight"] = (n_out,) if norm else (n_out, n_in)
            shapes[f"img_processor.encoder.layers.{bid}.{module}.bias"] = (n_out,)
    config = dict(hidden_size=C, intermediate_size=F, num_hidden_layers=2, num_attention_heads=2,
                  image_size=side * P, patch_size=P, crop_size=side * P)
    return random_tensors(shapes), config


def audio_encoder_parts() -> tuple[dict, dict]:
    """Native tensors and config of a small whole speech encoder (one block)."""
    H, I, C, P, n_mels, K = 8, 12, 4, 6, 80, 3
    F = 10   # mel bins after three stride-2 convolutions: 80 -> 40 -> 20 -> 10
    shapes = {
        "encoder.encoder_embedding.global_mean": (n_mels,), "encoder.encoder_embedding.global_invstd": (n_mels,),
        "encoder.embed.conv.0.weight": (C, 1, 3, 3), "encoder.embed.conv.0.bias": (C,),
        "encoder.embed.out.weight": (H, C * F), "encoder.embed.out.bias": (H,),
        "encoder.relative_attention_bias_layer.bias_values.weight": (2 * 5, 2),
    }
    for i in (1, 2):
        shapes |= {f"encoder.embed.conv.{3 * i - 1}.weight": (C, 1, 3, 3), f"encoder.embed.conv.{3 * i - 1}.bias": (C,),
                   f"encoder.embed.conv.{3 * i}.weight": (C, C, 1, 1), f"encoder.embed.conv.{3 * i}.bias": (C,)}
    b = "encoder.encoders.0."
    for side in ("in", "out"):
        ffn = f"{b}feed_forward_{side}."
        shapes |= {ffn + "layer_norm.weight": (H,), ffn + "layer_norm.bias": (H,),
                   ffn + "gate_up_proj.weight": (2 * I, H), ffn + "gate_up_proj.bias": (2 * I,),
                   ffn + "down_proj.weight": (H, I), ffn + "down_proj.bias": (H,)}
    for p in ("q", "k", "v", "o"):
        shapes |= {f"{b}self_attn.{p}_proj.weight": (H, H), f"{b}self_attn.{p}_proj.bias": (H,)}
    for norm in ("layer_norm_att", "conv.layer_norm", "layer_norm"):
        shapes |= {f"{b}{norm}.weight": (H,), f"{b}{norm}.bias": (H,)}
    shapes |= {
        f"{b}conv.glu.ext_pw_conv_1d.weight": (2 * H, H, 1), f"{b}conv.glu.ext_pw_conv_1d.bias": (2 * H,),
        f"{b}conv.glu.b1": (1, H, 1), f"{b}conv.glu.b2": (1, H, 1),
        f"{b}conv.dw_sep_conv_1d.dw_conv.weight": (H, 1, K), f"{b}conv.dw_sep_conv_1d.dw_conv.bias": (H,),
        f"{b}conv.dw_sep_conv_1d.pw_conv.weight": (H, H, 1), f"{b}conv.dw_sep_conv_1d.pw_conv.bias": (H,),
        f"{b}conv.ext_pw_conv_1d.weight": (H, H, 1), f"{b}conv.ext_pw_conv_1d.bias": (H,),
    }
    for native in ("speech", "vision_speech"):
        shapes |= {f"up_proj_for_{native}.weight": (P, H), f"up_proj_for_{native}.bias": (P,),
                   f"down_proj_for_{native}.weight": (P, P), f"down_proj_for_{native}.bias": (P,)}
    config = dict(hidden_size=H, intermediate_size=I, num_blocks=1, num_attention_heads=2, nemo_conv_channels=C,
                  ext_pw_out_channel=H, depthwise_separable_out_channel=H, bias_max_distance=5, kernel_size=K)
    return random_tensors(shapes), config


def test_vision_encoder_names_round_trip(tmp_path):
    path = write_vision_encoder(*vision_encoder_parts(), tmp_path / "v.gguf", progress=False)

    w = recorded(path)
    VisionEncoder(w)
    assert w.arch == Arch.VISION
    assert w.tensors_read == set(w.tensors)          # every tensor written is read, by the same name
    written = {k for k in w.metadata if k.startswith(Arch.VISION + ".")}
    assert written == {arch_key(Arch.VISION, k) for k in keys_of(VisionKey)}
    assert w.keys_read <= keys_of(VisionKey)


def test_audio_encoder_names_round_trip(tmp_path):
    path = write_audio_encoder(*audio_encoder_parts(), tmp_path / "a.gguf")

    w = recorded(path)
    encoder = SpeechEncoder.from_weights(w)
    assert w.arch == Arch.AUDIO
    assert w.tensors_read == set(w.tensors)
    written = {k for k in w.metadata if k.startswith(Arch.AUDIO + ".")}
    assert written == {arch_key(Arch.AUDIO, k) for k in keys_of(AudioKey)}
    assert w.keys_read <= keys_of(AudioKey)
    assert encoder.embed(np.zeros(16000, np.float32)).shape == (encoder.num_tokens(16000), 6)


def bf16_exact(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tensors rounded to bf16 values (as the real checkpoint holds), kept in float32."""
    return {name: (gguf.quants.quantize(a, gguf.GGMLQuantizationType.BF16).view(np.uint16).astype(np.uint32) << 16)
            .view(np.float32).reshape(a.shape) for name, a in tensors.items()}


@pytest.mark.parametrize("kind", ["vision", "audio"])
def test_bf16_encoders_compute_exactly_what_float32_ones_do(tmp_path, kind):
    """bf16 weights stay bf16 in memory (half of float32) and are widened exactly where used: from a
    bf16 checkpoint, the bf16 file's embeddings are the float32 file's, bit for bit."""
    from PIL import Image

    if kind == "vision":
        tensors, config = vision_encoder_parts()
        write, load = (lambda t, path, outtype: write_vision_encoder(t, config, path, outtype, progress=False),
                       VisionEncoder.load)
        image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 70, 3), np.uint8))
        embed = lambda encoder: encoder.embed(image)
    else:
        tensors, config = audio_encoder_parts()
        write, load = (lambda t, path, outtype: write_audio_encoder(t, config, path, outtype, progress=False),
                       SpeechEncoder.load)
        clip = np.random.default_rng(1).standard_normal(16000 * 41).astype(np.float32) * 0.1  # 2 windows of 40 s
        embed = lambda encoder: np.concatenate([encoder.embed(clip, mode) for mode in ("speech", "vision")])
    tensors = bf16_exact(tensors)
    f32, bf16 = (write(tensors, tmp_path / f"{outtype}.gguf", outtype) for outtype in ("f32", "bf16"))

    held, full = load_gguf(bf16).tensors, load_gguf(f32).tensors
    matrices = [name for name, a in held.items() if a.ndim >= 2]
    assert matrices and all(held[name].dtype == np.uint16 for name in matrices)
    assert all(2 * held[name].nbytes == full[name].nbytes for name in matrices)
    np.testing.assert_array_equal(embed(load(bf16)), embed(load(f32)))


def test_the_decoder_is_llama_cpps_phi3():
    assert Arch.DECODER == gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.PHI3]


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads Linux's /proc/self/maps")
def test_loaded_weights_leave_the_file_unmapped(tmp_path):
    """The encoders' weights are read into arrays of their own: nothing stays a view of the
    memory-mapped file, whose pages would otherwise stay in the resident size beside them (1.6 GiB
    for the real encoders). bf16 stays bf16 (its bits); f16, from older conversions, is widened."""
    import gc

    bf16 = np.array([[1.0, -2.5, 2.0 ** -130, np.inf]], np.float32)   # bf16 values: a subnormal, inf
    path = stand_in_gguf(tmp_path / "vision-encoder.gguf", Arch.VISION, tensors={
        "f32": np.arange(64, dtype=np.float32).reshape(2, 32), "f16": np.ones((4, 32), np.float16),
        "bf16": gguf.quants.quantize(bf16, gguf.GGMLQuantizationType.BF16).view(np.uint16)})
    weights = load_gguf(path)
    gc.collect()
    assert weights.tensors["f32"][1, 0] == 32 and weights.tensors["f16"].dtype == np.float32
    assert weights.tensors["bf16"].dtype == np.uint16 and weights.tensors["bf16"].shape == (1, 4)
    np.testing.assert_array_equal(weights.tensor("bf16"), bf16)
    assert str(path) not in Path("/proc/self/maps").read_text()
