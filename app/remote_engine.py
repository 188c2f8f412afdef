"""The engine contract over an OpenAI-compatible server: a vLLM cluster, our own `python -m app.api`,
or any server of the chat-completions API.

    engine = connect("http://gpu-box:8000/v1", api_key="...")        # checks the server at once
    for chunk in engine.stream(messages, Sampling(max_tokens=200)):  # as with the local engine
        print(chunk.text, end="")

Images go as `image_url` data URLs, audio as `input_audio` (a float WAV: nothing is lost in
transit), text as text. The mixture of LoRAs is kept: vLLM serves each LoRA as a model name
(`--lora-modules vision=... speech=...`), so the request's `model` is the base model for text, the
vision adapter for a prompt with an image, the speech adapter for audio alone (the same rule as
the local engine; the names are settable). Our own server applies the rule itself, so it is sent
the base model's name, and a few extensions that make its prompts exactly the local engine's (the
tools' declaration in the system message's template slot, an image's crop count, a GBNF grammar).

The prompt format is the model's own: tool calls are read by our agent loop on the client, from
the markup the model writes (which a vLLM server is asked not to strip), so no server-side tool
parser is needed. Usage comes back from the server; the time to first token and the decode speed
are measured here. Rate limits and restarts (429, 503) are retried with backoff, honouring
Retry-After (the `openai` client's own retries); an unreachable server, a wrong key or a model
name the server does not serve is one clear error.
"""
from __future__ import annotations

import base64
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from app import media
from app.engine_api import (
    AUDIO,
    AUTO,
    GBNF,
    IMAGE,
    JSON_SCHEMA,
    Chunk,
    Completion,
    ContextFull,
    EngineError,
    PromptError,
    Sampling,
    Usage,
    adapter_for,
    collect,
)

OUR_SERVER = "phi4mm-local"  # what our own API puts in `owned_by`
LLAMA_CPP_SERVER = "me"      # what llama-cpp-python's server puts there
DEFAULT_CONTEXT = 8192       # when the server does not say
AUDIO_FILE_FORMATS = {".wav": "wav", ".mp3": "mp3", ".flac": "flac", ".ogg": "ogg"}


@dataclass(frozen=True)
class RemoteModels:
    """The model name to ask for each LoRA (None: the base model's)."""
    text: str | None = None
    vision: str | None = None
    speech: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "RemoteModels":
        """'text=phi4,vision=vision,speech=speech' (any subset)."""
        names: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in spec.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in ("text", "vision", "speech") or not value:
                raise ValueError(f"--remote-models takes text=NAME,vision=NAME,speech=NAME; got {item!r}")
            names[key] = value
        return cls(**names)


def connect(url: str, api_key: str | None = None, models: RemoteModels | None = None, *,
            timeout: float = 600, max_retries: int = 3) -> "RemoteEngine":
    """A RemoteEngine on `url` (".../v1"), after checking that the server answers and serves the models."""
    return RemoteEngine(url, api_key, models, timeout=timeout, max_retries=max_retries)


class RemoteEngine:
    """The engine contract (app/engine_api.py) over the OpenAI chat-completions API."""

    def __init__(self, url: str, api_key: str | None = None, models: RemoteModels | None = None, *,
                 timeout: float = 600, max_retries: int = 3):
        import openai

        self.url = url.rstrip("/")
        self._openai = openai
        self.client = openai.OpenAI(base_url=self.url, api_key=api_key or os.environ.get("PHI4MM_BACKEND_KEY")
                                    or "unused", timeout=timeout, max_retries=max_retries)
        served = self._served_models()
        first = served[0]
        self.ours = getattr(first, "owned_by", None) == OUR_SERVER
        self.llama_cpp = getattr(first, "owned_by", None) == LLAMA_CPP_SERVER
        extra = first.model_extra or {}
        models = models or RemoteModels()
        base = models.text or first.id
        self.models = RemoteModels(text=base, vision=models.vision or ("vision" if self._has(served, "vision") else None),
                                   speech=models.speech or ("speech" if self._has(served, "speech") else None))
        missing = [name for name in (self.models.text, models.vision, models.speech)
                   if name and not self._has(served, name)]
        if missing:
            raise EngineError(f"{self.url} does not serve {', '.join(map(repr, missing))}; it serves "
                              f"{', '.join(repr(m.id) for m in served)} (set the names with --remote-models)")
        self._n_ctx = int(extra.get("context_length") or extra.get("max_model_len") or DEFAULT_CONTEXT)
        if self.ours:
            self._modalities = frozenset(m for m in extra.get("modalities", []) if m in (IMAGE, AUDIO))
        else:  # a LoRA per modality is what lets the model read it
            self._modalities = frozenset(kind for kind, name in ((IMAGE, self.models.vision),
                                                                 (AUDIO, self.models.speech)) if name)

    @staticmethod
    def _has(served: list, name: str) -> bool:
        return any(m.id == name for m in served)

    def _served_models(self) -> list:
        try:
            # no retries here: a server that is not there at start should be said at once
            served = list(self.client.with_options(max_retries=0).models.list())
        except self._openai.AuthenticationError:
            raise EngineError(f"{self.url} refused the API key (pass it with --backend-key, or "
                              f"PHI4MM_BACKEND_KEY)") from None
        except self._openai.APIConnectionError as e:
            raise EngineError(f"cannot reach {self.url}: {e.__cause__ or e}") from None
        except self._openai.APIStatusError as e:
            raise EngineError(f"{self.url}/models answered {e.status_code}: {_message(e)}") from None
        if not served:
            raise EngineError(f"{self.url} serves no model")
        return served

    # -- the contract -----------------------------------------------------------------------

    @property
    def modalities(self) -> frozenset[str]:
        return self._modalities

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def constraints(self) -> frozenset[str]:
        # Our server and llama-cpp-python's take a GBNF grammar (the latter no json_schema
        # response_format); vLLM and OpenAI a JSON schema.
        if self.ours:
            return frozenset({GBNF, JSON_SCHEMA})
        return frozenset({GBNF}) if self.llama_cpp else frozenset({JSON_SCHEMA})

    def count_tokens(self, part: dict[str, Any]) -> int:
        """The processor's own formulas, computed here (no encoder needed); text is an estimate."""
        from model.audio_features import num_audio_tokens
        from model.image_crops import DEFAULT_MAX_CROPS, num_image_tokens

        kind = part.get("type")
        if kind == "text":
            return max(1, len(str(part.get("text", "")).encode()) // 4)
        if kind not in self._modalities:
            raise EngineError(f"the model at {self.url} cannot read {kind}")
        if kind == IMAGE:
            value = part[IMAGE]
            width, height = value.size if hasattr(value, "size") and not isinstance(value, (str, os.PathLike)) \
                else media.image_size(value)
            return num_image_tokens(width, height, part.get("max_crops") or DEFAULT_MAX_CROPS)
        value = part[AUDIO]
        seconds = len(value[0]) / value[1] if isinstance(value, tuple) else media.audio_duration(value)
        return num_audio_tokens(round(seconds * 16_000))

    def generate(self, messages: list[dict[str, Any]] | str, sampling: Sampling = Sampling(), *,
                 adapter: str | None = AUTO) -> Completion:
        return collect(self.stream(messages, sampling, adapter=adapter))

    def stream(self, messages: list[dict[str, Any]] | str, sampling: Sampling = Sampling(), *,
               adapter: str | None = AUTO) -> Iterator[Chunk]:
        if isinstance(messages, str):
            raise PromptError("a remote engine takes messages, not a raw prompt")
        request = self.request(messages, sampling, adapter)
        return self._stream(request, request.pop("_adapter"))

    def close(self) -> None:
        self.client.close()

    # -- one request --------------------------------------------------------------------------

    def request(self, messages: list[dict[str, Any]], sampling: Sampling, adapter: str | None = AUTO) -> dict:
        """The chat-completions request for these messages (the body the server receives, less
        `stream`; `_adapter` says which LoRA it asks for)."""
        kinds = {p.get("type") for m in messages if isinstance(m.get("content"), list) for p in m["content"]
                 if isinstance(p, dict)}
        chosen = adapter_for(frozenset(kinds) & {IMAGE, AUDIO}) if adapter == AUTO else adapter
        model = self.models.text
        if not self.ours and chosen is not None:  # vLLM: the LoRA is a model name
            model = getattr(self.models, chosen) or model
        body: dict[str, Any] = {"model": model, "messages": [self._message(m, i) for i, m in enumerate(messages)],
                                "max_tokens": max(1, sampling.max_tokens), "temperature": sampling.temperature,
                                "top_p": sampling.top_p}
        extra: dict[str, Any] = {}
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if sampling.stop:
            body["stop"] = list(sampling.stop)
        if sampling.top_k:
            extra["top_k"] = sampling.top_k
        if sampling.grammar is not None:
            if GBNF not in self.constraints:
                raise EngineError(f"the server at {self.url} takes no GBNF grammar; use a JSON schema")
            extra["grammar"] = sampling.grammar
        if sampling.json_schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "output", "schema": sampling.json_schema}}
        if self.llama_cpp:
            # its own defaults (repeat penalty 1.1, min-p 0.05, top-k 40) would change the answer
            extra.update(repeat_penalty=1.0, min_p=0.0, top_k=sampling.top_k)
        elif not self.ours:
            extra["skip_special_tokens"] = False  # the tool-call markup must come back (vLLM)
            if messages and messages[-1].get("role") == "assistant":
                extra.update(continue_final_message=True, add_generation_prompt=False)  # vLLM
        if extra:
            body["extra_body"] = extra
        body["_adapter"] = chosen
        return body

    def _message(self, message: dict[str, Any], index: int) -> dict[str, Any]:
        out: dict[str, Any] = {"role": message["role"]}
        if message["role"] == "tool":
            # The calls are the model's own markup, not OpenAI tool_calls, so there is no id to
            # answer; servers that insist on one (llama-cpp-python's) get a stable stand-in.
            out["tool_call_id"] = message.get("tool_call_id") or f"call_{index}"
        content = message.get("content") or ""
        out["content"] = content if isinstance(content, str) else [self._part(p) for p in content]
        if message.get("tools") is not None:
            tools = message["tools"] if isinstance(message["tools"], str) else _json(message["tools"])
            if self.ours:
                out["tools"] = tools  # our server places it in the template's own slot
            else:  # Phi-4's template writes the declaration after the system text: so do we
                out["content"] = f"{out['content']}<|tool|>{tools}<|/tool|>"
        return out

    def _part(self, part: Any) -> dict[str, Any]:
        if isinstance(part, str):
            return {"type": "text", "text": part}
        kind = part.get("type")
        if kind == "text":
            return {"type": "text", "text": str(part.get("text", ""))}
        if kind == IMAGE:
            max_crops = part.get("max_crops")
            url = {"url": _image_data_url(part[IMAGE]), "detail": "low" if max_crops == 1 else "auto"}
            if self.ours and max_crops:
                url["max_crops"] = max_crops
            return {"type": "image_url", "image_url": url}
        if kind == AUDIO:
            data, fmt = _audio_data(part[AUDIO])
            return {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}
        raise PromptError(f"unknown content type {kind!r} (text, image, audio)")

    def _stream(self, request: dict[str, Any], adapter: str | None) -> Iterator[Chunk]:
        t0 = time.perf_counter()
        try:
            stream = self.client.chat.completions.create(**request, stream=True,
                                                         stream_options={"include_usage": True})
        except self._openai.APIStatusError as e:
            raise _engine_error(e, self.url) from None
        except self._openai.APIConnectionError as e:
            raise EngineError(f"cannot reach {self.url}: {e.__cause__ or e}") from None
        first = last = None
        finish_reason, server_usage, timings, pieces = "stop", None, {}, 0
        try:
            for chunk in stream:
                if chunk.usage is not None:
                    server_usage, timings = chunk.usage, (chunk.model_extra or {}).get("timings") or {}
                for choice in chunk.choices:
                    if choice.delta.content:
                        now = time.perf_counter()
                        first = first or now
                        last = now
                        pieces += 1
                        yield Chunk(choice.delta.content)
                    if choice.finish_reason:
                        finish_reason = choice.finish_reason
        except self._openai.APIConnectionError as e:  # the stream broke: the server went away
            raise EngineError(f"the server at {self.url} went away mid-answer: {e.__cause__ or e}") from None
        except self._openai.APIError as e:
            raise EngineError(f"the server at {self.url} failed mid-answer: {_message(e)}") from None
        except (OSError, ValueError) as e:  # the connection broke (httpx raises these kinds)
            raise EngineError(f"the server at {self.url} went away mid-answer: {e}") from None
        finally:
            stream.close()
        end = time.perf_counter()
        # A server that reports no usage in a stream (llama-cpp-python's): a piece is about a token.
        completion_tokens = server_usage.completion_tokens if server_usage else pieces
        details = getattr(server_usage, "prompt_tokens_details", None)
        usage = Usage(adapter=timings.get("adapter", adapter), prompt_tokens=server_usage.prompt_tokens if server_usage else 0,
                      cached_tokens=(details.cached_tokens or 0) if details else 0, completion_tokens=completion_tokens,
                      encoder_ms=float(timings.get("encoder_ms", 0.0)),
                      prefill_ms=((first or end) - t0) * 1000, ttft_ms=((first or end) - t0) * 1000,
                      decode_ms=((last or end) - (first or end)) * 1000 if completion_tokens > 1 else 0.0)
        yield Chunk("", {"tool_calls": "stop", "length": "length"}.get(finish_reason, "stop"), usage)


# -- media as data --------------------------------------------------------------------------------

def _image_data_url(value: Any) -> str:
    """A data: URL of the image: a file's own bytes, or a PNG of an image in memory."""
    if isinstance(value, (str, os.PathLike)) or media.is_data(value):
        data = bytes(value) if media.is_data(value) else Path(value).read_bytes()
        kind = media.image_info(data).format.lower()
        return f"data:image/{'jpeg' if kind in ('jpeg', 'mpo') else kind};base64," + base64.b64encode(data).decode()
    buffer = io.BytesIO()
    value.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _audio_data(value: Any) -> tuple[str, str]:
    """(base64, format) of the audio: a file's own bytes where the API names its format, else a
    32-bit float WAV of the samples (lossless, so the server hears what the local engine would)."""
    if isinstance(value, (str, os.PathLike)) and Path(value).suffix.lower() in AUDIO_FILE_FORMATS:
        return base64.b64encode(Path(value).read_bytes()).decode(), AUDIO_FILE_FORMATS[Path(value).suffix.lower()]
    if media.is_data(value):
        fmt = _audio_format(bytes(value))
        if fmt is not None:
            return base64.b64encode(value).decode(), fmt
        value = media.read_audio(value)
    samples, rate = value if isinstance(value, tuple) else media.load_audio_file(value)
    return base64.b64encode(_float_wav(np.asarray(samples, dtype=np.float32), int(rate))).decode(), "wav"


def _audio_format(data: bytes) -> str | None:
    """The API's name of the audio file format of `data` (wav, flac, ogg, mp3), or None."""
    try:
        import soundfile

        name = soundfile.info(io.BytesIO(data)).format
    except Exception:  # not a format libsndfile knows: the caller decodes it
        return None
    return {"WAV": "wav", "WAVEX": "wav", "FLAC": "flac", "OGG": "ogg", "MP3": "mp3", "MPEG": "mp3"}.get(name)


def _float_wav(samples: np.ndarray, rate: int) -> bytes:
    channels = 1 if samples.ndim == 1 else samples.shape[1]
    data = np.ascontiguousarray(samples, dtype="<f4").tobytes()
    fmt = (3).to_bytes(2, "little") + channels.to_bytes(2, "little") + rate.to_bytes(4, "little") + \
        (rate * 4 * channels).to_bytes(4, "little") + (4 * channels).to_bytes(2, "little") + (32).to_bytes(2, "little")
    body = b"WAVE" + b"fmt " + len(fmt).to_bytes(4, "little") + fmt + b"data" + len(data).to_bytes(4, "little") + data
    return b"RIFF" + len(body).to_bytes(4, "little") + body


def _json(value: Any) -> str:
    import json

    return json.dumps(value, ensure_ascii=False)


def _message(error: Any) -> str:
    body = getattr(error, "body", None)
    if isinstance(body, dict):
        body = body.get("error", body)
        if isinstance(body, dict) and body.get("message"):
            return str(body["message"])
    return str(getattr(error, "message", error))


def _engine_error(error: Any, url: str) -> EngineError:
    body = getattr(error, "body", None)
    code = body.get("code") if isinstance(body, dict) else None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        code = body["error"].get("code")
    if code == "context_length_exceeded":
        return ContextFull(_message(error))
    if error.status_code == 401:
        return EngineError(f"{url} refused the API key")
    return EngineError(f"the server at {url} answered {error.status_code}: {_message(error)}")
