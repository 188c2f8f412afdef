"""The numpy speech encoder (model/speech_encoder.py) against transformers' Phi-4-multimodal audio path.

A tiny random `Phi4MultimodalAudioEmbedding` (eager attention, weights scaled so activations are
O(1)) is written with convert/audio_encoder.py from its state_dict and reloaded with SpeechEncoder.
Errors are relative Frobenius norms: ||ours - ref|| / ||ref||.
"""
from __future__ import annotations

import sys
import types

sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))

import numpy as np
import pytest

from tests.conftest import require  # noqa: E402

torch = require("torch", "the reference audio path runs on torch")
transformers = require("transformers", "the reference audio path (test extra)")

from transformers import Phi4MultimodalConfig, Phi4MultimodalFeatureExtractor  # noqa: E402
from transformers.models.phi4_multimodal.modeling_phi4_multimodal import Phi4MultimodalAudioEmbedding  # noqa: E402

from convert.audio_encoder import FEATURE_DEFAULTS as T_FE_DEFAULTS  # noqa: E402
from convert.audio_encoder import AudioEncoderError, mel_filter_bank, write_audio_encoder  # noqa: E402
from model.audio_features import FeatureConfig, num_audio_tokens  # noqa: E402
from model.conformer import erf, gelu  # noqa: E402
from model.gguf_weights import load_gguf  # noqa: E402
from model.speech_encoder import SpeechEncoder  # noqa: E402
from tests.signals import speechlike  # noqa: E402

SR = 16000
F32_TOL = 1e-4
F16_TOL = 5e-3   # weights rounded to f16 (rel. 5e-4 each); measured 5e-4 .. 1e-3 through 3 blocks + projector

TINY_AUDIO = dict(
    hidden_size=64, intermediate_size=96, num_blocks=3, num_attention_heads=4, nemo_conv_channels=16,
    ext_pw_out_channel=64, depthwise_separable_out_channel=64, input_size=80, time_reduction=8,
    bias_max_distance=20, kernel_size=3,
)
TEXT_HIDDEN = 96


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.linalg.norm(ours - ref) / np.linalg.norm(ref))



# -- reference model ------------------------------------------------------------------------------

def _randomize(module: torch.nn.Module, feats_mean: np.ndarray, feats_std: np.ndarray, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias_values.weight"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif "layer_norm" in name and name.endswith(".weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias") or name.endswith(".b1") or name.endswith(".b2"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:  # weights: unit-variance outputs for unit-variance inputs
                fan_in = int(np.prod(p.shape[1:])) if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))
        enc = module.encoder.encoder_embedding
        enc.global_mean.copy_(torch.from_numpy(feats_mean.astype(np.float32)))
        enc.global_invstd.copy_(torch.from_numpy((1.0 / feats_std).astype(np.float32)))


@pytest.fixture(scope="module")
def fe():
    return Phi4MultimodalFeatureExtractor()


@pytest.fixture(scope="module")
def reference(fe):
    config = Phi4MultimodalConfig(hidden_size=TEXT_HIDDEN, audio_config=dict(TINY_AUDIO))
    config.audio_config._attn_implementation = "eager"
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    module = Phi4MultimodalAudioEmbedding(config).eval()
    assert module.encoder.config._attn_implementation == "eager"
    feats = fe(speechlike(3 * SR), sampling_rate=SR, return_tensors="np")["audio_input_features"][0]
    _randomize(module, feats.mean(0), feats.std(0) + 0.5)
    return config, module


def _write(reference, path, outtype):
    config, module = reference
    tensors = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    return write_audio_encoder(tensors, config.audio_config.to_dict(), path, outtype=outtype)


@pytest.fixture(scope="module")
def gguf_f32(reference, tmp_path_factory):
    return _write(reference, tmp_path_factory.mktemp("audio") / "audio-f32.gguf", "f32")


@pytest.fixture(scope="module")
def encoder(gguf_f32):
    return SpeechEncoder.load(gguf_f32)


def ref_features(fe, samples: np.ndarray) -> np.ndarray:
    return fe(samples, sampling_rate=SR, return_tensors="np")["audio_input_features"][0]


def ref_embed(fe, module, samples: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(encoder output, projected embeddings) from transformers, via Phi4MultimodalAudioEmbedding.forward."""
    out = fe(samples, sampling_rate=SR, return_tensors="pt")
    n = int(out["audio_embed_sizes"][0])
    feats = out["audio_input_features"]
    token = module.config.audio_config.audio_token_id
    width = module.down_proj_for_speech.out_features
    with torch.no_grad():
        hidden = module.encoder(feats, None)[0].numpy()
        embeds = module(
            input_ids=torch.full((1, n), token), inputs_embeds=torch.zeros(1, n, width),
            audio_input_features=feats, audio_embed_sizes=out["audio_embed_sizes"],
            audio_projection_mode=mode,
        )[0].numpy()
    return hidden[:n], embeds


# -- front end ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_mel_bank_equals_transformers(fe, encoder):
    ours = mel_filter_bank(512, 80, SR, 0.0, 7690.0)
    assert ours.shape == fe.mel_filters.shape == (257, 80)
    assert np.array_equal(ours, fe.mel_filters)
    # the one entry where transformers differs from the original SpeechLib bank (docs/model.md, "Speech encoder")
    assert ours[246, 79] == pytest.approx(0.00971909747, rel=1e-6)
    assert not ours[247:].any()
    # the GGUF keeps it as float32, also under f16 storage (see test_f16_storage)
    assert np.array_equal(encoder.features.mel_filters, fe.mel_filters.astype(np.float32))


@pytest.mark.slow
@pytest.mark.parametrize("n", [400, 401, 559, 560, 16000, 16000 * 3 + 123])
def test_log_mel_matches_reference(fe, encoder, n):
    x = speechlike(n, seed=n)
    ref = ref_features(fe, x)
    ours = encoder.features(x)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert rel_err(ours, ref) <= F32_TOL
    assert np.abs(ours - ref).max() <= 1e-3


@pytest.mark.slow
def test_log_mel_silence_and_blocks(fe, encoder):
    """Digital silence hits the log floor; block-wise FFT equals one-shot up to float32 rounding.

    numpy's FFT (pocketfft) may round a batch of frames differently from a single frame, so
    blocks are not bit-equal to one shot (numpy 2.4: at most 1 ulp). A block boundary that
    dropped, repeated or shifted a frame would be off by whole units of log-power."""
    x = np.zeros(5000, np.float32)
    assert np.array_equal(encoder.features(x), ref_features(fe, x))
    y = speechlike(SR * 2, seed=7)
    full = encoder.features(y)
    eps, default = np.finfo(np.float32).eps, encoder.features.block_frames
    for block_frames in (1, 7, 64):
        encoder.features.block_frames = block_frames
        try:
            blocks = encoder.features(y)
        finally:
            encoder.features.block_frames = default
        assert blocks.dtype == full.dtype == np.float32 and blocks.shape == full.shape
        np.testing.assert_allclose(blocks, full, rtol=4 * eps, atol=4 * eps * float(np.abs(full).max()),
                                   err_msg=f"block_frames={block_frames}")


def test_token_counts_match_reference(fe):
    lengths = sorted({*range(400, 2400, 7), *range(400, 420), 559, 560, 1679, 1680, 1681, 16000, 32000,
                      16000 * 30, 16000 * 60, 16000 * 61 + 77})
    for n in lengths:
        ref = int(fe(np.zeros(n, np.float32), sampling_rate=SR, return_tensors="np")["audio_embed_sizes"][0])
        assert num_audio_tokens(n) == ref, n
    assert (num_audio_tokens(SR), num_audio_tokens(30 * SR), num_audio_tokens(60 * SR)) == (13, 375, 750)


@pytest.mark.slow
@pytest.mark.parametrize("n", [0, 1, 239, 240, 399])
def test_too_short_refused_like_reference(fe, encoder, n):
    x = np.zeros(n, np.float32)
    with pytest.raises(RuntimeError):
        fe(x, sampling_rate=SR, return_tensors="np")
    with pytest.raises(ValueError, match="too short"):
        num_audio_tokens(n)
    with pytest.raises(ValueError, match="too short"):
        encoder.embed(x)


# -- encoder --------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("n", [400, 1679, 16000 * 2 + 333])
def test_encoder_and_projectors_match_reference(fe, reference, encoder, n):
    _, module = reference
    x = speechlike(n, seed=n)
    hidden = encoder.encode(x)
    assert hidden.shape[0] == num_audio_tokens(n)
    for mode in ("speech", "vision"):
        ref_hidden, ref_out = ref_embed(fe, module, x, mode)
        assert rel_err(hidden, ref_hidden) <= F32_TOL
        ours = encoder.embed(x, mode)
        assert ours.dtype == np.float32 and ours.shape == (num_audio_tokens(n), TEXT_HIDDEN)
        assert rel_err(ours, ref_out) <= F32_TOL
    assert rel_err(encoder.embed(x, "speech"), encoder.embed(x, "vision")) > 0.1  # different projectors


@pytest.mark.slow
def test_encoder_on_reference_features(fe, reference, encoder):
    """Isolates the conformer: same input features, output compared directly; tiny subsampling chunks."""
    _, module = reference
    feats = ref_features(fe, speechlike(16000, seed=3))
    with torch.no_grad():
        ref = module.encoder(torch.from_numpy(feats)[None], None)[0].numpy()
    chunk = encoder.encoder.subsampling.chunk
    try:
        for c in (1, 3, 64):
            encoder.encoder.subsampling.chunk = c
            assert rel_err(encoder.encoder(feats), ref) <= F32_TOL
    finally:
        encoder.encoder.subsampling.chunk = chunk


@pytest.mark.slow
def test_long_audio_window_split(fe, reference, encoder):
    """> 500 subsampled frames: zero-padded 500-frame windows, each attended on its own
    (docs/model.md, "Speech encoder")."""
    _, module = reference
    n = 16000 * 45 + 555            # 4501 frames -> 563 tokens -> windows of 500 + 63 (+437 padding)
    x = speechlike(n, seed=11)
    ref_hidden, ref_out = ref_embed(fe, module, x, "speech")
    assert ref_hidden.shape[0] == num_audio_tokens(n) == 563
    ours = encoder.embed(x, "speech")
    assert rel_err(encoder.encode(x), ref_hidden) <= F32_TOL
    assert rel_err(ours, ref_out) <= F32_TOL
    # the windows really are independent: the first 500 tokens only depend on their own window
    head = encoder.encoder(ref_features(fe, x)[:4000])
    assert head.shape[0] == 500
    np.testing.assert_allclose(head, encoder.encode(x)[:500], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_f16_storage(fe, reference, tmp_path):
    _, module = reference
    path = _write(reference, tmp_path / "audio-f16.gguf", "f16")
    w = load_gguf(path)
    assert w.get("fe.n_mels") == 80
    enc16 = SpeechEncoder.load(path)
    assert np.array_equal(enc16.features.mel_filters, fe.mel_filters.astype(np.float32))
    x = speechlike(16000 * 2, seed=5)
    for mode in ("speech", "vision"):
        _, ref_out = ref_embed(fe, module, x, mode)
        err = rel_err(enc16.embed(x, mode), ref_out)
        assert err <= F16_TOL, err


@pytest.mark.slow
def test_other_rates_and_channels_are_brought_to_16k_mono_first(encoder):
    from model.audio_io import to_model_audio

    x = speechlike(44100, seed=2)
    stereo = np.stack([x, x], axis=1)
    out = encoder.embed(to_model_audio(stereo, 44100))
    assert out.shape == (num_audio_tokens(16000), TEXT_HIDDEN)
    with pytest.raises(ValueError, match="mono"):
        encoder.embed(stereo)


# -- converter ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_gguf_metadata_and_names(gguf_f32):
    w = load_gguf(gguf_f32)
    assert w.arch == "phi4mm-audio"
    expect = {
        "embedding_length": 64, "feed_forward_length": 96, "block_count": 3, "attention.head_count": 4,
        "attention.head_dim": 16, "attention.bias_max_distance": 20, "attention.bias_symmetric": False,
        "attention.window_frames": 500, "subsampling.time_reduction": 8, "subsampling.conv_channels": 16,
        "subsampling.final_freq": 10, "conv.kernel_size": 3, "projection_dim": TEXT_HIDDEN,
        "fe.sample_rate": 16000, "fe.win_length": 400, "fe.hop_length": 160, "fe.n_fft": 512, "fe.n_mels": 80,
        "fe.compression_rate": 8, "audio_token_id": 200011,
    }
    for key, value in expect.items():
        assert w.get(key) == value, key
    assert w.get("fe.preemphasis") == pytest.approx(0.97)
    assert w.tensor("blk.2.conv.glu_b1").shape == (64,)
    assert w.tensor("blk.0.conv.dw.weight").shape == (64, 3)
    assert w.tensor("sub.2.pw.weight").shape == (16, 16)
    assert w.tensor("rel_bias.weight").shape == (40, 4)
    assert w.tensor("fe.mel_filters").shape == (257 * 80,)


@pytest.mark.slow
def test_converter_refuses_bad_input(reference, tmp_path):
    config, module = reference
    tensors = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    cfg = config.audio_config.to_dict()
    with pytest.raises(AudioEncoderError, match="missing"):
        write_audio_encoder({k: v for k, v in tensors.items() if "encoders.2." not in k}, cfg, tmp_path / "a.gguf")
    with pytest.raises(AudioEncoderError, match="unexpected"):
        write_audio_encoder({**tensors, "model.embed_tokens_extend.audio_embed.x": tensors["up_proj_for_speech.bias"]},
                            cfg, tmp_path / "a.gguf")
    with pytest.raises(AudioEncoderError, match="chunk_size"):
        write_audio_encoder(tensors, {**cfg, "chunk_size": 18}, tmp_path / "a.gguf")
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_converter_streams_lazy_tensors(reference, gguf_f32, tmp_path):
    config, module = reference
    loaded = []
    lazy = {}
    for k, v in module.state_dict().items():
        arr = v.detach().numpy()
        lazy[k] = (tuple(arr.shape), lambda k=k, arr=arr: loaded.append(k) or arr)
    path = write_audio_encoder(lazy, config.audio_config.to_dict(), tmp_path / "lazy.gguf")
    assert sorted(loaded) == sorted(lazy)
    assert path.read_bytes() == gguf_f32.read_bytes()


def test_real_model_layout():
    """Phi-4-multimodal's own audio config: 24 blocks, 1024 wide, 16 heads, 500-frame bias
    (docs/model.md, "Checkpoint layouts")."""
    from convert.audio_encoder import _audio_config, _metadata, tensor_map
    real = {"hidden_size": 1024, "num_attention_heads": 16, "num_blocks": 24, "intermediate_size": 1536,
            "nemo_conv_channels": 1024, "bias_max_distance": 500, "ext_pw_out_channel": None, "audio_token_id": None}
    cfg = _audio_config(real)
    meta = _metadata(cfg, dict(T_FE_DEFAULTS), 3072)
    assert meta["phi4mm-audio.subsampling.final_freq"] == 10 and meta["phi4mm-audio.attention.head_dim"] == 64
    assert meta["phi4mm-audio.audio_token_id"] == 200011
    rows = {native: name for native, name, _ in tensor_map(24, 8)}
    assert rows["encoder.embed.conv.2.weight"] == "sub.1.dw.weight"
    assert rows["encoder.embed.conv.3.weight"] == "sub.1.pw.weight"
    assert rows["encoder.embed.conv.5.weight"] == "sub.2.dw.weight"
    assert rows["encoder.embed.conv.6.weight"] == "sub.2.pw.weight"
    assert rows["encoder.encoders.23.conv.glu.b2"] == "blk.23.conv.glu_b2"
    assert rows["down_proj_for_vision_speech.bias"] == "proj.vision.down.bias"
    assert len(rows) == 2 + 12 + 1 + 24 * 36 + 8   # cmvn, subsampling, rel bias, blocks, projectors


def test_gelu_erf_accuracy():
    import math
    x = np.linspace(-8, 8, 100001, dtype=np.float32)
    ref = np.array([math.erf(v) for v in x.astype(np.float64)])
    assert np.abs(erf(x) - ref).max() < 1e-6
    ref_gelu = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    assert np.abs(gelu(x) - ref_gelu).max() < 5e-6


def test_feature_config_defaults_match_reference(fe):
    cfg = FeatureConfig()
    assert (cfg.sample_rate, cfg.win_length, cfg.hop_length, cfg.n_fft, cfg.n_mels) == (
        fe.sampling_rate, fe.win_length, fe.hop_length, fe.n_fft, fe.feature_size)
    assert (cfg.preemphasis, cfg.compression_rate, cfg.downsample_rate, cfg.feat_stride) == (
        fe.preemphasis, fe.audio_compression_rate, fe.audio_downsample_rate, fe.audio_feat_stride)
