"""The engine queue: one request at a time, first come first served, a bounded line."""
from __future__ import annotations

import threading
import time

import pytest

from app.engine_api import EngineError, Sampling
from app.engine_queue import EngineQueue, QueueFull
from tests.fakes import ScriptedEngine


def test_it_is_the_engine_contract_one_request_at_a_time():
    engine = ScriptedEngine("one", "two", modalities=("image",))
    queue = EngineQueue(engine)
    assert queue.modalities == engine.modalities and queue.n_ctx == engine.n_ctx
    assert queue.generate([{"role": "user", "content": "hi"}], Sampling(max_tokens=5)).text == "one"
    assert "".join(c.text for c in queue.stream([{"role": "user", "content": "hi"}])) == "two"
    assert engine.requests[0]["max_tokens"] == 5 and queue.waiting == 0


def test_requests_are_served_in_arrival_order_and_never_overlap():
    engine = ScriptedEngine(*[f"reply {i}" for i in range(6)], delay=0.01)
    queue = EngineQueue(engine)
    spans, order = [], []
    holder = queue.join()  # hold the engine while the others line up, in a known order

    def ask(i: int) -> None:
        with queue.join() as ticket:
            order.append(("joined", i))
            ticket.wait()
            start = time.monotonic()
            text = "".join(c.text for c in queue.engine.stream([{"role": "user", "content": str(i)}]))
            spans.append((start, time.monotonic(), i, text))

    threads = []
    for i in range(5):
        threads.append(threading.Thread(target=ask, args=(i,)))
        threads[-1].start()
        while len(order) < i + 1:
            time.sleep(0.001)
    assert queue.waiting == 5
    holder.leave()
    for t in threads:
        t.join(10)
    spans.sort()
    assert [i for _, _, i, _ in spans] == [0, 1, 2, 3, 4]  # first come, first served
    assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:]))  # one at a time


def test_a_full_line_refuses_at_once_and_a_cancelled_wait_gives_up_its_place():
    queue = EngineQueue(ScriptedEngine("x"), max_waiting=1)
    serving = queue.join()
    waiting = queue.join()
    with pytest.raises(QueueFull, match="1 requests are already waiting"):
        queue.join()
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(EngineError, match="cancelled"):
        waiting.wait(cancel)
    assert queue.waiting == 0
    queue.join().leave()  # there is room again
    serving.leave()
    assert queue.generate([{"role": "user", "content": "hi"}]).text == "x"


def test_the_heap_is_trimmed_after_every_request_and_only_then(monkeypatch):
    import sys

    from app import engine_queue, memory

    if sys.platform.startswith("linux"):
        assert memory.MALLOC_TRIM is not None  # glibc here: the trim is real
    trims = []
    monkeypatch.setattr(engine_queue, "give_back_free_memory", lambda: trims.append(1))
    queue = EngineQueue(ScriptedEngine("one", "two", "three"))
    queue.generate([{"role": "user", "content": "hi"}])
    assert len(trims) == 1
    stream = queue.stream([{"role": "user", "content": "hi"}])
    next(stream)
    assert len(trims) == 1  # not while a request holds the engine
    list(stream)
    ticket = queue.join()
    ticket.leave()
    ticket.leave()  # a second leave is no request
    assert len(trims) == 3
