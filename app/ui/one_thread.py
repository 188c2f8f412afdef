"""Run a streaming answer in one thread of its own, whoever consumes it.

Gradio advances a sync generator from whichever worker thread is free, one step per render of
the page. Generating in a thread of its own keeps the model's token loop off that pace (the
page gets the newest snapshot of the answer, not a backlog of them), keeps each generation on
one thread from start to end, and stops it as soon as the page stops asking for more.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
_ITEM, _ERROR, _DONE = range(3)


def run_in_thread(make: Callable[[], Iterator[T]], name: str = "answer") -> Iterator[T]:
    """Iterate `make()` in a dedicated thread; yield its items here (only the newest when this
    side falls behind: each item is a snapshot of the same growing answer). Closing this
    iterator stops the other one at its next item, closed in its own thread."""
    items: queue.Queue = queue.Queue()
    cancelled = threading.Event()

    def produce() -> None:
        try:
            source = make()
            try:
                for item in source:
                    items.put((_ITEM, item))
                    if cancelled.is_set():
                        break
            finally:
                close = getattr(source, "close", None)
                if close is not None:
                    close()
        except BaseException as error:  # handed to the consumer, raised there
            items.put((_ERROR, error))
            return
        items.put((_DONE, None))

    threading.Thread(target=produce, name=name, daemon=True).start()
    pending, latest = False, None
    try:
        while True:
            kind, value = items.get()
            if kind == _ITEM:
                pending, latest = True, value
                if items.empty():  # otherwise skip to the newer one
                    pending = False
                    yield latest
                continue
            if pending:
                yield latest
            if kind == _ERROR:
                raise value
            return
    finally:
        cancelled.set()
