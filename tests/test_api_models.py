"""The HTTP API on real models, driven by the official `openai` client: SmolLM2 answers real
questions, and a tiny converted Phi-4-multimodal reads images and audio sent as data: URLs at
the prompt sizes transformers' processors give."""
from __future__ import annotations

import base64
import io
import wave

import numpy as np
import pytest

from app.engine import LocalEngine
from tests.api_server import serving
from tests.conftest import require
from tests.test_engine_multimodal import SR, image_reference_inputs, picture, speech_like
from tests.test_smollm2 import EASY, N_CTX, SYSTEM, PlainLlama, relevant, smollm2_path

pytestmark = pytest.mark.slow  # SmolLM2 and a converted checkpoint through llama.cpp

openai = require("openai", "the official client is the API's test client")


@pytest.fixture(scope="module")
def smollm2():
    engine = LocalEngine.load(smollm2_path(), n_ctx=N_CTX)
    with serving(engine, model_name="smollm2") as url:
        yield engine, openai.OpenAI(base_url=url, api_key="unused")
    engine.close()


def test_real_questions_get_relevant_answers_through_the_client(smollm2):
    engine, client = smollm2
    plain = PlainLlama(smollm2_path(), N_CTX, engine.n_threads)
    try:
        answers = {}
        for question, _ in EASY:
            messages = [SYSTEM, {"role": "user", "content": question}]
            reply = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=40)
            answers[question] = reply.choices[0].message.content
            # the words depend on the CPU; the same model through plain llama-cpp-python agrees
            assert answers[question] == plain.text(plain.greedy(messages, 40))
            assert reply.usage.completion_tokens > 0 and reply.usage.prompt_tokens == len(plain.prompt(messages))
        assert len(relevant(answers)) >= 3, answers
    finally:
        plain.close()


def test_streamed_text_equals_the_plain_text_at_temperature_0(smollm2):
    _, client = smollm2
    messages = [SYSTEM, {"role": "user", "content": "Name three colours."}]
    plain = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=30)
    chunks = list(client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=30,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content != ""
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the second time, the prompt was cached


# -- a tiny converted Phi-4-multimodal ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_model):
    engine = LocalEngine.load(tiny_model, n_ctx=4096)
    with serving(engine, model_name="tiny") as url:
        yield engine, openai.OpenAI(base_url=url, api_key="unused")
    engine.close()


def data_url(image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def wav_base64(samples: np.ndarray) -> str:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(SR)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return base64.b64encode(buffer.getvalue()).decode()


def text_only_tokens(client, text: str) -> int:
    reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}], max_tokens=1)
    return reply.usage.prompt_tokens


def test_an_image_part_costs_what_the_processor_counts(tiny):
    _, client = tiny
    image = picture(640, 480)
    for detail, crops in (("low", 1), ("high", None)):
        reply = client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(image), "detail": detail}},
            {"type": "text", "text": "Describe the image."}]}])
        counts, _ = image_reference_inputs([image], crops or 36)  # transformers' processor
        assert reply.usage.prompt_tokens == text_only_tokens(client, "Describe the image.") + counts[0]
        assert reply.model_extra["timings"]["adapter"] == "vision"


def test_an_audio_part_costs_what_the_feature_extractor_counts(tiny):
    from transformers import Phi4MultimodalFeatureExtractor

    _, client = tiny
    samples = speech_like(2.3)
    quantised = np.round(np.clip(samples, -1, 1) * 32767) / 32767  # what the WAV carries
    n_audio = int(Phi4MultimodalFeatureExtractor()(quantised.astype(np.float32), sampling_rate=SR,
                                                   return_tensors="pt")["audio_embed_sizes"][0])
    for part in ({"type": "input_audio", "input_audio": {"data": wav_base64(samples), "format": "wav"}},
                 {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + wav_base64(samples)}}):
        reply = client.chat.completions.create(model="tiny", max_tokens=2, messages=[{"role": "user", "content": [
            part, {"type": "text", "text": "Transcribe the audio clip into text."}]}])
        assert reply.usage.prompt_tokens == text_only_tokens(client, "Transcribe the audio clip into text.") + n_audio
        assert reply.model_extra["timings"]["adapter"] == "speech"
