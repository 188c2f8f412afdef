"""Scripts use the running app through gradio_client: the named `chat` endpoint, and one
queue for the one engine however many clients ask at once."""
from __future__ import annotations

import threading
import time

import pytest

from app.model_store import ModelChoice, fallback_model_path
from app.ui.server import serve


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api-app")
    running = serve(ModelChoice(fallback_model_path(), full=False), port=0, n_ctx=2048, block=False,
                    notes_path=tmp / "notes.json", conversations_root=tmp / "conversations")
    yield running
    running.close()


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def test_chat_endpoint_answers_a_message(app):
    answer = client(app.url).predict("What is the capital of France?", api_name="/chat")
    assert isinstance(answer, str) and "Paris" in answer


def test_chat_is_the_only_public_endpoint(app):
    endpoints = client(app.url).view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert list(endpoints) == ["/chat"]


def test_concurrent_clients_are_queued_one_generation_at_a_time(app, monkeypatch):
    spans = []  # (start, end) of each engine.generate, from the call to its last piece
    real = app.engine.generate

    def recording(messages, **options):
        start = time.monotonic()
        out = real(messages, **options)
        if isinstance(out, str):
            spans.append((start, time.monotonic()))
            return out

        def pieces():
            try:
                yield from out
            finally:
                spans.append((start, time.monotonic()))
        return pieces()

    monkeypatch.setattr(app.engine, "generate", recording)
    question = "How many legs does a dog have?"
    answers = [None] * 3

    def ask(i):
        answers[i] = client(app.url).predict(question, api_name="/chat")

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert len(spans) == 3
    spans.sort()
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), spans  # never overlapping
    assert answers[0] and "four" in answers[0].lower() and answers.count(answers[0]) == 3  # greedy: same answer
