"""The engine contract: what an engine offers the conversation core, the agents and the front ends.

    completion = engine.generate(messages, Sampling(max_tokens=200))
    completion.text, completion.finish_reason, completion.usage

    for chunk in engine.stream(messages, Sampling(temperature=0.7)):
        print(chunk.text, end="")      # the last chunk carries finish_reason and usage

Messages have the OpenAI-like shape
    {"role": "user", "content": "..." | [{"type": "text", "text": ...},
                                         {"type": "image", "image": PIL.Image | path | bytes, "max_crops": n},
                                         {"type": "audio", "audio": (samples, sample_rate) | path | bytes}]}
with roles system, user, assistant and tool (bytes: a file's own, which the engine decodes only
once it has counted the prompt against its context). A system message may carry the tools the model can
call and an assistant message its calls, both in the model's own format, written by app.agents.
Instead of messages, a string is a raw prompt: no chat template (OpenAI's /v1/completions). The local llama.cpp engine (app/engine.py) implements this contract; so can an engine that
talks to a server. Everything an answer cost travels with it, in `Usage`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Protocol

from model.format import AUDIO, IMAGE

AUTO = "auto"  # the LoRA chosen by the prompt's modalities (docs/model.md, "Mixture of LoRAs")

# Mixture of LoRAs (docs/model.md, "Mixture of LoRAs"): the prompt's modalities pick one adapter
# for the whole pass: none for text, vision whenever there is an image, speech for audio alone.
ADAPTER_BY_MODALITIES = {
    frozenset(): None,
    frozenset({IMAGE}): "vision",
    frozenset({AUDIO}): "speech",
    frozenset({IMAGE, AUDIO}): "vision",
}

# What an engine can make the model's output follow (`Engine.constraints`).
GBNF = "gbnf"                  # Sampling.grammar: llama.cpp's grammars
JSON_SCHEMA = "json_schema"    # Sampling.json_schema: a JSON schema (structured outputs, guided decoding)

FINISH_REASONS = ("stop", "length", "context")  # end of turn or stop string; max_tokens; a full context


def adapter_for(modalities: frozenset[str]) -> str | None:
    """The LoRA a prompt with these modalities runs under."""
    return ADAPTER_BY_MODALITIES[frozenset(modalities)]


class EngineError(RuntimeError):
    """A request the engine cannot serve; the message says why."""


class ContextFull(EngineError):
    """The conversation does not fit in the engine's context."""


class PromptError(ValueError):
    """Messages the engine cannot render; the message says which and why."""


@dataclass(frozen=True)
class Sampling:
    """Every generation option an engine takes."""
    max_tokens: int = 512
    temperature: float = 0.0       # 0: greedy
    top_p: float = 1.0
    top_k: int = 0                 # 0: off
    seed: int | None = None        # None: a random seed for each request
    stop: tuple[str, ...] = ()     # strings that end the answer (not returned)
    grammar: str | None = None     # llama.cpp GBNF with a `root` rule (engines with GBNF in `constraints`)
    json_schema: dict[str, Any] | None = None  # the answer is JSON valid under it (JSON_SCHEMA engines)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens must be an integer >= 0, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {list(self.stop)!r}")
        if self.grammar is not None and self.json_schema is not None:
            raise ValueError("a grammar and a JSON schema cannot both constrain one answer")

    def but(self, **changes: Any) -> "Sampling":
        """A copy with some options changed."""
        return dataclasses.replace(self, **changes)


@dataclass
class Usage:
    """What a request cost: tokens, where the time went, and the LoRA it ran under."""
    adapter: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0         # prompt positions reused from the KV cache
    completion_tokens: int = 0
    encoder_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0           # request start -> first token sampled
    decode_ms: float = 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / (self.prefill_ms / 1000) if self.prefill_ms > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.completion_tokens / (self.decode_ms / 1000) if self.decode_ms > 0 else 0.0

    def then(self, later: "Usage") -> "Usage":
        """This request followed by `later` in the same answer (a tool call, then the answer).

        Time and generated tokens add up; the time to first token is the first request's; the
        prompt and the LoRA are the last one's (what the context holds now).
        """
        return Usage(adapter=later.adapter, prompt_tokens=later.prompt_tokens, cached_tokens=later.cached_tokens,
                     completion_tokens=self.completion_tokens + later.completion_tokens,
                     encoder_ms=self.encoder_ms + later.encoder_ms, prefill_ms=self.prefill_ms + later.prefill_ms,
                     ttft_ms=self.ttft_ms, decode_ms=self.decode_ms + later.decode_ms)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Usage":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Completion:
    """A whole answer."""
    text: str
    finish_reason: str             # one of FINISH_REASONS
    usage: Usage
    token_ids: list[int] | None = None  # the generated tokens, where the engine knows them


@dataclass(frozen=True)
class Chunk:
    """A piece of a streamed answer. The last chunk has no text of its own necessarily, and
    carries the finish reason and the usage."""
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None


def collect(chunks: Iterable[Chunk]) -> Completion:
    """A stream read to its end, as one Completion."""
    text, last = [], None
    for chunk in chunks:
        text.append(chunk.text)
        last = chunk
    if last is None or last.usage is None:
        raise EngineError("the stream ended without its final chunk")
    return Completion("".join(text), last.finish_reason or "stop", last.usage)


class Engine(Protocol):
    """An engine the conversation core, the agents and the front ends can use."""

    @property
    def modalities(self) -> frozenset[str]:
        """What the model reads besides text: IMAGE, AUDIO."""

    @property
    def n_ctx(self) -> int:
        """The context length in tokens."""

    @property
    def constraints(self) -> frozenset[str]:
        """Which constraints it honours: GBNF, JSON_SCHEMA, both or none."""

    def generate(self, messages: list[dict[str, Any]] | str, sampling: Sampling = Sampling(), *,
                 adapter: str | None = AUTO) -> Completion:
        """Complete the conversation (a last assistant message is continued), or a raw prompt."""

    def stream(self, messages: list[dict[str, Any]] | str, sampling: Sampling = Sampling(), *,
               adapter: str | None = AUTO) -> Iterator[Chunk]:
        """Like `generate`, in chunks; closing the iterator stops the generation."""

    def count_tokens(self, part: dict[str, Any]) -> int:
        """How many prompt tokens one content part costs (text, image with its detail, or audio)."""

    def close(self) -> None:
        """Free what the engine holds."""
