"""One engine, many callers: a first-come-first-served queue in front of it.

    queued = EngineQueue(engine, max_waiting=16)
    queued.generate(messages, sampling)         # waits its turn; QueueFull when too many wait

The web page and the HTTP API share one engine and one KV cache. Each request holds the engine
from its first to its last token, in the order the requests came, so two conversations never
interleave inside one generation; a request that finds `max_waiting` others already waiting is
refused at once (the API answers 429) instead of piling up. Waiting requests hold nothing but
their place in line. `EngineQueue` implements the engine contract, so callers cannot tell it
from the engine.

Between two requests the C heap's free memory is given back to the system (app/memory.py):
decoded images, log-mels and encoder activations are freed after every request, but glibc keeps
them, so a long-running server's resident size would creep up without any leak
(bench/robustness.py's soak: +6-9% over 200 requests, all of it returned by a trim).
"""
from __future__ import annotations

import threading
from collections import deque
from typing import Any, Iterator

from app.engine_api import AUTO, Chunk, Completion, Engine, EngineError, Sampling
from app.memory import give_back_free_memory


class QueueFull(EngineError):
    """Too many requests are already waiting for the engine."""


class EngineQueue:
    """The engine contract, one request at a time, in arrival order."""

    def __init__(self, engine: Engine, max_waiting: int = 16):
        if max_waiting < 0:
            raise ValueError(f"max_waiting must be >= 0, got {max_waiting}")
        self.engine = engine
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._turns: deque[threading.Event] = deque()  # the head holds the engine; the rest wait

    # -- the queue --------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Requests waiting for the engine (not counting the one it serves)."""
        with self._lock:
            return max(len(self._turns) - 1, 0)

    def join(self) -> "Ticket":
        """Take a place in line now; QueueFull at once if `max_waiting` requests already wait."""
        turn = threading.Event()
        with self._lock:
            if len(self._turns) > self.max_waiting:
                raise QueueFull(f"{len(self._turns) - 1} requests are already waiting for the model; try again later")
            self._turns.append(turn)
            if self._turns[0] is turn:
                turn.set()
        return Ticket(self, turn)

    def _leave(self, turn: threading.Event) -> None:
        with self._lock:
            if turn not in self._turns:
                return
            self._turns.remove(turn)
            if self._turns:
                self._turns[0].set()
        give_back_free_memory()  # ~2 ms, on the thread that is done, while the next request starts

    # -- the engine contract ----------------------------------------------------------------

    @property
    def modalities(self) -> frozenset[str]:
        return self.engine.modalities

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    @property
    def constraints(self) -> frozenset[str]:
        return self.engine.constraints

    def count_tokens(self, part: dict[str, Any]) -> int:
        return self.engine.count_tokens(part)  # no generation: needs no turn

    def generate(self, messages: list[dict[str, Any]] | str, sampling: Sampling = Sampling(), *,
                 adapter: str | None = AUTO) -> Completion:
        with self.join() as ticket:
            ticket.wait()
            return self.engine.generate(messages, sampling, adapter=adapter)

    def stream(self, messages: list[dict[str, Any]] | str, sampling: Sampling = Sampling(), *,
               adapter: str | None = AUTO) -> Iterator[Chunk]:
        """Like the engine's; the place in line is taken when the stream is first read."""
        with self.join() as ticket:
            ticket.wait()
            yield from self.engine.stream(messages, sampling, adapter=adapter)

    def close(self) -> None:
        self.engine.close()


class Ticket:
    """A place in an EngineQueue's line; leave it (or use `with`) when done."""

    def __init__(self, queue: EngineQueue, turn: threading.Event):
        self.queue, self._turn = queue, turn

    def wait(self, cancel: threading.Event | None = None) -> None:
        """Block until it is this ticket's turn; EngineError if `cancel` is set first."""
        while not self._turn.wait(0.05):
            if cancel is not None and cancel.is_set():
                self.leave()
                raise EngineError("the request was cancelled while it waited for the model")

    def leave(self) -> None:
        self.queue._leave(self._turn)  # a second call does nothing

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, *exc: object) -> None:
        self.leave()

