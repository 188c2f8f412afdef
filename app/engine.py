"""The local engine: Phi-4-multimodal on llama.cpp, with a mixture of LoRAs and injected embeddings.

    engine = LocalEngine.load("~/.cache/phi4mm/models/phi-4-multimodal-q4_k_m")
    for chunk in engine.stream([{"role": "user", "content": "Hi"}], Sampling(max_tokens=100)):
        print(chunk.text, end="")

It implements the engine contract of app/engine_api.py.

A request renders the messages with the model's chat template, encodes its images and
audio with the numpy encoders (model/), picks the LoRA the prompt's modalities call for,
prefills only what the KV cache does not already hold under that LoRA, and samples.

Longrope: llama.cpp chooses the short or long rope factors by the size of the context it
allocates, the reference by the length of the sequence. So the engine keeps a context of
exactly `original_context_length` tokens (short factors) and moves a conversation that
outgrows it into a second, larger context (long factors), prefilled again, as the
reference recomputes its cache when it crosses that length.
"""
from __future__ import annotations

import codecs
import hashlib
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
from PIL import Image

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
)
from app.llama_backend import LlamaContext, LlamaModel, Sampler, json_schema_grammar
from app.memory import give_back_free_memory
from app.prompt import ChatTemplate, Media, Prompt, Text
from model.audio_io import to_model_audio
from model.format import Manifest, ManifestError, read_manifest

# Images and clips whose embeddings are kept for later turns: at most this many, and this much
# memory (a 36-crop image is ~3,000 rows of 3,072 floats: 37 MB).
EMBEDDING_CACHE_ITEMS = 16
EMBEDDING_CACHE_BYTES = 256 * 2**20


@dataclass
class _Segment:
    """A run of prompt positions: token ids, or embedding rows standing in for placeholders."""
    keys: list          # one hashable key per position (a token id, or (digest, row))
    tokens: list[int] | None = None
    rows: np.ndarray | None = None


@dataclass
class _MediaInput:
    """An image or audio item read and counted, not yet encoded."""
    digest: str          # of its content and options: the embedding cache's key
    kind: str
    value: Any           # the PIL image, or the 16 kHz mono samples
    options: dict
    n_tokens: int


@dataclass
class _Window:
    """A llama.cpp context and what its KV cache holds."""
    ctx: LlamaContext
    keys: list = field(default_factory=list)            # one key per cached position
    segments: list = field(default_factory=list)        # the same positions, decodable again
    adapters: tuple[str, ...] = ()


def _image_of(value: Any) -> Image.Image:
    """An image part's value: a PIL image as it is, a file's bytes decoded, a file through the
    media reader's cache."""
    if isinstance(value, Image.Image):
        return value
    return media.read_image(value) if media.is_data(value) else media.load_image_file(value)


def _audio_of(value: Any) -> tuple[np.ndarray, int]:
    """An audio part's value: (samples, sample_rate) as it is, a file's bytes decoded, a file
    through the media reader's cache."""
    if isinstance(value, tuple):
        return value
    return media.read_audio(value) if media.is_data(value) else media.load_audio_file(value)


def _audio_seconds(value: Any) -> float:
    if isinstance(value, tuple):
        samples, rate = value
        return len(samples) / rate
    return media.audio_duration(value)


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class LocalEngine:
    """The engine contract (app/engine_api.py) on llama.cpp, with the numpy encoders."""

    def __init__(self, model: LlamaModel, manifest: Manifest | None, n_ctx: int, n_batch: int, n_threads: int,
                 kv_type: str, flash_attn: bool = False):
        self.model = model
        self.manifest = manifest  # None for a single text-only GGUF
        self.n_threads = n_threads
        self._n_batch = n_batch
        self._kv_type = kv_type
        self._flash_attn = flash_attn
        # A plain Lock: a streamed answer may be resumed (and finished) on another thread than it began.
        self._lock = threading.Lock()

        template = model.chat_template()
        if not template:
            raise EngineError(f"{model.path} has no chat template (tokenizer.chat_template)")
        eos = model.meta("tokenizer.ggml.eos_token_id")
        bos = model.meta("tokenizer.ggml.bos_token_id")
        self.template = ChatTemplate(
            template,
            bos_token=model.token_text(int(bos)).decode("utf-8", "replace") if bos else "",
            eos_token=model.token_text(int(eos)).decode("utf-8", "replace") if eos else "")

        n_ctx = max(16, min(n_ctx, model.n_ctx_train))
        arch = model.meta("general.architecture") or ""
        original = model.meta(f"{arch}.rope.scaling.original_context_length")
        self.original_context = int(original) if original else n_ctx
        self._n_ctx = n_ctx
        self._short = _Window(self._context(min(n_ctx, self.original_context)))
        self._long: _Window | None = None  # made when a conversation first outgrows the short window

        self.vision = None
        self.speech = None
        self._embedding_cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def _context(self, n_ctx: int) -> LlamaContext:
        return LlamaContext(self.model, n_ctx, self._n_batch, self.n_threads, self._kv_type, self._flash_attn)

    # -- loading --------------------------------------------------------------------------

    @classmethod
    def load(cls, model_dir: str | os.PathLike, n_ctx: int = 4096, n_threads: int | None = None,
             n_batch: int = 512, kv_type: str = "f16", verbose: bool = False,
             flash_attn: bool = False) -> "LocalEngine":
        """Open a converted folder (manifest.json + GGUFs), or a single text-only .gguf file.
        `flash_attn`: llama.cpp's fused attention kernel (faster prefill on some CPUs; off by default)."""
        path = Path(model_dir).expanduser()
        n_threads = n_threads or os.cpu_count() or 1
        if path.is_file() and path.suffix == ".gguf":
            return cls(LlamaModel(path, verbose), None, n_ctx, n_batch, n_threads, kv_type, flash_attn)
        if not path.is_dir():
            raise FileNotFoundError(f"no model at {path}")
        try:
            manifest = read_manifest(path)
        except ManifestError as e:
            raise EngineError(str(e)) from None
        model = LlamaModel(manifest.backbone, verbose)
        for name, file in manifest.loras.items():
            model.load_adapter(name, file)
        engine = cls(model, manifest, n_ctx, n_batch, n_threads, kv_type, flash_attn)
        if manifest.vision_encoder:
            from model.vision_encoder import VisionEncoder
            engine.vision = VisionEncoder.load(manifest.vision_encoder)
        if manifest.audio_encoder:
            from model.speech_encoder import SpeechEncoder
            engine.speech = SpeechEncoder.load(manifest.audio_encoder)
        # Loading widened every encoder tensor to float32 (and fused q, k and v): the freed
        # intermediates, 1.7 GB at the real shapes, would stay resident.
        give_back_free_memory()
        return engine

    @property
    def adapters(self) -> list[str]:
        return sorted(self.model.adapters)

    @property
    def modalities(self) -> frozenset[str]:
        """What this model folder can read besides text."""
        return frozenset(kind for kind, enc in ((IMAGE, self.vision), (AUDIO, self.speech)) if enc is not None)

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def constraints(self) -> frozenset[str]:
        return frozenset({GBNF, JSON_SCHEMA})

    def close(self) -> None:
        for window in (self._short, self._long):
            if window is not None:
                window.ctx.close()
        self.model.close()

    # -- prompt -> positions --------------------------------------------------------------

    def tokenize(self, text: str, special: bool = True) -> list[int]:
        """Text -> token ids; with `special`, special tokens written in the text are parsed as such."""
        return self.model.tokenize(text, special=special)

    def _prepare(self, item: Media, prompt: Prompt) -> _MediaInput:
        """Read an image or audio item and count its tokens: cheap, before anything is encoded."""
        if item.kind == IMAGE:
            if self.vision is None:
                raise EngineError("this model has no vision encoder: it cannot read images")
            image = _image_of(item.value)
            max_crops = item.options.get("max_crops")
            raw = image.tobytes() + repr((image.mode, image.size, max_crops)).encode()
            return _MediaInput(hashlib.sha1(raw).hexdigest(), IMAGE, image, {"max_crops": max_crops},
                               self.vision.num_tokens(*image.size, max_crops))
        if self.speech is None:
            raise EngineError("this model has no speech encoder: it cannot hear audio")
        samples, rate = _audio_of(item.value)
        # image+audio prompts project audio with the vision-speech head (docs/model.md, "Speech encoder")
        options = {"mode": "vision" if IMAGE in prompt.modalities else "speech"}
        raw = np.ascontiguousarray(samples).tobytes() + repr((int(rate), options)).encode()
        clip = to_model_audio(samples, int(rate))  # ValueError for non-finite or unusable samples
        try:
            n = self.speech.num_tokens(len(clip))
        except ValueError as e:
            raise PromptError(f"an audio clip of {len(clip)} samples at 16 kHz is too short: {e}") from None
        return _MediaInput(hashlib.sha1(raw).hexdigest(), AUDIO, clip, options, n)

    def _encode(self, item: _MediaInput) -> np.ndarray:
        """The item's embedding rows, cached by content so later turns reuse them."""
        rows = self._embedding_cache.get(item.digest)
        if rows is None:
            if item.kind == IMAGE:
                rows = self.vision.embed(item.value, max_crops=item.options["max_crops"])
            else:
                rows = self.speech.embed(item.value, mode=item.options["mode"])
            if not np.isfinite(rows).all():
                # Never into the KV cache: a NaN there poisons every later answer on this engine.
                raise EngineError(f"the {item.kind} encoder gave non-finite values for this {item.kind}")
            if len(rows) != item.n_tokens:
                raise EngineError(f"the {item.kind} encoder gave {len(rows)} rows, {item.n_tokens} were counted")
            self._embedding_cache[item.digest] = rows
            while len(self._embedding_cache) > 1 and (
                    len(self._embedding_cache) > EMBEDDING_CACHE_ITEMS
                    or sum(r.nbytes for r in self._embedding_cache.values()) > EMBEDDING_CACHE_BYTES):
                self._embedding_cache.popitem(last=False)
        self._embedding_cache.move_to_end(item.digest)
        return rows

    def _segments(self, prompt: Prompt) -> tuple[list[_Segment], float]:
        """The prompt's positions. Their number is checked against the context twice before any
        image or audio is encoded: first as counted from the media's headers (an image's size, a
        clip's length), before anything is decoded, so that a prompt that cannot fit costs
        neither the decoding of a 64-megapixel image nor the resampling of an hour of audio; then
        exactly, from the decoded media."""
        segments: list[_Segment | None] = []
        pending: list[tuple[int, Media]] = []
        first_text = True
        for piece in prompt.pieces:
            if isinstance(piece, (str, Text)):
                # The template's markup may spell special tokens; text from a message only where
                # it is the assistant's own (app/prompt.py `Text`).
                text, special = (piece, True) if isinstance(piece, str) else (piece.text, piece.special)
                tokens = self.model.tokenize(text, add_bos=first_text and self.model.add_bos, special=special)
                first_text = False
                if tokens:
                    segments.append(_Segment(keys=list(tokens), tokens=tokens))
            else:
                pending.append((len(segments), piece))
                segments.append(None)
        if not segments:
            raise PromptError("the prompt is empty")
        n_text = sum(len(s.keys) for s in segments if s is not None)
        self._window_for(n_text + sum(self.count_tokens({"type": p.kind, p.kind: p.value, **p.options})
                                      for _, p in pending))
        prepared = []
        for index, piece in pending:
            item = self._prepare(piece, prompt)
            prepared.append((index, item))
            segments[index] = _Segment(keys=[(item.digest, i) for i in range(item.n_tokens)])
        self._window_for(sum(len(s.keys) for s in segments))  # ContextFull now, before the encoders run
        t0 = time.perf_counter()
        for index, item in prepared:
            segments[index].rows = self._encode(item)
        return segments, time.perf_counter() - t0

    def _resolve_adapter(self, prompt: Prompt, adapter: str | None) -> tuple[str, ...]:
        name = prompt.adapter if adapter == AUTO else adapter
        if name is None or name == "none":
            return ()
        if name not in self.model.adapters:
            if adapter == AUTO and not self.model.adapters:
                return ()  # a plain text model serves text prompts without adapters
            raise EngineError(f"no {name} LoRA in this model (have: {', '.join(self.adapters) or 'none'})")
        return (name,)

    # -- KV cache -------------------------------------------------------------------------

    def _window_for(self, n_positions: int) -> _Window:
        if n_positions <= self._short.ctx.n_ctx:
            return self._short
        if n_positions > self.n_ctx:
            raise ContextFull(f"the conversation needs {n_positions} tokens but the context holds {self.n_ctx}; "
                              f"start a new chat or load the model with a larger context")
        if self._long is None:
            self._long = _Window(self._context(self.n_ctx))
        return self._long

    def _prefill(self, window: _Window, segments: list[_Segment], adapters: tuple[str, ...]) -> int:
        """Bring the window's cache to exactly these positions; return how many were reused."""
        keys = [k for s in segments for k in s.keys]
        if window.adapters != adapters:
            # K/V computed under one LoRA set are wrong under another: start over.
            window.ctx.set_adapters(adapters)
            window.adapters = adapters
            window.keys = []
            window.ctx.truncate(0)
        reuse = _common_prefix(window.keys, keys)
        if reuse == len(keys):
            reuse -= 1  # re-decode the last position to get its logits
        window.ctx.truncate(reuse)
        window.keys, window.segments = keys[:reuse], []  # what stays true if decoding fails midway
        pos = 0
        for seg in segments:
            end = pos + len(seg.keys)
            if end > reuse:
                start = max(reuse - pos, 0)
                last = end == len(keys)
                if seg.tokens is not None:
                    window.ctx.decode_tokens(seg.tokens[start:], pos + start, want_logits=last)
                else:
                    window.ctx.decode_embeddings(seg.rows[start:], pos + start, want_logits=last)
            pos = end
        window.keys = keys
        window.segments = list(segments)
        return reuse

    def _start(self, messages: list[dict] | str, adapter: str | None) -> tuple[_Window, tuple, Usage]:
        t0 = time.perf_counter()
        # A string is a raw prompt (OpenAI's /v1/completions): no chat template.
        prompt = Prompt([messages]) if isinstance(messages, str) else self.template.build(messages)
        adapters = self._resolve_adapter(prompt, adapter)
        segments, encoder_s = self._segments(prompt)
        n = sum(len(s.keys) for s in segments)
        window = self._window_for(n)
        t1 = time.perf_counter()
        reused = self._prefill(window, segments, adapters)
        usage = Usage(adapter=adapters[0] if adapters else None, prompt_tokens=n, cached_tokens=reused,
                      encoder_ms=encoder_s * 1000, prefill_ms=(time.perf_counter() - t1) * 1000)
        usage.ttft_ms = (time.perf_counter() - t0) * 1000
        return window, adapters, usage

    # -- public API -----------------------------------------------------------------------

    def next_token_logits(self, messages: list[dict], adapter: str | None = AUTO) -> tuple[np.ndarray, Usage]:
        """Logits (float32, n_vocab) for the token after the rendered prompt, and what the prefill cost."""
        with self._lock:
            window, _, usage = self._start(messages, adapter)
            return window.ctx.logits(), usage

    def generate(self, messages: list[dict] | str, sampling: Sampling = Sampling(), *,
                 adapter: str | None = AUTO) -> Completion:
        """Complete the conversation.

        Generation ends at the model's end-of-turn token, a stop string (neither is returned),
        `max_tokens`, or a full context. `adapter` forces a LoRA ("vision", "speech", None)
        instead of the rule.
        """
        token_ids: list[int] = []
        text, last = [], None
        for chunk in self._generate(messages, sampling, adapter, token_ids):
            text.append(chunk.text)
            last = chunk
        return Completion("".join(text), last.finish_reason, last.usage, token_ids)

    def stream(self, messages: list[dict] | str, sampling: Sampling = Sampling(), *,
               adapter: str | None = AUTO) -> Iterator[Chunk]:
        """Like `generate`, in chunks; closing the iterator stops the generation at once."""
        return self._generate(messages, sampling, adapter, [])

    def count_tokens(self, part: dict[str, Any]) -> int:
        """Prompt tokens of one content part, from the loaded encoders' own configuration
        (an image's size and detail, an audio clip's length), without encoding anything."""
        kind = part.get("type")
        if kind == "text":
            return len(self.model.tokenize(str(part.get("text", "")), special=False))
        if kind == IMAGE:
            if self.vision is None:
                raise EngineError("this model has no vision encoder: it cannot read images")
            value = part[IMAGE]
            width, height = value.size if isinstance(value, Image.Image) else media.image_size(value)
            return self.vision.num_tokens(width, height, part.get("max_crops"))
        if kind == AUDIO:
            if self.speech is None:
                raise EngineError("this model has no speech encoder: it cannot hear audio")
            samples = round(_audio_seconds(part[AUDIO]) * self.speech.sample_rate)
            try:
                return self.speech.num_tokens(samples)
            except ValueError as e:
                raise PromptError(f"an audio clip of {samples} samples at 16 kHz is too short: {e}") from None
        raise PromptError(f"unknown content type {kind!r} (text, image, audio)")

    def _generate(self, messages: list[dict] | str, sampling: Sampling, adapter: str | None,
                  token_ids: list[int]) -> Iterator[Chunk]:
        stops = sampling.stop
        with self._lock:
            t0 = time.perf_counter()
            window, adapters, usage = self._start(messages, adapter)
            grammar = sampling.grammar
            if sampling.json_schema is not None:
                grammar = json_schema_grammar(sampling.json_schema)  # ValueError for a schema it cannot enforce
            sampler = Sampler(self.model, sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed, grammar)
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            text, emitted, stopped_by_string = "", 0, False
            longest_stop = max((len(s) for s in stops), default=0)
            finish_reason = "length"
            t_decode = time.perf_counter()
            try:
                for step in range(sampling.max_tokens):
                    token = sampler.sample(window.ctx)
                    if step == 0:
                        usage.ttft_ms = (time.perf_counter() - t0) * 1000
                        t_decode = time.perf_counter()
                    if self.model.is_end_of_generation(token):
                        finish_reason = "stop"
                        break
                    usage.completion_tokens += 1
                    token_ids.append(token)
                    text += decoder.decode(self.model.token_text(token))
                    hits = [i for i in (text.find(s, max(emitted - longest_stop, 0)) for s in stops) if i >= 0]
                    if hits:
                        if min(hits) > emitted:
                            yield Chunk(text[emitted:min(hits)])
                        emitted, stopped_by_string = len(text), True
                        finish_reason = "stop"
                        break
                    # hold back a tail that could still grow into a stop string
                    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
                    if len(text) - held > emitted:
                        yield Chunk(text[emitted:len(text) - held])
                        emitted = len(text) - held
                    if step + 1 < sampling.max_tokens:
                        window = self._feed(window, token, adapters)
            except ContextFull:
                finish_reason = "context"
            finally:
                sampler.close()
                usage.decode_ms = (time.perf_counter() - t_decode) * 1000
            if not stopped_by_string and len(text) > emitted:
                yield Chunk(text[emitted:])
            yield Chunk("", finish_reason, usage)

    def _feed(self, window: _Window, token: int, adapters: tuple[str, ...]) -> _Window:
        """Append a sampled token to the cache, moving to the long window when the short one is full."""
        pos = len(window.keys)
        if pos < window.ctx.n_ctx:
            window.ctx.decode_tokens([token], pos, want_logits=True)
            window.keys.append(token)
            window.segments.append(_Segment(keys=[token], tokens=[token]))
            return window
        target = self._window_for(pos + 1)  # raises ContextFull at the end of the road
        self._prefill(target, window.segments + [_Segment(keys=[token], tokens=[token])], adapters)
        return target
