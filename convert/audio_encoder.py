"""Write the speech encoder (conformer + both audio projectors + log-mel front end) as one GGUF.

Input: the transformers-native audio tensors with the prefix `model.embed_tokens_extend.audio_embed.`
stripped (phi4mm.md §2.2), and the native `audio_config` dict. No torch, no transformers.

`tensors` maps each native name to either a numpy array or a pair `(shape, loader)` where
`loader()` returns the array; pairs let a large checkpoint be streamed one tensor at a time:

    {name[len(AUDIO_PREFIX):]: (ckpt.shape(name), lambda n=name: ckpt.load(name))
     for name in ckpt.names_with_prefix(AUDIO_PREFIX)}

GGUF layout, arch `phi4mm-audio` (K = kernel size, C = nemo conv channels, H = encoder width,
E = ext_pw_out_channel, D = depthwise_separable_out_channel, m = depthwise_multiplier, P = text hidden):

    native name (audio_embed.*)                              GGUF name                  stored shape
    encoder.encoder_embedding.global_mean / global_invstd    cmvn.mean / cmvn.invstd    (n_mels,)
    encoder.embed.conv.0.{weight,bias}                       sub.conv0.{weight,bias}    (C, 1, 3, 3)
    encoder.embed.conv.{3i-1}.{weight,bias}   (i = 1..n-1)   sub.{i}.dw.{weight,bias}   (C, 1, 3, 3)  depthwise
    encoder.embed.conv.{3i}.{weight,bias}                    sub.{i}.pw.{weight,bias}   (C, C)        from (C, C, 1, 1)
    encoder.embed.out.{weight,bias}                          sub.out.{weight,bias}      (H, C * F)    in: c*F + f
    encoder.relative_attention_bias_layer.bias_values.weight rel_bias.weight            (buckets, heads)
    encoder.encoders.{k}.feed_forward_in.layer_norm          blk.{k}.ffn_in.norm
    encoder.encoders.{k}.feed_forward_in.gate_up_proj        blk.{k}.ffn_in.up          (2I, H)  rows [value | gate]
    encoder.encoders.{k}.feed_forward_in.down_proj           blk.{k}.ffn_in.down        (H, I)
    encoder.encoders.{k}.feed_forward_out.*                  blk.{k}.ffn_out.*          (same)
    encoder.encoders.{k}.layer_norm_att                      blk.{k}.attn_norm
    encoder.encoders.{k}.self_attn.{q,k,v,o}_proj            blk.{k}.attn.{q,k,v,o}
    encoder.encoders.{k}.conv.layer_norm                     blk.{k}.conv.norm
    encoder.encoders.{k}.conv.glu.ext_pw_conv_1d             blk.{k}.conv.glu           (2E, H)  from (2E, H, 1)
    encoder.encoders.{k}.conv.glu.b1 / b2                    blk.{k}.conv.glu_b1 / _b2  (E,)     from (1, E, 1)
    encoder.encoders.{k}.conv.dw_sep_conv_1d.dw_conv         blk.{k}.conv.dw            (H*m, K) from (H*m, 1, K)
    encoder.encoders.{k}.conv.dw_sep_conv_1d.pw_conv         blk.{k}.conv.pw            (D, H*m) from (D, H*m, 1)
    encoder.encoders.{k}.conv.ext_pw_conv_1d                 blk.{k}.conv.out           (E, D)   from (E, D, 1)
    encoder.encoders.{k}.layer_norm                          blk.{k}.norm
    up_proj_for_speech / down_proj_for_speech                proj.speech.up / .down     (P, H) / (P, P)
    up_proj_for_vision_speech / down_proj_for_vision_speech  proj.vision.up / .down     (P, H) / (P, P)
    (computed here)                                          fe.mel_filters             (n_freq * n_mels,)

Every module above has `.weight` and `.bias` unless its shape says otherwise. `fe.mel_filters`
is the (n_fft//2+1, n_mels) bank of transformers' Phi4MultimodalFeatureExtractor flattened
row-major; it is stored 1-D so that it stays float32 in f16 files (the shared writer keeps
1-D tensors f32). Metadata keys (all under `phi4mm-audio.`) are listed in `_metadata`.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from convert.gguf_out import TensorSource, metadata_writer, write_gguf

ARCH = "phi4mm-audio"

# transformers' default feature-extractor settings = the real model's preprocessor config (phi4mm.md §4.1).
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
    entry (bin 246, filter 79 is 0.0097 here, 0 there; phi4mm.md §4.1); we follow transformers.
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
    a = ARCH
    h, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    return {
        "general.name": "Phi-4-multimodal speech encoder",
        f"{a}.embedding_length": h,
        f"{a}.feed_forward_length": int(cfg["intermediate_size"]),
        f"{a}.block_count": int(cfg["num_blocks"]),
        f"{a}.attention.head_count": heads,
        f"{a}.attention.head_dim": h // heads,
        f"{a}.attention.layer_norm_epsilon": LAYER_NORM_EPS,
        f"{a}.attention.bias_max_distance": int(cfg["bias_max_distance"]),
        f"{a}.attention.bias_symmetric": bool(cfg["bias_symmetric"]),
        f"{a}.attention.window_frames": WINDOW_FRAMES,
        f"{a}.activation.ffn": str(cfg["activation"]),
        f"{a}.activation.conv": str(cfg["conv_activation"]),
        f"{a}.activation.glu": str(cfg["conv_glu_type"]),
        f"{a}.conv.kernel_size": int(cfg["kernel_size"]),
        f"{a}.conv.depthwise_multiplier": int(cfg["depthwise_multiplier"]),
        f"{a}.conv.glu_channels": int(cfg["ext_pw_out_channel"]),
        f"{a}.conv.depthwise_out_channels": int(cfg["depthwise_separable_out_channel"]),
        f"{a}.subsampling.time_reduction": int(cfg["time_reduction"]),
        f"{a}.subsampling.conv_channels": int(cfg["nemo_conv_channels"]),
        f"{a}.subsampling.final_freq": _freq_after_subsampling(int(cfg["input_size"]), int(cfg["time_reduction"])),
        f"{a}.subsampling.activation": str(cfg["nemo_activation"]),
        f"{a}.input_size": int(cfg["input_size"]),
        f"{a}.downsample_rate": int(cfg["downsample_rate"]),
        f"{a}.projection_dim": int(proj_dim),
        f"{a}.audio_token_id": int(cfg["audio_token_id"]),
        f"{a}.fe.sample_rate": int(fe["sampling_rate"]),
        f"{a}.fe.n_mels": int(fe["feature_size"]),
        f"{a}.fe.win_length": int(fe["win_length"]),
        f"{a}.fe.hop_length": int(fe["hop_length"]),
        f"{a}.fe.n_fft": int(fe["n_fft"]),
        f"{a}.fe.window": "hamming",          # symmetric (periodic=False), float64 in the reference
        f"{a}.fe.preemphasis": float(fe["preemphasis"]),
        f"{a}.fe.pcm_scale": 32768.0,         # frames are scaled to int16 range after pre-emphasis
        f"{a}.fe.log_floor": 1.0,             # log(max(mel_power, 1.0))
        f"{a}.fe.mel_scale": "kaldi",
        f"{a}.fe.mel_min_hz": float(fe["mel_min_frequency"]),
        f"{a}.fe.mel_max_hz": float(fe["mel_max_frequency"]),
        f"{a}.fe.compression_rate": int(fe["audio_compression_rate"]),
        f"{a}.fe.downsample_rate": int(fe["audio_downsample_rate"]),
        f"{a}.fe.feat_stride": int(fe["audio_feat_stride"]),
    }


# -- names ----------------------------------------------------------------------------------------

def tensor_map(num_blocks: int, time_reduction: int) -> list[tuple[str, str, int | None]]:
    """(native name, GGUF name, rank to squeeze to or None) for every tensor the GGUF holds."""
    rows: list[tuple[str, str, int | None]] = [
        ("encoder.encoder_embedding.global_mean", "cmvn.mean", None),
        ("encoder.encoder_embedding.global_invstd", "cmvn.invstd", None),
    ]

    def linear(native: str, gguf_name: str, squeeze: int | None = None) -> None:
        rows.append((f"{native}.weight", f"{gguf_name}.weight", squeeze))
        rows.append((f"{native}.bias", f"{gguf_name}.bias", None))

    linear("encoder.embed.conv.0", "sub.conv0")
    for i in range(1, int(math.log2(time_reduction))):
        linear(f"encoder.embed.conv.{3 * i - 1}", f"sub.{i}.dw")
        linear(f"encoder.embed.conv.{3 * i}", f"sub.{i}.pw", 2)
    linear("encoder.embed.out", "sub.out")
    rows.append(("encoder.relative_attention_bias_layer.bias_values.weight", "rel_bias.weight", None))
    for k in range(num_blocks):
        n, g = f"encoder.encoders.{k}", f"blk.{k}"
        for side in ("in", "out"):
            linear(f"{n}.feed_forward_{side}.layer_norm", f"{g}.ffn_{side}.norm")
            linear(f"{n}.feed_forward_{side}.gate_up_proj", f"{g}.ffn_{side}.up")
            linear(f"{n}.feed_forward_{side}.down_proj", f"{g}.ffn_{side}.down")
        linear(f"{n}.layer_norm_att", f"{g}.attn_norm")
        for p in ("q", "k", "v", "o"):
            linear(f"{n}.self_attn.{p}_proj", f"{g}.attn.{p}")
        linear(f"{n}.conv.layer_norm", f"{g}.conv.norm")
        linear(f"{n}.conv.glu.ext_pw_conv_1d", f"{g}.conv.glu", 2)
        rows.append((f"{n}.conv.glu.b1", f"{g}.conv.glu_b1", 1))
        rows.append((f"{n}.conv.glu.b2", f"{g}.conv.glu_b2", 1))
        linear(f"{n}.conv.dw_sep_conv_1d.dw_conv", f"{g}.conv.dw", 2)
        linear(f"{n}.conv.dw_sep_conv_1d.pw_conv", f"{g}.conv.pw", 2)
        linear(f"{n}.conv.ext_pw_conv_1d", f"{g}.conv.out", 2)
        linear(f"{n}.layer_norm", f"{g}.norm")
    for mode, native in (("speech", "speech"), ("vision", "vision_speech")):
        linear(f"up_proj_for_{native}", f"proj.{mode}.up")
        linear(f"down_proj_for_{native}", f"proj.{mode}.down")
    return rows


def _squeezed_shape(name: str, shape: tuple[int, ...], rank: int | None) -> tuple[int, ...]:
    if rank is None or len(shape) == rank:
        return shape
    kept = tuple(n for n in shape if n != 1)
    if name.endswith(".conv.dw.weight"):      # (H*m, 1, K): keep K even if it is 1
        kept = (shape[0], shape[-1])
    if len(kept) != rank or int(np.prod(kept)) != int(np.prod(shape)):
        raise AudioEncoderError(f"tensor {name}: cannot squeeze shape {shape} to rank {rank}")
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
    outtype: "f32" or "f16" (2-D+ weights f16; norms, biases, CMVN and the mel bank stay f32).
    """
    if outtype not in ("f32", "f16"):
        raise AudioEncoderError(f"outtype {outtype!r}: the speech encoder is written as f32 or f16")
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
    proj_dim = shapes["proj.speech.up.weight"][0]
    buckets = int(cfg["bias_max_distance"]) * (1 if cfg["bias_symmetric"] else 2)
    want = {
        "cmvn.mean": (n_mels,), "sub.conv0.weight": (c, 1, 3, 3), "sub.out.weight": (h, c * f_out),
        "rel_bias.weight": (buckets, heads), "blk.0.ffn_in.up.weight": (2 * i_ff, h),
        "blk.0.attn.q.weight": (h, h), "blk.0.conv.dw.weight": (h * int(cfg["depthwise_multiplier"]),
                                                                int(cfg["kernel_size"])),
        "proj.speech.up.weight": (proj_dim, h), "proj.vision.down.weight": (proj_dim, proj_dim),
    }
    for name, shape in want.items():
        if shapes[name] != shape:
            raise AudioEncoderError(f"tensor {name} has shape {shapes[name]}, config implies {shape}")

    mel = mel_filter_bank(int(fe["n_fft"]), int(fe["feature_size"]), int(fe["sampling_rate"]),
                          float(fe["mel_min_frequency"]), float(fe["mel_max_frequency"]))
    sources.append(TensorSource("fe.mel_filters", (mel.size,), lambda: mel.astype(np.float32).reshape(-1)))

    metadata = _metadata(cfg, fe, proj_dim)
    return write_gguf(path, ARCH, metadata_writer(metadata), sources, outtype=outtype, progress=progress)
