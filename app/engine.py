"""The engine: Phi-4-multimodal on llama.cpp, with a mixture of LoRAs and injected embeddings.

    engine = Engine.load("~/.cache/phi4mm/models/phi-4-multimodal-q4_k_m")
    for piece in engine.generate([{"role": "user", "content": "Hi"}], stream=True):
        print(piece, end="")

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
import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from app.llama_backend import LlamaContext, LlamaModel, Sampler
from app.prompt import AUDIO, IMAGE, ChatTemplate, Media, Prompt, PromptError

MANIFEST = "manifest.json"
AUTO = "auto"


class EngineError(RuntimeError):
    """A request the engine cannot serve; the message says why."""


class ContextFull(EngineError):
    pass


@dataclass
class Timings:
    """What the last request cost, for the UI and the benchmarks."""
    adapter: str | None = None
    prompt_tokens: int = 0
    reused_tokens: int = 0        # prompt positions already in the KV cache
    encoder_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0          # request start -> first token sampled
    decode_tokens: int = 0
    decode_ms: float = 0.0
    finish_reason: str = ""       # "stop", "length", or "context"

    @property
    def prefill_tokens_per_s(self) -> float:
        n = self.prompt_tokens - self.reused_tokens
        return n / (self.prefill_ms / 1000) if self.prefill_ms > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / (self.decode_ms / 1000) if self.decode_ms > 0 else 0.0


@dataclass
class _Segment:
    """A run of prompt positions: token ids, or embedding rows standing in for placeholders."""
    keys: list          # one hashable key per position (a token id, or (digest, row))
    tokens: list[int] | None = None
    rows: np.ndarray | None = None


@dataclass
class _Window:
    """A llama.cpp context and what its KV cache holds."""
    ctx: LlamaContext
    keys: list = field(default_factory=list)            # one key per cached position
    segments: list = field(default_factory=list)        # the same positions, decodable again
    adapters: tuple[str, ...] = ()


def _common_prefix(a: Sequence, b: Sequence) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Engine:
    def __init__(self, model: LlamaModel, manifest: dict | None, folder: Path | None, n_ctx: int,
                 n_batch: int, n_threads: int, kv_type: str):
        self.model = model
        self.manifest = manifest or {}
        self.folder = folder
        self.n_threads = n_threads
        self._n_batch = n_batch
        self._kv_type = kv_type
        # A plain Lock: a streamed answer may be resumed (and finished) on another thread than it began.
        self._lock = threading.Lock()
        self.last = Timings()
        self.last_token_ids: list[int] = []  # the last completion's tokens (tests, debugging)

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
        self.n_ctx = n_ctx
        self._short = _Window(LlamaContext(model, min(n_ctx, self.original_context), n_batch, n_threads, kv_type))
        self._long: _Window | None = None  # made when a conversation first outgrows the short window

        placeholders = self.manifest.get("placeholders", {})
        self._placeholder_ids = {kind: int(p["id"]) for kind, p in placeholders.items()}
        self.vision = None
        self.speech = None
        self._embedding_cache: OrderedDict[str, np.ndarray] = OrderedDict()

    # -- loading --------------------------------------------------------------------------

    @classmethod
    def load(cls, model_dir: str | os.PathLike, n_ctx: int = 4096, n_threads: int | None = None,
             n_batch: int = 512, kv_type: str = "f16", verbose: bool = False) -> "Engine":
        """Open a converted folder (manifest.json + GGUFs), or a single text-only .gguf file."""
        path = Path(model_dir).expanduser()
        n_threads = n_threads or os.cpu_count() or 1
        if path.is_file() and path.suffix == ".gguf":
            return cls(LlamaModel(path, verbose), None, None, n_ctx, n_batch, n_threads, kv_type)
        if not path.is_dir():
            raise FileNotFoundError(f"no model at {path}")
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            raise EngineError(f"{path} has no {MANIFEST}: not a converted model folder, or the conversion did "
                              f"not finish (run: python -m convert CHECKPOINT {path})")
        manifest = json.loads(manifest_path.read_text())
        files = manifest.get("files", {})
        model = LlamaModel(path / files["backbone"], verbose)
        for name, file in files.get("lora", {}).items():
            model.load_adapter(name, path / file)
        engine = cls(model, manifest, path, n_ctx, n_batch, n_threads, kv_type)
        engine._load_encoders(files)
        return engine

    def _load_encoders(self, files: dict) -> None:
        if files.get("vision_encoder"):
            from model.vision_encoder import VisionEncoder
            self.vision = VisionEncoder.load(self.folder / files["vision_encoder"])
        if files.get("audio_encoder"):
            from model.speech_encoder import SpeechEncoder
            self.speech = SpeechEncoder.load(self.folder / files["audio_encoder"])

    @property
    def adapters(self) -> list[str]:
        return sorted(self.model.adapters)

    @property
    def modalities(self) -> set[str]:
        """What this model folder can read besides text."""
        return {kind for kind, enc in ((IMAGE, self.vision), (AUDIO, self.speech)) if enc is not None}

    def close(self) -> None:
        for window in (self._short, self._long):
            if window is not None:
                window.ctx.close()
        self.model.close()

    # -- prompt -> positions --------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text)

    def _embed(self, media: Media, prompt: Prompt) -> tuple[str, np.ndarray]:
        """Encode one image or audio item (cached by content, so later turns reuse it)."""
        if media.kind == IMAGE:
            if self.vision is None:
                raise EngineError("this model has no vision encoder: it cannot read images")
            image = media.value
            options = {"max_crops": media.options.get("max_crops")}
            raw = image.tobytes() + repr((image.mode, image.size, options)).encode()
        else:
            if self.speech is None:
                raise EngineError("this model has no speech encoder: it cannot hear audio")
            samples, rate = media.value
            # image+audio prompts project audio with the vision-speech head (phi4mm.md §4.3)
            options = {"mode": "vision" if IMAGE in prompt.modalities else "speech"}
            raw = np.ascontiguousarray(samples).tobytes() + repr((int(rate), options)).encode()
        digest = hashlib.sha1(raw).hexdigest()
        rows = self._embedding_cache.get(digest)
        if rows is None:
            if media.kind == IMAGE:
                rows = self.vision.embed(media.value, max_crops=options["max_crops"])
            else:
                from model.audio_io import to_model_audio
                rows = self.speech.embed(to_model_audio(samples, int(rate)), mode=options["mode"])
            self._embedding_cache[digest] = rows
            while len(self._embedding_cache) > 16:
                self._embedding_cache.popitem(last=False)
        self._embedding_cache.move_to_end(digest)
        return digest, rows

    def _segments(self, prompt: Prompt) -> tuple[list[_Segment], float]:
        segments, encoder_s = [], 0.0
        first_text = True
        for piece in prompt.pieces:
            if isinstance(piece, str):
                tokens = self.model.tokenize(piece, add_bos=first_text and self.model.add_bos)
                first_text = False
                if tokens:
                    segments.append(_Segment(keys=list(tokens), tokens=tokens))
            else:
                t0 = time.perf_counter()
                digest, rows = self._embed(piece, prompt)
                encoder_s += time.perf_counter() - t0
                segments.append(_Segment(keys=[(digest, i) for i in range(len(rows))], rows=rows))
        if not segments:
            raise PromptError("the prompt is empty")
        return segments, encoder_s

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
            self._long = _Window(LlamaContext(self.model, self.n_ctx, self._n_batch, self.n_threads, self._kv_type))
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

    def _start(self, messages: list[dict], adapter: str | None) -> tuple[_Window, tuple, Timings]:
        t0 = time.perf_counter()
        prompt = self.template.build(messages)
        adapters = self._resolve_adapter(prompt, adapter)
        segments, encoder_s = self._segments(prompt)
        n = sum(len(s.keys) for s in segments)
        window = self._window_for(n)
        t1 = time.perf_counter()
        reused = self._prefill(window, segments, adapters)
        timings = Timings(adapter=adapters[0] if adapters else None, prompt_tokens=n, reused_tokens=reused,
                          encoder_ms=encoder_s * 1000, prefill_ms=(time.perf_counter() - t1) * 1000)
        timings.ttft_ms = (time.perf_counter() - t0) * 1000
        return window, adapters, timings

    # -- public API -----------------------------------------------------------------------

    def next_token_logits(self, messages: list[dict], adapter: str | None = AUTO) -> np.ndarray:
        """Logits (float32, n_vocab) for the token after the rendered prompt."""
        with self._lock:
            window, _, self.last = self._start(messages, adapter)
            return window.ctx.logits()

    def generate(self, messages: list[dict], max_tokens: int = 512, temperature: float = 0.0,
                 top_p: float = 1.0, top_k: int = 0, stop: Sequence[str] | None = None, stream: bool = False,
                 grammar: str | None = None, seed: int | None = None, adapter: str | None = AUTO):
        """Complete the conversation. Returns the text, or an iterator of text pieces if `stream`.

        Generation ends at the model's end-of-turn token, a `stop` string (neither is
        returned), `max_tokens`, or a full context. `grammar` (llama.cpp GBNF) constrains
        the output. `adapter` forces a LoRA ("vision", "speech", None) instead of the rule.
        """
        if max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        pieces = self._generate(messages, max_tokens, temperature, top_p, top_k, list(stop or []),
                                grammar, seed, adapter)
        return pieces if stream else "".join(pieces)

    def _generate(self, messages, max_tokens, temperature, top_p, top_k, stops, grammar, seed,
                  adapter) -> Iterator[str]:
        with self._lock:
            t0 = time.perf_counter()
            window, adapters, timings = self._start(messages, adapter)
            self.last = timings
            sampler = Sampler(self.model, temperature, top_p, top_k, seed, grammar)
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            text, emitted, stopped_by_string = "", 0, False
            self.last_token_ids = generated = []
            longest_stop = max((len(s) for s in stops), default=0)
            timings.finish_reason = "length"
            t_decode = time.perf_counter()
            try:
                for step in range(max_tokens):
                    token = sampler.sample(window.ctx)
                    if step == 0:
                        timings.ttft_ms = (time.perf_counter() - t0) * 1000
                        t_decode = time.perf_counter()
                    if self.model.is_end_of_generation(token):
                        timings.finish_reason = "stop"
                        break
                    timings.decode_tokens += 1
                    generated.append(token)
                    text += decoder.decode(self.model.token_text(token))
                    hits = [i for i in (text.find(s, max(emitted - longest_stop, 0)) for s in stops) if i >= 0]
                    if hits:
                        if min(hits) > emitted:
                            yield text[emitted:min(hits)]
                        emitted, stopped_by_string = len(text), True
                        timings.finish_reason = "stop"
                        break
                    # hold back a tail that could still grow into a stop string
                    held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
                    if len(text) - held > emitted:
                        yield text[emitted:len(text) - held]
                        emitted = len(text) - held
                    if step + 1 < max_tokens:
                        window = self._feed(window, token, adapters)
            except ContextFull:
                timings.finish_reason = "context"
            finally:
                sampler.close()
                timings.decode_ms = (time.perf_counter() - t_decode) * 1000
            if not stopped_by_string and len(text) > emitted:
                yield text[emitted:]

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
