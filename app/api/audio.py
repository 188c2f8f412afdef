"""OpenAI's audio API (Whisper's routes) on Phi-4-multimodal: speech to text, and speech to English.

    POST /v1/audio/transcriptions    multipart form: file, model, language, prompt, response_format, temperature
    POST /v1/audio/translations      the same form; the text is always English (no `language`)

    OpenAI(base_url=".../v1", api_key="x").audio.transcriptions.create(model="whisper-1", file=open("a.mp3", "rb"))

`file` is WAV, MP3, FLAC or OGG (app.media.read_audio). `model` is the served model's name, or
"whisper-1": an alias, so that clients and tools written for OpenAI's Whisper work unchanged.
`response_format` is json (`{"text"}`, the default), text, srt, vtt or verbose_json (`{"task",
"language", "duration", "text", "segments"}`; a segment has id, seek, start, end, text and
temperature, not Whisper's token ids and log-probabilities, which this engine does not report).

The model is Phi-4-multimodal under its speech LoRA, which the engine picks itself for a prompt
whose only media is audio. Each request is cut into 30 s windows, as the model was trained on
(docs/model.md, "Speech encoder": 30 s are 375 audio tokens), and each window is one single-turn
prompt: the audio, then the model card's own instruction for the task, then the caller's `prompt`.
The windows' texts are joined with a space; they are the segments, so subtitles are timed by
window. All the windows of a request are one turn of the engine queue, first come first served
with the chat routes (a full queue answers 429). Word timestamps are not supported, and a
`language` is reported in verbose_json but not given to the model: its recognition prompt has
no place for one (it recognises the language itself). `stream` is ignored, as OpenAI ignores it
for whisper-1.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.datastructures import FormData, UploadFile

from app import media
from app.agents.reply import Reply, Stopped
from app.api.errors import ApiError
from app.api.server import Api, Run
from app.engine_api import AUDIO, Sampling, Usage
from model.audio_features import FeatureConfig
from model.audio_io import MODEL_SAMPLE_RATE, to_model_audio

WHISPER_ALIAS = "whisper-1"
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")

# The instructions Phi-4-multimodal was trained with, from its model card
# (huggingface.co/microsoft/Phi-4-multimodal-instruct, README "Input Formats", "Speech-Language
# Format"): ASR `<|user|><|audio_1|>Transcribe the audio clip into text.<|end|><|assistant|>`
# and AST `<|user|><|audio_1|>Translate the audio to {lang}.<|end|><|assistant|>`.
TRANSCRIBE = "Transcribe the audio clip into text."
TRANSLATE = "Translate the audio to {language}."

WINDOW_S = 30
WINDOW_SAMPLES = WINDOW_S * MODEL_SAMPLE_RATE
# The feature extractor needs one 25 ms frame; a shorter window (a clip, or the tail of a long
# one, under 25 ms) is padded with silence rather than refused.
MIN_SAMPLES = FeatureConfig().win_length
# Whisper's own text budget per 30 s window (its decoder context, n_text_ctx); also ends a
# window on which the model would otherwise repeat itself until the context is full.
MAX_TOKENS_PER_WINDOW = 448

# Whisper reports the language by its English name; these are the languages Phi-4-multimodal
# hears (model card, "Supported languages", Audio).
LANGUAGE_NAMES = {"en": "english", "zh": "chinese", "de": "german", "fr": "french", "it": "italian",
                  "ja": "japanese", "es": "spanish", "pt": "portuguese"}


@dataclass(frozen=True)
class Segment:
    """What the model wrote for one window of the audio, and where the window is (seconds)."""
    start: float
    end: float
    text: str


def add_audio_routes(app: FastAPI, api: Api) -> None:
    """Mount /audio/transcriptions and /audio/translations on `app` (the /v1 app)."""

    async def transcriptions(request: Request) -> Response:
        return await _serve(api, request, "transcribe")

    async def translations(request: Request) -> Response:
        return await _serve(api, request, "translate")

    app.post("/audio/transcriptions")(transcriptions)
    app.post("/audio/translations")(translations)


# -- one request ------------------------------------------------------------------------------

async def _serve(api: Api, request: Request, task: str) -> Response:
    async with request.form() as form:
        model = _field(form, "model")
        if model != WHISPER_ALIAS:
            api._check_model(model)
        response_format = _field(form, "response_format") or "json"
        if response_format not in RESPONSE_FORMATS:
            raise ApiError(f"response_format {response_format!r} is not supported (use one of "
                           f"{', '.join(RESPONSE_FORMATS)})", param="response_format")
        if "word" in form.getlist("timestamp_granularities[]"):
            raise ApiError("word timestamps are not supported; segments are timed by 30 s window",
                           param="timestamp_granularities")
        if AUDIO not in api.queue.modalities:
            raise ApiError("this model cannot hear: it reads no audio", param="model", code="unsupported_modality")
        sampling = _sampling(_field(form, "temperature"), api.queue.n_ctx)
        language = _field(form, "language")
        instruction = TRANSCRIBE if task == "transcribe" else TRANSLATE.format(language="English")
        prompt = (_field(form, "prompt") or "").strip()
        if prompt:
            instruction = f"{instruction} {prompt}"
        data = await _file(form, api.config.max_body_bytes)
    # Decoding and resampling take a while for a long file: off the event loop, before the
    # request takes its place in line (waiting requests hold nothing).
    samples, duration = await asyncio.to_thread(_decode, data)

    segments, usages = await _transcribe(api, request, samples, duration, instruction, sampling)
    for usage in usages:
        api._observe(usage)
    text = " ".join(s.text for s in segments if s.text)
    if task == "translate":
        language = "english"
    else:
        language = LANGUAGE_NAMES.get((language or "").lower(), language or "unknown")
    return _response(response_format, task, language, duration, text, segments, sampling.temperature)


def _field(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is not None and not isinstance(value, str):
        raise ApiError(f"{name} must be a text field, not a file", param=name)
    return value


def _sampling(temperature: str | None, n_ctx: int) -> Sampling:
    try:
        return Sampling(max_tokens=min(MAX_TOKENS_PER_WINDOW, n_ctx), temperature=float(temperature or 0))
    except ValueError:
        raise ApiError(f"temperature must be a number >= 0, got {temperature!r}", param="temperature") from None


async def _file(form: FormData, max_bytes: int) -> bytes:
    upload = form.get("file")
    if upload is None:
        raise ApiError("file is missing: send the audio as the multipart field 'file'", param="file")
    if not isinstance(upload, UploadFile):
        raise ApiError("file must be a file upload (multipart/form-data), not a text field", param="file")
    # A chunked upload has no Content-Length for the server's size guard to check.
    data = await upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ApiError(f"file is over {max_bytes // 2**20} MB", 413, param="file", code="request_too_large")
    return data


def _decode(data: bytes) -> tuple[np.ndarray, float]:
    """The audio at the model's 16 kHz mono, and its duration in seconds."""
    try:
        samples, rate = media.read_audio(data)  # no samples at all is a MediaError too
    except media.MediaError as e:
        raise ApiError(f"file: {e}", param="file") from None
    return to_model_audio(samples, rate), len(samples) / rate


def _windows(samples: np.ndarray, duration: float) -> list[tuple[float, float, np.ndarray]]:
    """(start s, end s, samples) of each 30 s window; the last one ends at the audio's end."""
    out = []
    for first in range(0, max(len(samples), 1), WINDOW_SAMPLES):
        piece = samples[first:first + WINDOW_SAMPLES]
        if len(piece) < MIN_SAMPLES:
            piece = np.pad(piece, (0, MIN_SAMPLES - len(piece)))
        start = first / MODEL_SAMPLE_RATE
        out.append((start, min(start + WINDOW_S, duration), piece))
    return out


async def _transcribe(api: Api, request: Request, samples: np.ndarray, duration: float, instruction: str,
                      sampling: Sampling) -> tuple[list[Segment], list[Usage]]:
    """Every window through the model, in one turn of the engine queue."""
    windows = _windows(samples, duration)
    # Filled by the worker thread; read here only after its last event (the reply), which it
    # emits after the last window.
    segments: list[Segment] = []
    usages: list[Usage] = []

    def produce(cancel: threading.Event, emit: Callable[[str, Any], None]) -> None:
        for start, end, piece in windows:
            messages = [{"role": "user", "content": [{"type": AUDIO, AUDIO: (piece, MODEL_SAMPLE_RATE)},
                                                     {"type": "text", "text": instruction}]}]
            text = []
            for chunk in api.queue.engine.stream(messages, sampling):
                if cancel.is_set():
                    raise Stopped("")
                text.append(chunk.text)
                if chunk.usage is not None:
                    usages.append(chunk.usage)
            segments.append(Segment(start, end, "".join(text).strip()))
        emit("reply", Reply(" ".join(s.text for s in segments if s.text)))

    run = Run(api, produce, request)
    first = await run.start()  # 429 when the queue is full; a refused window is its error
    try:
        await run.collect(first)
    finally:
        run.cancel()  # a client gone before the end stops the generation at its next token
    return segments, usages


# -- the answer in each format ------------------------------------------------------------------

def _response(response_format: str, task: str, language: str, duration: float, text: str,
              segments: list[Segment], temperature: float) -> Response:
    usage = {"type": "duration", "seconds": round(duration, 3)}
    if response_format == "json":
        return JSONResponse({"text": text, "usage": usage})
    if response_format == "text":
        return PlainTextResponse(text)
    if response_format == "srt":
        return PlainTextResponse(srt(segments))
    if response_format == "vtt":
        return PlainTextResponse(vtt(segments))
    return JSONResponse({
        "task": task, "language": language, "duration": round(duration, 3), "text": text,
        "segments": [{"id": i, "seek": round(s.start * 100), "start": round(s.start, 3), "end": round(s.end, 3),
                      "text": s.text, "temperature": temperature} for i, s in enumerate(segments)],
        "usage": usage})


def srt(segments: list[Segment]) -> str:
    """SubRip subtitles: numbered cues, `HH:MM:SS,mmm --> HH:MM:SS,mmm`; windows without text left out."""
    cues = [s for s in segments if s.text]
    return "".join(f"{n}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text}\n\n"
                   for n, s in enumerate(cues, 1))


def vtt(segments: list[Segment]) -> str:
    """WebVTT subtitles: a `WEBVTT` header, then `HH:MM:SS.mmm --> HH:MM:SS.mmm` cues."""
    return "WEBVTT\n\n" + "".join(f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text}\n\n"
                                  for s in segments if s.text)


def _timestamp(seconds: float, decimal_mark: str) -> str:
    ms = round(seconds * 1000)
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_mark}{ms:03d}"
