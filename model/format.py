"""The converted model folder's file format: every name that convert/ writes and model/ + app/ read.

In the spirit of llama.cpp's gguf-py `constants.py`: file names, the manifest and its keys,
architecture names, metadata keys and tensor names are spelled here once. convert/ writes
with these names, model/ and app/ read with them, so the two sides cannot drift apart
(docs/model.md, "GGUF files").

A converted folder:

    backbone.gguf         the Phi-4-mini decoder, llama.cpp's own architecture `phi3`
    lora-vision.gguf      the vision LoRA (a llama.cpp adapter of the decoder)
    lora-speech.gguf      the speech LoRA
    vision-encoder.gguf   SigLIP tower + projector, architecture `phi4mm-vision` (numpy, model/)
    audio-encoder.gguf    conformer + projectors, architecture `phi4mm-audio` (numpy, model/)
    manifest.json         what is here; written last, so its presence means "complete"

`read_manifest` checks every listed GGUF's header before anything opens it (`check_gguf`): a
truncated or corrupt file is refused with a message naming it, instead of reaching llama.cpp.

The decoder and its LoRAs use llama.cpp's names (gguf-py's `TENSOR_NAMES`), which llama.cpp
itself reads; the two encoder files are this project's own and are described in full below.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

# -- output types -----------------------------------------------------------------------------------

# `python -m convert --outtype`: how the decoder is stored. f32 and f16 are written directly;
# q8_0 and q4_k_m are made from an f16 file by llama.cpp's own quantiser.
OUTTYPES = ("f32", "f16", "q8_0", "q4_k_m", "q4_0", "q4_0_q8")  # q4_0_q8: q4_0, output and embeddings q8_0
DEFAULT_OUTTYPE = "q4_k_m"

# How one GGUF written by convert/gguf_out.py stores its matrices (1-D tensors always stay f32).
# A different idea from OUTTYPES: q4_k_m is llama.cpp's per-tensor mix, not a type the writer
# produces, and the LoRAs and encoders of a quantised model are stored in one of these.
STORAGE_TYPES = ("f32", "f16", "bf16", "q8_0")
# The encoders run in float32 numpy whatever the file holds: q8_0 would cost accuracy, not time.
# bf16 is what the checkpoint holds (exact) and stays bf16 in memory, widened a matrix at a time
# (model/layers.py); f16, what conversions wrote before, is widened to float32 as it is read.
ENCODER_STORAGE_TYPES = ("f32", "bf16", "f16")

# -- the folder -------------------------------------------------------------------------------------

BACKBONE_FILE = "backbone.gguf"
VISION_ENCODER_FILE = "vision-encoder.gguf"
AUDIO_ENCODER_FILE = "audio-encoder.gguf"
MANIFEST_FILE = "manifest.json"

# The media a prompt holds as runs of placeholder tokens, one per embedding row: the keys of the
# manifest's `placeholders`.
IMAGE = "image"
AUDIO = "audio"


def lora_file(adapter: str) -> str:
    """The file of a LoRA adapter: `vision` -> `lora-vision.gguf` (docs/model.md, "Mixture of LoRAs")."""
    return f"lora-{adapter}.gguf"


# -- the manifest -----------------------------------------------------------------------------------

FORMAT_NAME = "phi4mm-local"
FORMAT_VERSION = 1   # raise it whenever a folder written before could be misread after
CONVERT_COMMAND = "python -m convert CHECKPOINT"   # + the folder: how a reader says "convert again"


class ManifestKey:
    """Top-level keys of manifest.json."""
    FORMAT = "format"              # FORMAT_NAME
    VERSION = "version"            # FORMAT_VERSION
    SOURCE = "source"              # the checkpoint folder it was converted from
    LAYOUT = "layout"              # that checkpoint's layout: "remote-code" or "transformers"
    OUTTYPE = "outtype"            # one of OUTTYPES
    FILES = "files"                # FileKey -> file name in the folder
    PLACEHOLDERS = "placeholders"  # IMAGE / AUDIO -> {PlaceholderKey.TOKEN: spelling, PlaceholderKey.ID: id}
    LORA_ALPHA = "lora_alpha"      # adapter -> alpha
    LORA_RANK = "lora_rank"        # adapter -> r
    CONTEXT = "context"            # {"original": short-rope context, "max": longest context}


class FileKey:
    """Keys under `files`."""
    BACKBONE = "backbone"
    LORA = "lora"                  # adapter -> file name
    VISION_ENCODER = "vision_encoder"
    AUDIO_ENCODER = "audio_encoder"


class PlaceholderKey:
    """Keys of one entry under `placeholders`."""
    TOKEN = "token"                # the spelling in the tokenizer (informative: the app uses the id)
    ID = "id"


class ManifestError(ValueError):
    """A folder whose manifest.json cannot be used; the one-line message says why and what to run."""


@dataclass(frozen=True)
class Placeholder:
    """The token a prompt holds once per embedding row of an image or an audio clip."""
    token: str
    id: int


@dataclass(frozen=True)
class Manifest:
    """A validated manifest.json: every listed file exists and is a whole GGUF of its kind (check_gguf)."""
    folder: Path
    backbone: Path
    loras: dict[str, Path]               # adapter name -> file
    vision_encoder: Path | None          # None: the folder cannot read images
    audio_encoder: Path | None           # None: the folder cannot hear audio
    placeholder_ids: dict[str, int]      # IMAGE / AUDIO -> token id
    outtype: str
    raw: dict                            # the whole JSON, for what the fields above leave out


def is_converted(folder: str | os.PathLike) -> bool:
    """True when `folder` holds a finished conversion (the manifest is written last)."""
    return (Path(folder) / MANIFEST_FILE).is_file()


def write_manifest(folder: str | os.PathLike, *, source: str, layout: str, outtype: str,
                   placeholders: dict[str, Placeholder], lora_alpha: dict[str, float],
                   lora_rank: dict[str, int], original_context: int, max_context: int,
                   under: str | None = None) -> dict:
    """Write manifest.json for a folder holding every file of a conversion: BACKBONE_FILE, one
    `lora_file(adapter)` per adapter of `lora_rank`, and both encoder files. Returns what was written.

    `under`: the files are in that subfolder of `folder` instead (the converter's staging folder,
    which it lists while it moves a finished conversion into place: convert/pipeline.py).
    Written to a temporary name and renamed, so a reader never sees half a manifest.
    """
    folder = Path(folder)
    if under is not None and (not under or "/" in under or "\\" in under or under in (".", "..")):
        raise ValueError(f"under must name a subfolder, not {under!r}")
    at = (lambda name: f"{under}/{name}") if under else (lambda name: name)
    manifest = {
        ManifestKey.FORMAT: FORMAT_NAME,
        ManifestKey.VERSION: FORMAT_VERSION,
        ManifestKey.SOURCE: source,
        ManifestKey.LAYOUT: layout,
        ManifestKey.OUTTYPE: outtype,
        ManifestKey.FILES: {
            FileKey.BACKBONE: at(BACKBONE_FILE),
            FileKey.LORA: {name: at(lora_file(name)) for name in lora_rank},
            FileKey.VISION_ENCODER: at(VISION_ENCODER_FILE),
            FileKey.AUDIO_ENCODER: at(AUDIO_ENCODER_FILE),
        },
        ManifestKey.PLACEHOLDERS: {kind: {PlaceholderKey.TOKEN: p.token, PlaceholderKey.ID: p.id}
                                   for kind, p in placeholders.items()},
        ManifestKey.LORA_ALPHA: dict(lora_alpha),
        ManifestKey.LORA_RANK: dict(lora_rank),
        ManifestKey.CONTEXT: {"original": original_context, "max": max_context},
    }
    tmp = folder / (MANIFEST_FILE + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest, indent=2))
        os.replace(tmp, folder / MANIFEST_FILE)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return manifest


def read_manifest(folder: str | os.PathLike) -> Manifest:
    """Read and check `folder`/manifest.json, and the header of every GGUF it lists (check_gguf: cheap,
    no tensor data is read). Raises ManifestError naming the problem and the fix."""
    folder = Path(folder)
    path = folder / MANIFEST_FILE
    rerun = f"{CONVERT_COMMAND} {folder}"
    if not path.is_file():
        raise ManifestError(f"{path} not found: not a converted model folder, or the conversion did not "
                            f"finish; run: {rerun}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{path} is not JSON ({e}): rerun {rerun}") from None
    if not isinstance(raw, dict) or raw.get(ManifestKey.FORMAT) != FORMAT_NAME:
        raise ManifestError(f"{path} is not a {FORMAT_NAME} manifest: rerun {rerun}")
    version = raw.get(ManifestKey.VERSION)
    if type(version) is not int or version != FORMAT_VERSION:   # type(): JSON `true` must not pass as 1
        raise ManifestError(f"{path} was written by another converter version (format {version}); "
                            f"this app reads format {FORMAT_VERSION}: rerun {rerun}")

    def need(*keys: str, kind: type = dict, what: str = "an object", optional: bool = False):
        """raw[keys[0]][keys[1]]... if it is a `kind` (None if absent and `optional`); else a
        ManifestError naming the dotted key."""
        value = raw
        for depth, key in enumerate(keys):
            if value is None:       # a missing parent: reported below as the missing key
                break
            if not isinstance(value, dict):
                raise ManifestError(f"{path}: {'.'.join(keys[:depth])!r} should be an object: rerun {rerun}")
            value = value.get(key)
        if value is None and optional:
            return None
        if value is None:
            raise ManifestError(f"{path} lacks {'.'.join(keys)!r}: rerun {rerun}")
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ManifestError(f"{path}: {'.'.join(keys)!r} should be {what}, not {value!r}: rerun {rerun}")
        return value

    def listed(*keys: str, arch: str, adapter: bool = False, optional: bool = False) -> Path | None:
        """The file named at `keys`, which must exist and be a whole GGUF of `arch` (check_gguf)."""
        name = need(*keys, kind=str, what="a file name", optional=optional)
        if name is None:
            return None
        where = f"(listed in {MANIFEST_FILE} as {'.'.join(keys)!r})"
        if not (folder / name).is_file():
            raise ManifestError(f"{folder / name} is missing {where}: rerun {rerun}")
        try:
            check_gguf(folder / name, arch, adapter=adapter)
        except GGUFFileError as e:
            raise ManifestError(f"{folder / name} {where} {e.problem}: rerun {rerun}") from None
        return folder / name

    files, placeholders = ManifestKey.FILES, ManifestKey.PLACEHOLDERS
    backbone = listed(files, FileKey.BACKBONE, arch=Arch.DECODER)
    loras = {name: listed(files, FileKey.LORA, name, arch=Arch.DECODER, adapter=True)
             for name in need(files, FileKey.LORA, optional=True) or {}}
    # The encoders are optional; the one present needs the id of the placeholder its rows replace.
    vision_encoder = listed(files, FileKey.VISION_ENCODER, arch=Arch.VISION, optional=True)
    audio_encoder = listed(files, FileKey.AUDIO_ENCODER, arch=Arch.AUDIO, optional=True)
    needed = [kind for kind, encoder in ((IMAGE, vision_encoder), (AUDIO, audio_encoder)) if encoder is not None]
    placeholder_ids = {kind: need(placeholders, kind, PlaceholderKey.ID, kind=int, what="a token id")
                       for kind in dict.fromkeys([*need(placeholders), *needed])}
    return Manifest(folder=folder, backbone=backbone, loras=loras, vision_encoder=vision_encoder,
                    audio_encoder=audio_encoder, placeholder_ids=placeholder_ids,
                    outtype=need(ManifestKey.OUTTYPE, kind=str, what="a string"), raw=raw)


# -- GGUF: architectures and metadata keys -------------------------------------------------------------

class Arch:
    """`general.architecture` of each GGUF of the folder."""
    DECODER = "phi3"               # llama.cpp's (gguf-py MODEL_ARCH.PHI3): backbone.gguf and the LoRAs
    VISION = "phi4mm-vision"       # vision-encoder.gguf
    AUDIO = "phi4mm-audio"         # audio-encoder.gguf


def arch_key(arch: str, key: str) -> str:
    """Where an architecture's metadata `key` is stored: `phi4mm-vision` + `block_count` ->
    `phi4mm-vision.block_count`. The keys below are given without this prefix."""
    return f"{arch}.{key}"


# Keys every GGUF of the folder has (gguf-py's Keys.General).
GENERAL_ARCHITECTURE = "general.architecture"
GENERAL_TYPE = "general.type"              # ADAPTER_TYPE in the LoRA files
GENERAL_ALIGNMENT = "general.alignment"    # optional, u32; 32 when absent
ADAPTER_TYPE = "adapter"


# -- GGUF: is a file whole? -----------------------------------------------------------------------
#
# llama.cpp can abort the process on a truncated or corrupt file, and numpy fails with "cannot
# reshape array", so every GGUF is checked before anything opens it. The check reads the header
# only (through mmap: the pages of tensor data are never touched), and does it with a loop of its
# own rather than gguf.GGUFReader, which decodes every metadata array element by element: the
# decoder's 200k-token vocabulary and merges take it tens of seconds; skipping them here takes
# a fraction of one.

class GGUFFileError(ManifestError):
    """A GGUF that cannot be used: empty, truncated, corrupt, or another architecture. `problem`
    is the message without the file's name (`str()` is both)."""

    def __init__(self, path: str | os.PathLike, problem: str, fix: str = ""):
        self.path, self.problem = Path(path), problem
        super().__init__(f"{path} {problem}" + (f": {fix}" if fix else ""))


@dataclass(frozen=True)
class GGUFHeader:
    """What `read_gguf_header` learnt from a GGUF whose every tensor lies inside the file."""
    path: Path
    version: int
    architecture: str | None     # general.architecture
    type: str | None             # general.type
    tensor_count: int
    size: int                    # bytes


_U32, _U64 = struct.Struct("<I"), struct.Struct("<Q")
_GGML_MAX_DIMS = 4


class _Cut(Exception):
    """The header runs past the end of the file."""


class _Header:
    """A cursor over the header of an mmap'ed GGUF (little-endian, versions 2 and 3)."""

    def __init__(self, data: mmap.mmap, size: int):
        import gguf   # here, not at the top: it costs most of a second to import

        self.data, self.size, self.pos = data, size, 0
        V = gguf.GGUFValueType
        self.STRING, self.ARRAY = V.STRING, V.ARRAY
        self.scalar_size = {V.UINT8: 1, V.INT8: 1, V.BOOL: 1, V.UINT16: 2, V.INT16: 2, V.UINT32: 4,
                            V.INT32: 4, V.FLOAT32: 4, V.UINT64: 8, V.INT64: 8, V.FLOAT64: 8}
        self.quant_sizes = gguf.GGML_QUANT_SIZES   # type -> (block size, bytes per block)
        self.alignment = gguf.GGUF_DEFAULT_ALIGNMENT

    def take(self, n: int) -> int:
        start = self.pos
        if start + n > self.size:
            raise _Cut
        self.pos = start + n
        return start

    def u32(self) -> int:
        return _U32.unpack_from(self.data, self.take(4))[0]

    def u64(self) -> int:
        return _U64.unpack_from(self.data, self.take(8))[0]

    def string(self) -> bytes:
        n = self.u64()
        start = self.take(n)
        return self.data[start:start + n]

    def skip(self, kind: int) -> None:
        """Step over one value of GGUFValueType `kind`."""
        if kind in self.scalar_size:
            self.take(self.scalar_size[kind])
        elif kind == self.STRING:
            self.take(self.u64())
        elif kind == self.ARRAY:
            item, count = self.u32(), self.u64()
            if item in self.scalar_size:
                self.take(count * self.scalar_size[item])
            elif item == self.STRING:   # the vocabulary: 200k of them, so the loop is kept tight
                data, size, pos, unpack = self.data, self.size, self.pos, _U64.unpack_from
                for _ in range(count):
                    if pos + 8 > size:
                        raise _Cut
                    pos += 8 + unpack(data, pos)[0]
                if pos > size:
                    raise _Cut
                self.pos = pos
            elif item == self.ARRAY:
                for _ in range(count):
                    self.skip(self.ARRAY)
            else:
                raise ValueError(f"an array of unknown value type {item}")
        else:
            raise ValueError(f"a value of unknown type {kind}")


def read_gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Parse `path`'s GGUF header and check that every tensor's data lies within the file. Reads
    no tensor data. Raises GGUFFileError naming the file and what is wrong with it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size == 0:
            raise GGUFFileError(path, "is empty")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _read_header(path, data, size)
    except OSError as e:
        raise GGUFFileError(path, f"cannot be read ({e.strerror or e})") from None


def _read_header(path: Path, data: mmap.mmap, size: int) -> GGUFHeader:
    h = _Header(data, size)
    magic = bytes(data[:4])
    if magic != b"GGUF":
        raise GGUFFileError(path, f"is not a GGUF file (it begins with {magic!r}, not b'GGUF')")
    try:
        h.take(4)
        version = h.u32()
        if version & 0xFFFF == 0:
            raise GGUFFileError(path, "is a big-endian GGUF, which this machine cannot load")
        if version not in (2, 3):
            raise GGUFFileError(path, f"is GGUF version {version}; versions 2 and 3 are read")
        tensor_count, kv_count = h.u64(), h.u64()
        wanted = {GENERAL_ARCHITECTURE: h.STRING, GENERAL_TYPE: h.STRING}
        found: dict[str, object] = {}
        for _ in range(kv_count):
            key = h.string().decode("utf-8")
            kind = h.u32()
            if wanted.get(key) == kind:
                found[key] = h.string().decode("utf-8")
            elif key == GENERAL_ALIGNMENT and kind == 4:   # GGUFValueType.UINT32
                h.alignment = h.u32()
                if h.alignment == 0 or h.alignment & (h.alignment - 1):
                    raise ValueError(f"{GENERAL_ALIGNMENT} {h.alignment} is not a power of two")
            else:
                h.skip(kind)
        tensors = []
        for _ in range(tensor_count):
            name = h.string().decode("utf-8")
            n_dims = h.u32()
            if not 1 <= n_dims <= _GGML_MAX_DIMS:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
            dims = [h.u64() for _ in range(n_dims)]
            kind, offset = h.u32(), h.u64()
            if kind not in h.quant_sizes:
                raise ValueError(f"tensor {name!r} has unknown type {kind}")
            block, block_bytes = h.quant_sizes[kind]
            if dims[0] % block:
                raise ValueError(f"tensor {name!r}: {dims[0]} values per row do not fill blocks of {block}")
            n = 1
            for d in dims:
                n *= d
            tensors.append((name, offset, n // block * block_bytes))
    except _Cut:
        raise GGUFFileError(path, f"is truncated or corrupt: its header runs past the end of the file "
                                  f"({size} bytes)") from None
    except GGUFFileError:
        raise
    except (ValueError, RecursionError) as e:   # UnicodeDecodeError included; arrays nested without end
        raise GGUFFileError(path, f"is corrupt: {e}") from None
    start = -(-h.pos // h.alignment) * h.alignment    # tensor data begins at the next aligned offset
    for name, offset, nbytes in tensors:
        if offset % h.alignment:
            raise GGUFFileError(path, f"is corrupt: tensor {name!r} is not aligned to {h.alignment} bytes")
        if start + offset + nbytes > size:
            raise GGUFFileError(path, f"is truncated: tensor {name!r} ends at byte {start + offset + nbytes}, "
                                      f"but the file has {size} bytes")
    return GGUFHeader(path=path, version=version, architecture=found.get(GENERAL_ARCHITECTURE),
                      type=found.get(GENERAL_TYPE), tensor_count=len(tensors), size=size)


def check_gguf(path: str | os.PathLike, arch: str, adapter: bool = False) -> GGUFHeader:
    """`read_gguf_header`, and the file is of architecture `arch` (an Arch) and a LoRA adapter
    (general.type = adapter) exactly when `adapter`. Raises GGUFFileError."""
    header = read_gguf_header(path)
    if header.architecture != arch:
        raise GGUFFileError(path, f"has {GENERAL_ARCHITECTURE} {header.architecture!r}, not {arch!r}")
    if adapter and header.type != ADAPTER_TYPE:
        raise GGUFFileError(path, f"is not a LoRA adapter ({GENERAL_TYPE} is {header.type!r}, not "
                                  f"{ADAPTER_TYPE!r})")
    if not adapter and header.type == ADAPTER_TYPE:
        raise GGUFFileError(path, f"is a LoRA adapter ({GENERAL_TYPE} {ADAPTER_TYPE!r}), not a model")
    return header


class VisionKey:
    """Metadata of vision-encoder.gguf (C = tower width, D = decoder width)."""
    EMBEDDING_LENGTH = "embedding_length"                  # C
    FEED_FORWARD_LENGTH = "feed_forward_length"            # tower MLP width
    HEAD_COUNT = "attention.head_count"
    LAYER_NORM_EPS = "attention.layer_norm_epsilon"
    BLOCK_COUNT = "block_count"                            # blocks stored = blocks run
    SOURCE_BLOCK_COUNT = "source_block_count"              # blocks of the original tower
    FEATURE_LAYER = "feature_layer"                        # hidden_states index the features come from
    HIDDEN_ACT = "hidden_act"                              # tower MLP activation
    NUM_CHANNELS = "num_channels"
    IMAGE_SIZE = "image_size"                              # tower input; positions = (image_size/patch)^2
    PATCH_SIZE = "patch_size"
    CROP_SIZE = "crop_size"                                # HD crop side in pixels
    DYNAMIC_HD = "dynamic_hd"                              # default max crops per image
    IMAGE_MEAN = "image_mean"
    IMAGE_STD = "image_std"
    TOKEN_COMPRESSION = "token_compression"
    HD_TRANSFORM_ORDER = "hd_transform_order"
    PROJECTOR_EMBEDDING_LENGTH = "projector.embedding_length"  # D
    PROJECTOR_HIDDEN_ACT = "projector.hidden_act"


# The one vision layout model/ implements (docs/model.md, "Vision encoder"): the converter writes
# these values and the encoder refuses a file with others instead of misreading it.
VISION_LAYOUT = {
    VisionKey.TOKEN_COMPRESSION: "avg_pool_2d",     # 2x2 average pool of the patch grid
    VisionKey.HD_TRANSFORM_ORDER: "sub_glb",        # sub-image rows, glb_sep, global rows
    VisionKey.PROJECTOR_HIDDEN_ACT: "gelu",         # exact erf GELU between mm.up and mm.down
}


class AudioKey:
    """Metadata of audio-encoder.gguf (H = conformer width)."""
    EMBEDDING_LENGTH = "embedding_length"                  # H
    FEED_FORWARD_LENGTH = "feed_forward_length"
    BLOCK_COUNT = "block_count"
    HEAD_COUNT = "attention.head_count"
    HEAD_DIM = "attention.head_dim"
    LAYER_NORM_EPS = "attention.layer_norm_epsilon"
    BIAS_MAX_DISTANCE = "attention.bias_max_distance"      # relative-position bias range
    BIAS_SYMMETRIC = "attention.bias_symmetric"
    WINDOW_FRAMES = "attention.window_frames"              # longer inputs attend in windows of this size
    ACTIVATION_FFN = "activation.ffn"
    ACTIVATION_CONV = "activation.conv"
    ACTIVATION_GLU = "activation.glu"
    CONV_KERNEL_SIZE = "conv.kernel_size"
    CONV_DEPTHWISE_MULTIPLIER = "conv.depthwise_multiplier"
    CONV_GLU_CHANNELS = "conv.glu_channels"
    CONV_DEPTHWISE_OUT_CHANNELS = "conv.depthwise_out_channels"
    SUBSAMPLING_TIME_REDUCTION = "subsampling.time_reduction"
    SUBSAMPLING_CONV_CHANNELS = "subsampling.conv_channels"
    SUBSAMPLING_FINAL_FREQ = "subsampling.final_freq"      # mel bins left after the strided convolutions
    SUBSAMPLING_ACTIVATION = "subsampling.activation"
    INPUT_SIZE = "input_size"                              # mel bins in
    DOWNSAMPLE_RATE = "downsample_rate"
    PROJECTION_DIM = "projection_dim"                      # decoder width
    AUDIO_TOKEN_ID = "audio_token_id"
    # the log-mel front end (model/audio_features.py)
    FE_SAMPLE_RATE = "fe.sample_rate"
    FE_N_MELS = "fe.n_mels"
    FE_WIN_LENGTH = "fe.win_length"
    FE_HOP_LENGTH = "fe.hop_length"
    FE_N_FFT = "fe.n_fft"
    FE_WINDOW = "fe.window"
    FE_PREEMPHASIS = "fe.preemphasis"
    FE_PCM_SCALE = "fe.pcm_scale"
    FE_LOG_FLOOR = "fe.log_floor"
    FE_MEL_SCALE = "fe.mel_scale"
    FE_MEL_MIN_HZ = "fe.mel_min_hz"
    FE_MEL_MAX_HZ = "fe.mel_max_hz"
    FE_COMPRESSION_RATE = "fe.compression_rate"
    FE_DOWNSAMPLE_RATE = "fe.downsample_rate"
    FE_FEAT_STRIDE = "fe.feat_stride"


# -- GGUF: encoder tensor names --------------------------------------------------------------------
#
# Module names, as gguf-py's TENSOR_NAMES: a module's tensors are `<name>.weight` and `<name>.bias`
# unless noted. Placeholders: {bid} block, {i} subsampling layer, {side} in|out, {mode} AUDIO_MODES.
# Shapes are numpy's (PyTorch's) order.

class VisionTensor:
    """Tensors of vision-encoder.gguf (C tower width, F tower MLP width, D decoder width, P patch, S image)."""
    PATCH_EMBD = "v.patch_embd"                # (C, 3, P, P), (C,)
    POSITION_EMBD = "v.position_embd"          # .weight only: ((S/P)^2, C)
    BLK_LN1 = "v.blk.{bid}.ln1"
    BLK_ATTN_Q = "v.blk.{bid}.attn_q"          # (C, C), (C,)
    BLK_ATTN_K = "v.blk.{bid}.attn_k"
    BLK_ATTN_V = "v.blk.{bid}.attn_v"
    BLK_ATTN_OUT = "v.blk.{bid}.attn_out"
    BLK_LN2 = "v.blk.{bid}.ln2"
    BLK_FFN_UP = "v.blk.{bid}.ffn_up"          # (F, C), (F,)
    BLK_FFN_DOWN = "v.blk.{bid}.ffn_down"      # (C, F), (C,)
    SUB_SEP = "v.sub_sep"                      # a tensor itself: (C,), after every row of tokens
    GLB_SEP = "v.glb_sep"                      # a tensor itself: (C,), between sub-image and global view
    MM_UP = "mm.up"                            # (D, C), (D,)
    MM_DOWN = "mm.down"                        # (D, D), (D,)


# The audio projectors: "speech" when the prompt holds audio only, "vision" when it holds an image
# too (docs/model.md, "Speech encoder").
AUDIO_MODES = ("speech", "vision")


class AudioTensor:
    """Tensors of audio-encoder.gguf (H width, I FFN width, C subsampling channels, F' final mel bins,
    E GLU channels, D depthwise-separable channels, m depthwise multiplier, K kernel, P decoder width)."""
    CMVN_MEAN = "cmvn.mean"                    # a tensor itself: (n_mels,)
    CMVN_INVSTD = "cmvn.invstd"                # a tensor itself: (n_mels,)
    SUB_CONV0 = "sub.conv0"                    # (C, 1, 3, 3)
    SUB_DW = "sub.{i}.dw"                      # (C, 1, 3, 3) depthwise; i = 1 .. log2(time_reduction) - 1
    SUB_PW = "sub.{i}.pw"                      # (C, C)
    SUB_OUT = "sub.out"                        # (H, C * F'), input index c * F' + f
    REL_BIAS = "rel_bias"                      # .weight only: (buckets, heads)
    BLK_FFN_NORM = "blk.{bid}.ffn_{side}.norm"
    BLK_FFN_UP = "blk.{bid}.ffn_{side}.up"     # (2I, H): rows [value | gate]
    BLK_FFN_DOWN = "blk.{bid}.ffn_{side}.down"  # (H, I)
    BLK_ATTN_NORM = "blk.{bid}.attn_norm"
    BLK_ATTN_Q = "blk.{bid}.attn.q"            # (H, H)
    BLK_ATTN_K = "blk.{bid}.attn.k"
    BLK_ATTN_V = "blk.{bid}.attn.v"
    BLK_ATTN_O = "blk.{bid}.attn.o"
    BLK_CONV_NORM = "blk.{bid}.conv.norm"
    BLK_CONV_GLU = "blk.{bid}.conv.glu"        # (2E, H)
    BLK_CONV_GLU_B1 = "blk.{bid}.conv.glu_b1"  # a tensor itself: (E,)
    BLK_CONV_GLU_B2 = "blk.{bid}.conv.glu_b2"  # a tensor itself: (E,)
    BLK_CONV_DW = "blk.{bid}.conv.dw"          # (H*m, K) depthwise
    BLK_CONV_PW = "blk.{bid}.conv.pw"          # (D, H*m)
    BLK_CONV_OUT = "blk.{bid}.conv.out"        # (E, D)
    BLK_NORM = "blk.{bid}.norm"
    PROJ_UP = "proj.{mode}.up"                 # (P, H)
    PROJ_DOWN = "proj.{mode}.down"             # (P, P)
    MEL_FILTERS = "fe.mel_filters"             # a tensor itself: (n_freq * n_mels,), row-major (n_freq, n_mels)
