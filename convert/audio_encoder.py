"""Write the speech encoder (conformer + both audio projectors + log-mel front end) as one GGUF.

Input: the transformers-native audio tensors with the prefix `model.embed_tokens_extend.audio_embed.`
stripped (docs/model.md, "Checkpoint layouts"), and the native `audio_config` dict. No torch, no transformers.

`tensors` maps each native name to either a numpy array or a pair `(shape, loader)` where
`loader()` returns the array; pairs let a large checkpoint be streamed one tensor at a time:

    {name[len(AUDIO_PREFIX):]: (ckpt.shape(name), lambda n=name: ckpt.load(name))
     for name in ckpt.names_with_prefix(AUDIO_PREFIX)}

The file's names, stored shapes and metadata keys are those of model/format.py (`Arch.AUDIO`,
`AudioTensor`, `AudioKey`); `tensor_map` maps the native names onto them:

    native name (audio_embed.*)                              GGUF name (AudioTensor)    stored from
    encoder.encoder_embedding.global_mean / global_invstd    CMVN_MEAN / CMVN_INVSTD
    encoder.embed.conv.0                                     SUB_CONV0
    encoder.embed.conv.{3i-1}                 (i = 1..n-1)   SUB_DW {i}
    encoder.embed.conv.{3i}                                  SUB_PW {i}                 (C, C, 1, 1)
    encoder.embed.out                                        SUB_OUT
    encoder.relative_attention_bias_layer.bias_values        REL_BIAS
    encoder.encoders.{k}.feed_forward_{in,out}.layer_norm    BLK_FFN_NORM {k} {side}
    encoder.encoders.{k}.feed_forward_{in,out}.gate_up_proj  BLK_FFN_UP
    encoder.encoders.{k}.feed_forward_{in,out}.down_proj     BLK_FFN_DOWN
    encoder.encoders.{k}.layer_norm_att                      BLK_ATTN_NORM
    encoder.encoders.{k}.self_attn.{q,k,v,o}_proj            BLK_ATTN_{Q,K,V,O}
    encoder.encoders.{k}.conv.layer_norm                     BLK_CONV_NORM
    encoder.encoders.{k}.conv.glu.ext_pw_conv_1d             BLK_CONV_GLU               (2E, H, 1)
    encoder.encoders.{k}.conv.glu.b1 / b2                    BLK_CONV_GLU_B1 / _B2      (1, E, 1)
    encoder.encoders.{k}.conv.dw_sep_conv_1d.dw_conv         BLK_CONV_DW                (H*m, 1, K)
    encoder.encoders.{k}.conv.dw_sep_conv_1d.pw_conv         BLK_CONV_PW                (D, H*m, 1)
    encoder.encoders.{k}.conv.ext_pw_conv_1d                 BLK_CONV_OUT               (E, D, 1)
    encoder.encoders.{k}.layer_norm                          BLK_NORM
    up_proj_for_speech / down_proj_for_speech                PROJ_UP / PROJ_DOWN "speech"
    up_proj_for_vision_speech / down_proj_for_vision_speech  PROJ_UP / PROJ_DOWN "vision"
    (computed here)                                          MEL_FILTERS

`fe.mel_filters` is the (n_fft//2+1, n_mels) bank of transformers' Phi4MultimodalFeatureExtractor
flattened row-major; it is stored 1-D so that it stays float32 in bf16 files (the shared writer keeps
1-D tensors f32). The metadata is listed in `_metadata`.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from convert.gguf_out import TensorSource, metadata_writer, write_gguf
from model.format import ENCODER_STORAGE_TYPES, Arch, AudioKey, AudioTensor, arch_key

ARCH = Arch.AUDIO

# transformers' default feature-extractor settings = the real model's preprocessor config
# (docs/model.md, "Speech encoder").
FEATURE_DEFAULTS: dict[str, Any] = {
    "sampling_rate": 16000, "feature_size": 80, "win_length": 400, "hop_length": 160, "n_fft": 512,
    "preemphasis": 0.97, "mel_min_frequency": 0.0, "mel_max_frequency": 7690.0,
    "audio_compression_rate": 8, "audio_downsample_rate": 1, "audio_feat_stride": 1,
}

# Phi4MultimodalAudioConfig defaults, for keys a translated original config leaves out (or sets None).
AUDIO_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1024, "intermediate_size": 1536, "num_blocks": 24, "num_attention_heads": 16,
    "activation": "swish", "chunk_size": -1, "left_chunk": 18, "ext_pw_out_channel": 1024,
    "depthwise_separable_out_channel": 1024, "depthwise_multiplier": 1, "kernel_size": 3,
    "conv_activation": "swish", "input_size": 80, "conv_glu_type": "swish", "time_reduction": 8,
    "bias_max_distance": 1000, "bias_symmetric": False, "nemo_activation": "relu",
    "nemo_conv_channels": 1024, "downsample_rate": 1, "audio_token_id": 200011,
}

# transformers' Phi4MultimodalAudioModel.forward splits sequences longer than this many
# subsampled frames into independent windows (a constant in its code, not a config field).
WINDOW_FRAMES = 500
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm default, used by every norm of the conformer
ACTIVATIONS = ("swish", "silu", "relu", "gelu")

Tensor = np.ndarray | tuple[tuple[int, ...], Callable[[], np.ndarray]]


class AudioEncoderError(ValueError):
    """The audio weights or config cannot be written as a speech-encoder GGUF; the message says why."""


# -- mel filter bank ------------------------------------------------------------------------------

def _hz_to_mel_kaldi(hz):
    return 1127.0 * np.log(1.0 + (hz / 700.0))


def mel_filter_bank(n_fft: int, n_mels: int, sample_rate: int, f_min: float, f_max: float) -> np.ndarray:
    """(n_fft//2 + 1, n_mels) float64, bit-identical to transformers' `Phi4MultimodalFeatureExtractor.mel_filters`.

    That is `audio_utils.mel_filter_bank(..., triangularize_in_mel_space=True, mel_scale="kaldi")`:
    triangles in kaldi-mel space, no normalization. It differs from the original SpeechLib bank in one
    entry (bin 246, filter 79 is 0.0097 here, 0 there; docs/model.md, "Speech encoder"); we follow transformers.
    """
    n_freq = n_fft // 2 + 1
    mel_freqs = np.linspace(_hz_to_mel_kaldi(f_min), _hz_to_mel_kaldi(f_max), n_mels + 2)  # filter edges/centers
    bin_width = sample_rate / ((n_freq - 1) * 2)
    fft_mels = _hz_to_mel_kaldi(bin_width * np.arange(n_freq))                           # (n_freq,)
    filter_diff = np.diff(mel_freqs)
    slopes = np.expand_dims(mel_freqs, 0) - np.expand_dims(fft_mels, 1)                  # (n_freq, n_mels + 2)
    down = -slopes[:, :-2] / filter_diff[:-1]
    up = slopes[:, 2:] / filter_diff[1:]
    return np.maximum(np.zeros(1), np.minimum(down, up))


# -- config ---------------------------------------------------------------------------------------

def _audio_config(audio_config: Mapping[str, Any]) -> dict[str, Any]:
    cfg = dict(AUDIO_DEFAULTS)
    cfg.update({k: v for k, v in audio_config.items() if v is not None})
    for key in ("activation", "conv_activation", "conv_glu_type", "nemo_activation"):
        if cfg[key] not in ACTIVATIONS:
            raise AudioEncoderError(f"audio_config.{key} = {cfg[key]!r} is not supported (one of {ACTIVATIONS})")
    if int(cfg["chunk_size"]) > 0:
        raise AudioEncoderError(f"audio_config.chunk_size = {cfg['chunk_size']}: only full attention "
                                f"(chunk_size <= 0, as in Phi-4-multimodal) is supported")
    tr = int(cfg["time_reduction"])
    if tr < 2 or tr & (tr - 1):
        raise AudioEncoderError(f"audio_config.time_reduction = {tr}: must be a power of two >= 2")
    h = int(cfg["hidden_size"])
    if int(cfg["ext_pw_out_channel"]) != h or int(cfg["depthwise_separable_out_channel"]) != h:
        raise AudioEncoderError(f"ext_pw_out_channel ({cfg['ext_pw_out_channel']}) and depthwise_separable_out_channel "
                                f"({cfg['depthwise_separable_out_channel']}) must equal hidden_size ({h})")
    if int(cfg["downsample_rate"]) != 1:
        raise AudioEncoderError(f"audio_config.downsample_rate = {cfg['downsample_rate']}: only 1 is supported "
                                f"(transformers' projector cannot run with another value either)")
    if h % int(cfg["num_attention_heads"]):
        raise AudioEncoderError(f"hidden_size {h} is not a multiple of "
                                f"num_attention_heads {cfg['num_attention_heads']}")
    return cfg


def _feature_config(feature_config: Mapping[str, Any] | None) -> dict[str, Any]:
    fe = dict(FEATURE_DEFAULTS)
    fe.update({k: v for k, v in (feature_config or {}).items() if k in FEATURE_DEFAULTS and v is not None})
    return fe


def _freq_after_subsampling(n_mels: int, time_reduction: int) -> int:
    f = n_mels
    for _ in range(int(math.log2(time_reduction))):
        f = (f - 1) // 2 + 1  # Conv2d(k=3, s=2, p=1)
    return f


def _metadata(cfg: dict[str, Any], fe: dict[str, Any], proj_dim: int) -> dict[str, Any]:
    h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    values = {
        AudioKey.EMBEDDING_LENGTH: h,
        AudioKey.FEED_FORWARD_LENGTH: int(cfg["intermediate_size"]),
        AudioKey.BLOCK_COUNT: int(cfg["num_blocks"]),
        AudioKey.HEAD_COUNT: heads,
        AudioKey.HEAD_DIM: h // heads,
        AudioKey.LAYER_NORM_EPS: LAYER_NORM_EPS,
        AudioKey.BIAS_MAX_DISTANCE: int(cfg["bias_max_distance"]),
        AudioKey.BIAS_SYMMETRIC: bool(cfg["bias_symmetric"]),
        AudioKey.WINDOW_FRAMES: WINDOW_FRAMES,
        AudioKey.ACTIVATION_FFN: str(cfg["activation"]),
        AudioKey.ACTIVATION_CONV: str(cfg["conv_activation"]),
        AudioKey.ACTIVATION_GLU: str(cfg["conv_glu_type"]),
        AudioKey.CONV_KERNEL_SIZE: int(cfg["kernel_size"]),
        AudioKey.CONV_DEPTHWISE_MULTIPLIER: int(cfg["depthwise_multiplier"]),
        AudioKey.CONV_GLU_CHANNELS: int(cfg["ext_pw_out_channel"]),
        AudioKey.CONV_DEPTHWISE_OUT_CHANNELS: int(cfg["depthwise_separable_out_channel"]),
        AudioKey.SUBSAMPLING_TIME_REDUCTION: int(cfg["time_reduction"]),
        AudioKey.SUBSAMPLING_CONV_CHANNELS: int(cfg["nemo_conv_channels"]),
        AudioKey.SUBSAMPLING_FINAL_FREQ: _freq_after_subsampling(int(cfg["input_size"]), int(cfg["time_reduction"])),
        AudioKey.SUBSAMPLING_ACTIVATION: str(cfg["nemo_activation"]),
        AudioKey.INPUT_SIZE: int(cfg["input_size"]),
        AudioKey.DOWNSAMPLE_RATE: int(cfg["downsample_rate"]),
        AudioKey.PROJECTION_DIM: int(proj_dim),
        AudioKey.AUDIO_TOKEN_ID: int(cfg["audio_token_id"]),
        AudioKey.FE_SAMPLE_RATE: int(fe["sampling_rate"]),
        AudioKey.FE_N_MELS: int(fe["feature_size"]),
        AudioKey.FE_WIN_LENGTH: int(fe["win_length"]),
        AudioKey.FE_HOP_LENGTH: int(fe["hop_length"]),
        AudioKey.FE_N_FFT: int(fe["n_fft"]),
        AudioKey.FE_WINDOW: "hamming",          # symmetric (periodic=False), float64 in the reference
        AudioKey.FE_PREEMPHASIS: float(fe["preemphasis"]),
        AudioKey.FE_PCM_SCALE: 32768.0,         # frames are scaled to int16 range after pre-emphasis
        AudioKey.FE_LOG_FLOOR: 1.0,             # log(max(mel_power, 1.0))
        AudioKey.FE_MEL_SCALE: "kaldi",
        AudioKey.FE_MEL_MIN_HZ: float(fe["mel_min_frequency"]),
        AudioKey.FE_MEL_MAX_HZ: float(fe["mel_max_frequency"]),
        AudioKey.FE_COMPRESSION_RATE: int(fe["audio_compression_rate"]),
        AudioKey.FE_DOWNSAMPLE_RATE: int(fe["audio_downsample_rate"]),
        AudioKey.FE_FEAT_STRIDE: int(fe["audio_feat_stride"]),
    }
    return {"general.name": "Phi-4-multimodal speech encoder",
            **{arch_key(ARCH, key): value for key, value in values.items()}}


# -- names ----------------------------------------------------------------------------------------

def tensor_map(num_blocks: int, time_reduction: int) -> list[tuple[str, str, int | None]]:
    """(native name, GGUF name, rank to squeeze to or None) for every tensor the GGUF holds."""
    T = AudioTensor
    rows: list[tuple[str, str, int | None]] = [
        ("encoder.encoder_embedding.global_mean", T.CMVN_MEAN, None),
        ("encoder.encoder_embedding.global_invstd", T.CMVN_INVSTD, None),
    ]

    def module(native: str, gguf_name: str, squeeze: int | None = None) -> None:
        rows.append((f"{native}.weight", f"{gguf_name}.weight", squeeze))
        rows.append((f"{native}.bias", f"{gguf_name}.bias", None))

    module("encoder.embed.conv.0", T.SUB_CONV0)
    for i in range(1, int(math.log2(time_reduction))):
        module(f"encoder.embed.conv.{3 * i - 1}", T.SUB_DW.format(i=i))
        module(f"encoder.embed.conv.{3 * i}", T.SUB_PW.format(i=i), 2)
    module("encoder.embed.out", T.SUB_OUT)
    rows.append(("encoder.relative_attention_bias_layer.bias_values.weight", T.REL_BIAS + ".weight", None))
    for k in range(num_blocks):
        n = f"encoder.encoders.{k}"
        for side in ("in", "out"):
            module(f"{n}.feed_forward_{side}.layer_norm", T.BLK_FFN_NORM.format(bid=k, side=side))
            module(f"{n}.feed_forward_{side}.gate_up_proj", T.BLK_FFN_UP.format(bid=k, side=side))
            module(f"{n}.feed_forward_{side}.down_proj", T.BLK_FFN_DOWN.format(bid=k, side=side))
        module(f"{n}.layer_norm_att", T.BLK_ATTN_NORM.format(bid=k))
        for p, name in (("q", T.BLK_ATTN_Q), ("k", T.BLK_ATTN_K), ("v", T.BLK_ATTN_V), ("o", T.BLK_ATTN_O)):
            module(f"{n}.self_attn.{p}_proj", name.format(bid=k))
        module(f"{n}.conv.layer_norm", T.BLK_CONV_NORM.format(bid=k))
        module(f"{n}.conv.glu.ext_pw_conv_1d", T.BLK_CONV_GLU.format(bid=k), 2)
        rows.append((f"{n}.conv.glu.b1", T.BLK_CONV_GLU_B1.format(bid=k), 1))
        rows.append((f"{n}.conv.glu.b2", T.BLK_CONV_GLU_B2.format(bid=k), 1))
        module(f"{n}.conv.dw_sep_conv_1d.dw_conv", T.BLK_CONV_DW.format(bid=k), 2)
        module(f"{n}.conv.dw_sep_conv_1d.pw_conv", T.BLK_CONV_PW.format(bid=k), 2)
        module(f"{n}.conv.ext_pw_conv_1d", T.BLK_CONV_OUT.format(bid=k), 2)
        module(f"{n}.layer_norm", T.BLK_NORM.format(bid=k))
    for mode, native in (("speech", "speech"), ("vision", "vision_speech")):
        module(f"up_proj_for_{native}", T.PROJ_UP.format(mode=mode))
        module(f"down_proj_for_{native}", T.PROJ_DOWN.format(mode=mode))
    return rows


def _squeezed_shape(native: str, shape: tuple[int, ...], rank: int | None) -> tuple[int, ...]:
    if rank is None or len(shape) == rank:
        return shape
    kept = tuple(n for n in shape if n != 1)
    if native.endswith(".dw_sep_conv_1d.dw_conv.weight"):      # (H*m, 1, K): keep K even if it is 1
        kept = (shape[0], shape[-1])
    if len(kept) != rank or int(np.prod(kept)) != int(np.prod(shape)):
        raise AudioEncoderError(f"tensor {native}: cannot squeeze shape {shape} to rank {rank}")
    return kept


def _split(value: Tensor) -> tuple[tuple[int, ...], Callable[[], np.ndarray]]:
    if isinstance(value, np.ndarray):
        return tuple(value.shape), lambda: value
    shape, loader = value
    return tuple(int(n) for n in shape), loader


# -- writer ---------------------------------------------------------------------------------------

def write_audio_encoder(
    tensors: Mapping[str, Tensor],
    audio_config: Mapping[str, Any],
    path: str | os.PathLike,
    outtype: str = "f32",
    feature_config: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> Path:
    """Write the speech-encoder GGUF at `path`; returns the path.

    tensors: native names (prefix `model.embed_tokens_extend.audio_embed.` stripped) -> array or
        `(shape, loader)`. Every tensor of the map above must be present; extra names are an error.
    audio_config: the native `audio_config` dict of config.json (Phi4MultimodalAudioConfig fields);
        missing/None keys take transformers' defaults.
    feature_config: optional feature-extractor settings (preprocessor/processor config keys such as
        `sampling_rate`, `hop_length`, `mel_max_frequency`); transformers' defaults otherwise.
    outtype: one of ENCODER_STORAGE_TYPES (2-D+ weights in it; norms, biases, CMVN and the mel bank
        stay f32).
    """
    if outtype not in ENCODER_STORAGE_TYPES:
        raise AudioEncoderError(f"outtype {outtype!r}: the speech encoder is written as "
                                f"{' or '.join(ENCODER_STORAGE_TYPES)}")
    cfg = _audio_config(audio_config)
    fe = _feature_config(feature_config)
    if int(fe["feature_size"]) != int(cfg["input_size"]):
        raise AudioEncoderError(f"feature extractor makes {fe['feature_size']} mel bins but the encoder "
                                f"takes input_size {cfg['input_size']}")
    if int(fe["audio_compression_rate"]) != int(cfg["time_reduction"]):
        raise AudioEncoderError(f"audio_compression_rate {fe['audio_compression_rate']} != time_reduction "
                                f"{cfg['time_reduction']}: token counts would not match the encoder output")

    rows = tensor_map(int(cfg["num_blocks"]), int(cfg["time_reduction"]))
    expected = {native for native, _, _ in rows}
    missing = sorted(expected - set(tensors))
    extra = sorted(set(tensors) - expected)
    if missing:
        raise AudioEncoderError(f"{len(missing)} audio tensors missing, e.g. {missing[:5]} "
                                f"(audio_config says {cfg['num_blocks']} blocks)")
    if extra:
        raise AudioEncoderError(f"{len(extra)} unexpected audio tensors, e.g. {extra[:5]} "
                                f"(audio_config says {cfg['num_blocks']} blocks; "
                                f"names must be native, prefix stripped)")

    sources: list[TensorSource] = []
    for native, name, rank in rows:
        shape, loader = _split(tensors[native])
        stored = _squeezed_shape(native, shape, rank)
        sources.append(TensorSource(name, stored, lambda ld=loader, s=stored: np.asarray(ld()).reshape(s)))
    shapes = {s.name: s.shape for s in sources}

    # Shape checks that tie tensors to the config, so a mismatch fails here and not at inference.
    h, i_ff, heads = int(cfg["hidden_size"]), int(cfg["intermediate_size"]), int(cfg["num_attention_heads"])
    c, n_mels = int(cfg["nemo_conv_channels"]), int(cfg["input_size"])
    f_out = _freq_after_subsampling(n_mels, int(cfg["time_reduction"]))
    T = AudioTensor
    proj_dim = shapes[T.PROJ_UP.format(mode="speech") + ".weight"][0]
    buckets = int(cfg["bias_max_distance"]) * (1 if cfg["bias_symmetric"] else 2)
    want = {
        T.CMVN_MEAN: (n_mels,),
        T.SUB_CONV0 + ".weight": (c, 1, 3, 3),
        T.SUB_OUT + ".weight": (h, c * f_out),
        T.REL_BIAS + ".weight": (buckets, heads),
        T.BLK_FFN_UP.format(bid=0, side="in") + ".weight": (2 * i_ff, h),
        T.BLK_ATTN_Q.format(bid=0) + ".weight": (h, h),
        T.BLK_CONV_DW.format(bid=0) + ".weight": (h * int(cfg["depthwise_multiplier"]), int(cfg["kernel_size"])),
        T.PROJ_UP.format(mode="speech") + ".weight": (proj_dim, h),
        T.PROJ_DOWN.format(mode="vision") + ".weight": (proj_dim, proj_dim),
    }
    for name, shape in want.items():
        if shapes[name] != shape:
            raise AudioEncoderError(f"tensor {name} has shape {shapes[name]}, config implies {shape}")

    mel = mel_filter_bank(int(fe["n_fft"]), int(fe["feature_size"]), int(fe["sampling_rate"]),
                          float(fe["mel_min_frequency"]), float(fe["mel_max_frequency"]))
    sources.append(TensorSource(T.MEL_FILTERS, (mel.size,), lambda: mel.astype(np.float32).reshape(-1)))

    metadata = _metadata(cfg, fe, proj_dim)
    return write_gguf(path, ARCH, metadata_writer(metadata), sources, storage=outtype, progress=progress)
