"""Whole model: images and audio through our encoders + engine equal transformers + peft."""
from __future__ import annotations

import numpy as np
import pytest

from app.engine import LocalEngine
from convert.pipeline import convert_checkpoint
from tests.reference import reference_logits, rel_err
from tests.signals import picture, speech_like
from tests.tiny_checkpoint import (
    TinyShapes,
    build_reference,
    save_native,
    save_remote_code,
)

pytestmark = pytest.mark.slow  # transformers + peft reference and converted checkpoints

SR = 16_000
QUESTION = "Transcribe the audio clip into text."


@pytest.fixture(scope="module")
def ref():
    # Images take hundreds of positions each: a longer context than the text tests need.
    return build_reference(TinyShapes(max_ctx=4096), seed=2)


@pytest.fixture(scope="module", params=["transformers", "remote-code"])
def engine(request, ref, tmp_path_factory):
    src = tmp_path_factory.mktemp(f"mm-ckpt-{request.param}")
    (save_native if request.param == "transformers" else save_remote_code)(ref, src)
    out = tmp_path_factory.mktemp(f"mm-gguf-{request.param}")
    convert_checkpoint(src, out, "f32", quiet=True)
    eng = LocalEngine.load(out, n_ctx=4096, kv_type="f32")
    yield eng
    eng.close()


def audio_reference_inputs(ref, samples: np.ndarray, text: str):
    from transformers import Phi4MultimodalFeatureExtractor

    features = Phi4MultimodalFeatureExtractor()(samples, sampling_rate=SR, return_tensors="pt")
    n = int(features["audio_embed_sizes"][0])
    prompt = "<|user|>" + "<|endoftext11|>" * n + text + "<|end|><|assistant|>"
    ids = ref.tokenizer(prompt)["input_ids"]
    return ids, {"audio_input_features": features["audio_input_features"],
                 "audio_embed_sizes": features["audio_embed_sizes"]}


def test_audio_prompt_matches_reference(ref, engine):
    samples = speech_like(2.3)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": (samples, SR)},
                                             {"type": "text", "text": QUESTION}]}]
    ours, usage = engine.next_token_logits(messages)
    assert usage.adapter == "speech"
    ids, inputs = audio_reference_inputs(ref, samples, QUESTION)
    assert usage.prompt_tokens == len(ids)
    theirs = reference_logits(ref, ids, "speech", **inputs)
    assert rel_err(ours, theirs) <= 1e-3 and ours.argmax() == theirs.argmax()


def test_audio_at_other_rates_and_channels_is_resampled(engine):
    stereo_48k = np.stack([speech_like(1.0, 1), speech_like(1.0, 2)], axis=1)
    stereo_48k = np.repeat(stereo_48k, 3, axis=0)  # 48 kHz, 2 channels
    messages = [{"role": "user", "content": [{"type": "audio", "audio": (stereo_48k, 48_000)},
                                             {"type": "text", "text": QUESTION}]}]
    _, usage = engine.next_token_logits(messages)
    text_only = usage.prompt_tokens
    assert engine.speech.num_tokens(16_000) == 13  # 1 s of audio is 13 tokens (docs/model.md, "Speech encoder")
    _, usage = engine.next_token_logits([{"role": "user", "content": QUESTION}])
    assert text_only - usage.prompt_tokens == 13


def test_audio_embeddings_are_reused_across_turns(engine):
    samples = speech_like(1.5, 3)
    turn = [{"role": "user", "content": [{"type": "audio", "audio": (samples, SR)},
                                         {"type": "text", "text": QUESTION}]}]
    _, first = engine.next_token_logits(turn)
    follow = turn + [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Thank you!"}]
    _, usage = engine.next_token_logits(follow)
    assert usage.encoder_ms < first.encoder_ms or usage.encoder_ms < 1.0
    assert usage.cached_tokens >= first.prompt_tokens


def image_reference_inputs(images, max_crops: int) -> tuple[list[int], dict]:
    from transformers import Phi4MultimodalImageProcessor

    out = Phi4MultimodalImageProcessor()(images, dynamic_hd=max_crops, return_tensors="pt")
    counts = [int(n) for n in out["num_img_tokens"]]
    return counts, {"image_pixel_values": out["image_pixel_values"], "image_sizes": out["image_sizes"],
                    "image_attention_mask": out["image_attention_mask"]}


def test_image_prompt_matches_reference(ref, engine):
    image = picture(640, 480)
    messages = [{"role": "user", "content": [{"type": "image", "image": image, "max_crops": 4},
                                             {"type": "text", "text": "Describe the image."}]}]
    ours, usage = engine.next_token_logits(messages)
    assert usage.adapter == "vision"
    counts, inputs = image_reference_inputs([image], 4)
    ids = ref.tokenizer("<|user|>" + "<|endoftext10|>" * counts[0] + "Describe the image.<|end|><|assistant|>")["input_ids"]
    assert usage.prompt_tokens == len(ids)
    theirs = reference_logits(ref, ids, "vision", **inputs)
    assert rel_err(ours, theirs) <= 1e-3 and ours.argmax() == theirs.argmax()


def test_two_images_and_audio_in_one_message(ref, engine):
    images = [picture(300, 200, 1), picture(200, 500, 2)]
    samples = speech_like(1.2, 4)
    text = "Compare the two images and answer the spoken question."
    messages = [{"role": "user", "content": [{"type": "image", "image": images[0], "max_crops": 2},
                                             {"type": "image", "image": images[1], "max_crops": 2},
                                             {"type": "audio", "audio": (samples, SR)},
                                             {"type": "text", "text": text}]}]
    ours, usage = engine.next_token_logits(messages)
    assert usage.adapter == "vision"  # image + audio: the vision LoRA, vision-speech projector
    counts, image_inputs = image_reference_inputs(images, 2)
    audio_ids, audio_inputs = audio_reference_inputs(ref, samples, "")
    n_audio = audio_ids.count(ref.tokenizer.convert_tokens_to_ids("<|endoftext11|>"))
    prompt = ("<|user|>" + "<|endoftext10|>" * sum(counts) + "<|endoftext11|>" * n_audio + text
              + "<|end|><|assistant|>")
    ids = ref.tokenizer(prompt)["input_ids"]
    theirs = reference_logits(ref, ids, "vision", **image_inputs, **audio_inputs)
    assert rel_err(ours, theirs) <= 1e-3 and ours.argmax() == theirs.argmax()


def test_image_in_an_earlier_turn_keeps_the_vision_lora_and_the_cache(ref, engine):
    image = picture(448, 448, 5)
    first = [{"role": "user", "content": [{"type": "image", "image": image, "max_crops": 1},
                                          {"type": "text", "text": "Describe the image."}]}]
    _, usage = engine.next_token_logits(first)
    n_first = usage.prompt_tokens
    follow = first + [{"role": "assistant", "content": "A pattern of colours."},
                      {"role": "user", "content": "What colours?"}]
    ours, usage = engine.next_token_logits(follow)
    assert usage.adapter == "vision" and usage.cached_tokens >= n_first
    counts, inputs = image_reference_inputs([image], 1)
    prompt = ("<|user|>" + "<|endoftext10|>" * counts[0] + "Describe the image.<|end|><|assistant|>"
              "A pattern of colours.<|end|><|user|>What colours?<|end|><|assistant|>")
    theirs = reference_logits(ref, ref.tokenizer(prompt)["input_ids"], "vision", **inputs)
    assert rel_err(ours, theirs) <= 1e-3


def test_count_tokens_is_what_the_prompt_costs(engine, tmp_path):
    """The page shows these counts before asking: they must be the prefill's own numbers."""
    image_file = tmp_path / "picture.png"
    picture(640, 480).save(image_file)
    for part in ({"type": "image", "image": picture(640, 480), "max_crops": 4},
                 {"type": "image", "image": str(image_file), "max_crops": 1},
                 {"type": "audio", "audio": (speech_like(2.3), SR)}):
        _, with_media = engine.next_token_logits([{"role": "user", "content": [part, {"type": "text", "text": "Hi"}]}])
        _, text_only = engine.next_token_logits([{"role": "user", "content": "Hi"}])
        assert engine.count_tokens(part) == with_media.prompt_tokens - text_only.prompt_tokens > 0


def test_missing_encoder_and_bad_media_give_clear_errors(engine):
    from app.prompt import PromptError

    from app.media import MediaError

    with pytest.raises(PromptError, match="audio must be"):
        _, usage = engine.next_token_logits([{"role": "user", "content": [{"type": "audio", "audio": [0.1, 0.2]}]}])
    with pytest.raises(MediaError, match="not a WAV file or any other audio format"):
        _, usage = engine.next_token_logits([{"role": "user", "content": [{"type": "audio", "audio": b"raw"}]}])
    with pytest.raises(PromptError, match="unknown content type"):
        _, usage = engine.next_token_logits([{"role": "user", "content": [{"type": "video", "video": 1}]}])
