"""Scripts use the running app through gradio_client: the named `chat` endpoint, and one
queue for the one engine however many clients ask at once."""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
import traceback

import pytest

from app.model_store import ModelChoice, fallback_model_path
from app.ui.server import serve


LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


def _from_the_test_client() -> bool:
    # gradio_client, which these tests use to call the app, looks up huggingface.co for its
    # user agent and telemetry; that is the test's client, not the app.
    return any(f.filename.endswith(("gradio_client/client.py", "huggingface_hub/utils/_telemetry.py"))
               for f in traceback.extract_stack())


@pytest.fixture(scope="module")
def offsite():
    """Every name looked up or address connected to that is not this machine, while the app runs."""
    attempts: list[str] = []
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and str(host) not in LOCAL_NAMES and not _from_the_test_client():
            attempts.append(f"lookup {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if isinstance(address, tuple) and not ipaddress.ip_address(address[0]).is_loopback \
                and not _from_the_test_client():
            attempts.append(f"connect {address}")
        return real_connect(self, address)

    socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect
    yield attempts
    socket.getaddrinfo, socket.socket.connect = real_getaddrinfo, real_connect


@pytest.fixture(scope="module")
def app(tmp_path_factory, offsite):
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


def test_the_app_never_reaches_the_network(app, offsite):
    client(app.url).predict("Hello!", api_name="/chat")
    time.sleep(1)  # anything started in the background at launch has had its chance
    assert offsite == []


def test_auth_is_required_when_set(tmp_path):
    running = serve(ModelChoice(fallback_model_path(), full=False), port=0, n_ctx=512, block=False,
                    auth=("ada", "lovelace"), notes_path=tmp_path / "notes.json",
                    conversations_root=tmp_path / "conversations")
    try:
        with pytest.raises(Exception):
            client(running.url).predict("Hello", api_name="/chat")
        from gradio_client import Client

        answer = Client(running.url, auth=("ada", "lovelace"), verbose=False).predict("Hello", api_name="/chat")
        assert isinstance(answer, str) and answer
    finally:
        running.close()
