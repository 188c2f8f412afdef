"""The numpy vision path (model/image_crops.py, model/vision_encoder.py, convert/vision_encoder.py)
against transformers' Phi4MultimodalImageProcessor and Phi4MultimodalImageEmbedding.

The reference tower is tiny (width 32, 2 heads, 4 blocks of which 3 are used) but the crop
geometry is real (448-pixel crops, 14-pixel patches), so every image size exercises the real
grids, masks and token counts. Relative error = max |ours - reference| / max |reference|.

torchvision is a test-only dependency of the reference image processor:
    pip install --no-deps "torchvision==0.28.*"
Its compiled ops do not load with the local CPU torch; `_allow_torchvision()` makes the Python
part importable (docs/model.md, "transformers as the reference").
"""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from PIL import Image


def _allow_torchvision() -> None:
    """Skip torchvision's op registrations (must run before anything imports torchvision)."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))


_allow_torchvision()
from tests.conftest import require  # noqa: E402

torch = require("torch", "the reference vision tower runs on torch")
require("torchvision", "the reference image processor's transforms (test extra)")
require("transformers", "the reference image processor and vision tower (test extra)")

from torchvision.transforms.v2 import functional as tvF  # noqa: E402
from transformers import Phi4MultimodalConfig  # noqa: E402
from transformers.models.phi4_multimodal.image_processing_phi4_multimodal import (  # noqa: E402
    Phi4MultimodalImageProcessor,
)
from transformers.models.phi4_multimodal.modeling_phi4_multimodal import (  # noqa: E402
    Phi4MultimodalImageEmbedding,
)

from convert.vision_encoder import ARCH, write_vision_encoder  # noqa: E402
from model.gguf_weights import load_gguf  # noqa: E402
from model.image_crops import (  # noqa: E402
    make_crops, num_image_tokens, resize_bicubic, resize_bilinear_aa,
)
from model.vision_encoder import VisionEncoder, gelu_erf  # noqa: E402
from tests.signals import random_image  # noqa: E402

TEXT_HIDDEN = 24
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=2,
              image_size=448, patch_size=14, crop_size=448, feature_layer=-2)
F32_BOUND = 1e-4
# torchvision resizes uint8 natively (PIL-SIMD fixed point, which we reproduce bit-exactly) on
# AVX2/AVX512 and ARM CPUs; elsewhere it goes through float32 and may round a pixel differently.
NATIVE_UINT8_RESIZE = (torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
                       or __import__("platform").machine() in ("aarch64", "arm64"))
CROP_ATOL = 0.0 if NATIVE_UINT8_RESIZE else 1.0 / 127.5 + 1e-6
F16_BOUND = 1e-2   # f16 weights: measured ~1e-3


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours.astype(np.float64) - ref).max() / np.abs(ref).max())



# -- fixtures -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def processor():
    return Phi4MultimodalImageProcessor()


@pytest.fixture(scope="module")
def reference():
    """A random Phi4MultimodalImageEmbedding, eager attention (SDPA turns causal without padding)."""
    torch.manual_seed(0)
    config = Phi4MultimodalConfig(hidden_size=TEXT_HIDDEN, intermediate_size=48, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
                                  bos_token_id=0, pad_token_id=0, eos_token_id=0, vision_config=dict(VISION))
    config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    model = Phi4MultimodalImageEmbedding(config).eval()
    assert model.img_processor.config._attn_implementation == "eager"
    with torch.no_grad():  # weights scaled so activations are O(1)-O(10), attention not uniform
        for name, p in model.named_parameters():
            if "layer_norm" in name or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p) if name.endswith("weight") else 0.1 * torch.randn_like(p))
            elif p.ndim >= 2 and not any(k in name for k in ("extensor", "position_embedding", "probe")):
                p.copy_(torch.randn_like(p) * 1.5 / np.sqrt(np.prod(p.shape[1:])))
            else:
                p.copy_(0.5 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def state(reference):
    return {name: t.detach().numpy().copy() for name, t in reference.state_dict().items()}


@pytest.fixture(scope="module")
def gguf_f32(reference, state, tmp_path_factory):
    path = tmp_path_factory.mktemp("vision") / "vision-f32.gguf"
    return write_vision_encoder(state, reference.config.vision_config.to_dict(), path, "f32", progress=False)


@pytest.fixture(scope="module")
def encoder(gguf_f32):
    return VisionEncoder.load(gguf_f32)


def run_reference(model, inputs) -> np.ndarray:
    """Reference embeddings (n_tokens, TEXT_HIDDEN) for processor outputs of one image."""
    n = int(inputs["num_img_tokens"][0])
    ids = torch.full((1, n), model.config.vision_config.image_token_id)
    with torch.no_grad():
        out = model(ids, torch.zeros(1, n, TEXT_HIDDEN), image_pixel_values=inputs["image_pixel_values"],
                    image_sizes=inputs["image_sizes"], image_attention_mask=inputs["image_attention_mask"])
    return out[0].numpy()


# -- preprocessing ----------------------------------------------------------------------------------

PROCESSOR_CASES = [
    # (width, height, max_crops)
    (1, 1, 36), (13, 17, 36), (28, 448, 36), (448, 28, 36), (300, 200, 36), (640, 480, 36),
    (448, 448, 36), (449, 449, 36), (896, 448, 36), (1000, 500, 36), (1920, 1080, 36),
    (4000, 3000, 36),     # 9x7 crops > 36: aspect-ratio fallback to 4x3
    (2688, 2688, 36),     # exactly 36 crops
    (3000, 2990, 36),     # 7x7 > 36: ties between square grids, the larger wins
    (5000, 10, 36), (10, 5000, 36), (3000, 100, 36), (100, 4000, 36),
    (1920, 1080, 4), (4000, 3000, 1), (1344, 1344, 9), (900, 900, 4), (2000, 1000, 8), (640, 480, 2),
]
REFUSED_CASES = [(5000, 9, 36), (5000, 10, 4), (10, 5000, 1), (3000, 20, 2)]


@pytest.mark.parametrize("width,height,max_crops", PROCESSOR_CASES)
def test_crops_equal_reference_processor(processor, width, height, max_crops):
    image = random_image(width, height, seed=width * 7 + height)
    ref = processor(image, dynamic_hd=max_crops, return_tensors="pt")
    ours = make_crops(image, max_crops=max_crops)
    ref_pixels = ref["image_pixel_values"][0].numpy()
    assert ours.pixels.shape == ref_pixels.shape
    np.testing.assert_allclose(ours.pixels[1:], ref_pixels[1:], rtol=0, atol=CROP_ATOL)  # crops: bit-exact
    np.testing.assert_allclose(ours.pixels[0], ref_pixels[0], rtol=0, atol=2e-6 + CROP_ATOL)  # bicubic global
    np.testing.assert_array_equal(ours.masks, ref["image_attention_mask"][0].numpy())
    assert ours.image_size == tuple(ref["image_sizes"][0].tolist())
    assert ours.num_tokens == ref["num_img_tokens"][0] == num_image_tokens(width, height, max_crops)


@pytest.mark.parametrize("width,height,max_crops", REFUSED_CASES)
def test_extreme_aspect_ratio_refused_like_reference(processor, width, height, max_crops):
    image = random_image(width, height)
    with pytest.raises(ValueError, match="extreme"):
        processor(image, dynamic_hd=max_crops, return_tensors="pt")
    with pytest.raises(ValueError, match="extreme"):
        make_crops(image, max_crops=max_crops)
    with pytest.raises(ValueError, match="extreme"):
        num_image_tokens(width, height, max_crops)


def test_token_counts_of_spec_examples():
    # the worked examples of docs/model.md, "Vision encoder"
    examples = {(448, 448): 545, (896, 448): 801, (640, 480): 1065, (1000, 500): 1449, (1344, 1344): 2625,
                (1920, 1080): 3918, (4000, 3000): 3393, (2688, 2688): 9585, (300, 200): 460, (28, 448): 305}
    for (w, h), n in examples.items():
        assert num_image_tokens(w, h) == n, (w, h)


@pytest.mark.parametrize("mode", ["L", "RGBA", "LA", "P", "CMYK", "I;16"])
def test_image_modes_equal_reference(processor, mode):
    rgb = random_image(500, 300, seed=3)
    if mode in ("RGBA", "LA"):
        image = rgb.convert(mode)
        alpha = Image.fromarray(np.tile(np.linspace(0, 255, 500, dtype=np.uint8), (300, 1)))
        image.putalpha(alpha)
    elif mode == "P":
        image = rgb.convert("P", palette=Image.Palette.ADAPTIVE)
        image.info["transparency"] = 3
    elif mode == "I;16":
        image = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 200))
    else:
        image = rgb.convert(mode)
    # transformers saturates 16-bit greyscale to white (it clips values to 8 bits); we keep the top
    # byte, so the picture survives: compared with the reference fed that 8-bit picture.
    reference_input = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8)) if mode == "I;16" else image
    ref = processor(reference_input, return_tensors="pt")
    ours = make_crops(image)
    np.testing.assert_allclose(ours.pixels[1:], ref["image_pixel_values"][0, 1:].numpy(), rtol=0, atol=CROP_ATOL)
    np.testing.assert_allclose(ours.pixels[0], ref["image_pixel_values"][0, 0].numpy(), atol=2e-6 + CROP_ATOL)


@pytest.mark.skipif(not NATIVE_UINT8_RESIZE, reason="torchvision resizes uint8 through float32 on this CPU")
def test_bilinear_resize_is_bit_exact_with_torchvision():
    rng = np.random.default_rng(1)
    for trial in range(40):
        h, w = (int(v) for v in rng.integers(1, 400, 2))
        nh, nw = (int(v) for v in rng.integers(1, 900, 2))
        nh = h if trial % 4 == 0 else nh
        nw = w if trial % 4 == 1 else nw
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ref = tvF.resize(torch.from_numpy(image).permute(2, 0, 1).contiguous(), [nh, nw])
        np.testing.assert_array_equal(resize_bilinear_aa(image, nh, nw), ref.permute(1, 2, 0).numpy())


@pytest.mark.parametrize("shape", [(448, 448), (896, 1344), (2688, 2688), (100, 37), (500, 300)])
def test_bicubic_resize_matches_torch(shape):
    x = np.random.default_rng(2).normal(size=(3,) + shape).astype(np.float32)
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size=(448, 448), mode="bicubic",
                                          align_corners=False)[0].numpy()
    np.testing.assert_allclose(resize_bicubic(x, 448, 448), ref, rtol=0, atol=1e-5)


def test_gelu_erf_matches_torch():
    x = np.random.default_rng(4).normal(0, 4, 100_000).astype(np.float32)
    ref = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(gelu_erf(x), ref, rtol=0, atol=2e-6)


# -- converter ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_gguf_holds_used_blocks_and_hyperparameters(gguf_f32, state):
    w = load_gguf(gguf_f32)
    assert w.arch == ARCH
    assert w.get("block_count") == 3 and w.get("source_block_count") == 4 and w.get("feature_layer") == -2
    assert (w.get("embedding_length"), w.get("feed_forward_length"), w.get("attention.head_count")) == (32, 48, 2)
    assert (w.get("image_size"), w.get("patch_size"), w.get("crop_size"), w.get("dynamic_hd")) == (448, 14, 448, 36)
    assert w.get("hidden_act") == "gelu_pytorch_tanh" and w.get("projector.embedding_length") == TEXT_HIDDEN
    assert w.get("attention.layer_norm_epsilon") == pytest.approx(1e-6)
    assert w.get("image_mean") == [0.5] * 3 and w.get("image_std") == [0.5] * 3
    assert not any(name.startswith("v.blk.3.") for name in w.tensors)   # the unused last block
    assert len(w.tensors) == 3 + 3 * 16 + 2 + 4
    np.testing.assert_array_equal(w.tensor("v.blk.2.attn_q.weight"),
                                  state["img_processor.encoder.layers.2.self_attn.q_proj.weight"])
    np.testing.assert_array_equal(w.tensor("v.sub_sep"), state["sub_img_feature_extensor"].reshape(-1))
    np.testing.assert_array_equal(w.tensor("mm.down.bias"), state["img_projection_down.bias"])


@pytest.mark.slow
def test_converter_streams_loaders_and_reads_processor_settings(reference, state, tmp_path):
    loaded = []

    def loader(name):
        def load():
            loaded.append(name)
            return state[name]
        return load

    tensors = {name: loader(name) for name in state}
    shapes = {name: state[name].shape for name in state}
    path = write_vision_encoder(tensors, reference.config.vision_config.to_dict(), tmp_path / "v.gguf",
                                shapes=shapes, processor_config={"image_processor": {"dynamic_hd": 4}},
                                progress=False)
    assert "img_processor.encoder.layers.3.mlp.fc1.weight" not in loaded   # unused: never loaded
    encoder = VisionEncoder.load(path)
    assert encoder.cfg.max_crops == 4
    image = random_image(1920, 1080)
    assert encoder.num_tokens(1920, 1080) == num_image_tokens(1920, 1080, 4) == 753
    assert encoder.preprocess(image).num_tokens == 753


@pytest.mark.slow
def test_converter_errors(reference, state, tmp_path):
    cfg = reference.config.vision_config.to_dict()
    partial = {k: v for k, v in state.items() if "layers.1.mlp" not in k}
    with pytest.raises(ValueError, match="missing"):
        write_vision_encoder(partial, cfg, tmp_path / "a.gguf", progress=False)
    with pytest.raises(ValueError, match="shape"):
        write_vision_encoder({k: (lambda v=v: v) for k, v in state.items()}, cfg, tmp_path / "b.gguf",
                             progress=False)
    with pytest.raises(ValueError, match="outtype"):
        write_vision_encoder(state, cfg, tmp_path / "c.gguf", outtype="q4_k_m", progress=False)
    assert not list(tmp_path.iterdir())


# -- encoder ----------------------------------------------------------------------------------------------

MODEL_CASES = [
    (300, 200),    # one crop, bottom padding
    (13, 17),      # upscaled, an odd number (25) of valid patch columns
    (896, 448),    # two crops, no padding anywhere (the case where SDPA would turn causal)
    (640, 480),    # 2x2 crops with padding
    (1000, 500),   # 3x2
    (448, 28),     # a strip: 2 valid patch rows
]


@pytest.mark.slow
@pytest.mark.parametrize("width,height", MODEL_CASES)
def test_encoder_matches_reference_on_same_pixels(reference, encoder, processor, width, height):
    inputs = processor(random_image(width, height, seed=5), return_tensors="pt")
    pixels = inputs["image_pixel_values"][0].numpy()
    masks = inputs["image_attention_mask"][0].numpy()
    image_size = tuple(inputs["image_sizes"][0].tolist())

    with torch.no_grad():  # pooled tower features (N, 256, C)
        ref_features = reference.get_img_features(inputs["image_pixel_values"][0],
                                                  attention_mask=inputs["image_attention_mask"][0].bool()).numpy()
    ours_features = encoder.encode_crops(pixels, masks)
    assert rel_err(ours_features.reshape(ref_features.shape), ref_features) <= F32_BOUND

    ref = run_reference(reference, inputs)
    ours = encoder.embed_crops(pixels, masks, image_size)
    assert ours.shape == (int(inputs["num_img_tokens"][0]), TEXT_HIDDEN)
    assert rel_err(ours, ref) <= F32_BOUND


@pytest.mark.parametrize("width,height,max_crops", [(640, 480, None), (1920, 1080, 4), (4000, 3000, None),
                                                    (28, 448, None), (1344, 1344, 1)])
@pytest.mark.slow
def test_image_to_embeddings_end_to_end(reference, encoder, processor, width, height, max_crops):
    image = random_image(width, height, seed=6)
    kwargs = {} if max_crops is None else {"dynamic_hd": max_crops}
    ref = run_reference(reference, processor(image, return_tensors="pt", **kwargs))
    ours = encoder.embed(image, max_crops=max_crops)
    assert ours.dtype == np.float32
    assert rel_err(ours, ref) <= F32_BOUND


@pytest.mark.slow
def test_36_crops_end_to_end(reference, encoder, processor):
    image = random_image(2688, 2688, seed=7)
    ref = run_reference(reference, processor(image, return_tensors="pt"))
    ours = encoder.embed(image)
    assert ours.shape == (9585, TEXT_HIDDEN)
    assert rel_err(ours, ref) <= F32_BOUND


@pytest.mark.slow
def test_f16_encoder_close(reference, state, processor, tmp_path):
    path = write_vision_encoder(state, reference.config.vision_config.to_dict(), tmp_path / "v16.gguf", "f16",
                                progress=False)
    encoder = VisionEncoder.load(path)
    image = random_image(640, 480, seed=8)
    ref = run_reference(reference, processor(image, return_tensors="pt"))
    assert rel_err(encoder.embed(image), ref) <= F16_BOUND


@pytest.mark.slow
def test_crop_batch_does_not_change_result(gguf_f32):
    image = random_image(1000, 500, seed=9)
    one = VisionEncoder.load(gguf_f32, crop_batch=1).embed(image)
    many = VisionEncoder.load(gguf_f32, crop_batch=16).embed(image)
    np.testing.assert_allclose(one, many, rtol=0, atol=1e-5 * np.abs(many).max())


def test_a_linear_keeps_the_weight_it_is_given_not_a_transposed_copy():
    """A copy would double the encoders' memory while they load (1.7 GB at the real shapes)."""
    from model.layers import Linear

    weight, bias = np.arange(12, dtype=np.float32).reshape(3, 4), np.array([1, 2, 3], np.float32)
    linear = Linear.of(weight, bias)
    assert linear.weight() is weight and linear.widened() is linear
    x = np.ones((2, 4), np.float32)
    np.testing.assert_array_equal(linear(x), x @ weight.T + bias)


def test_a_bf16_linear_is_the_float32_linear_of_its_widened_weights():
    """q/k/v stacked with the score scale on q: from bf16 bits (kept as they are, widened at each call)
    or from the same values in float32 (stacked and scaled once), the same products bit for bit."""
    from model.layers import Linear

    rng = np.random.default_rng(0)
    bits = [rng.integers(0x3c00, 0x3f80, (n, 16), dtype=np.uint16) * np.uint16(s) for n, s in ((8, 1), (8, 1), (4, 1))]
    bits[1][0, :3] = [0x8000, 0x0001, 0xff80]   # -0, a subnormal, -inf: widened exactly too
    biases = [rng.standard_normal(len(b)).astype(np.float32) for b in bits]
    factors = [0.125 * 3 ** -0.5, 1.0, 1.0]
    widened = [(b.astype(np.uint32) << 16).view(np.float32) for b in bits]
    half = Linear.stack(list(zip(bits, biases, factors)))
    full = Linear.stack(list(zip(widened, biases, factors)))
    assert all(b.dtype == np.uint16 for b in half.blocks) and len(full.blocks) == 1
    x = rng.standard_normal((5, 16)).astype(np.float32)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(half(x), full(x))
        np.testing.assert_array_equal(half.widened()(x), full(x))
    np.testing.assert_array_equal(half.weight(), full.weight())
