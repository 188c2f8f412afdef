"""Scripts use the running app through gradio_client: the named `chat` endpoint, and one
queue for the one engine however many clients ask at once."""
from __future__ import annotations

import ipaddress
import socket
import threading
import time
import traceback
from pathlib import Path
from urllib.parse import urljoin

import httpx
import pytest

from app.model_store import ModelChoice, fallback_model_path
from app.ui.server import serve

pytestmark = pytest.mark.slow  # the app serves SmolLM2 through llama.cpp


LOCAL_NAMES = {"localhost", "127.0.0.1", "::1", "0.0.0.0"}


def _from_the_test_client() -> bool:
    # gradio_client, which these tests use to call the app, looks up huggingface.co for its
    # user agent and telemetry; that is the test's client, not the app.
    return any(f.filename.endswith(("gradio_client/client.py", "huggingface_hub/utils/_telemetry.py"))
               for f in traceback.extract_stack())


def _started_by_the_test_client() -> bool:
    return any(f.filename.endswith("gradio_client/client.py") for f in traceback.extract_stack())


# Where Gradio and huggingface_hub phone home from: version check, analytics, telemetry.
PHONE_HOME_MODULES = ("gradio.analytics", "huggingface_hub.")


def _code_module(thread: threading.Thread) -> str:
    """The module of the code a thread runs (its target's, or its class's for a Thread subclass).
    Read it before the thread starts: a finished thread has forgotten its target."""
    target = getattr(thread, "_target", None)
    return getattr(target, "__module__", None) or type(thread).__module__


class Offsite:
    """What could reach the network while the app runs."""

    def __init__(self):
        self.attempts: list[str] = []  # names looked up, addresses connected to, that are not this machine
        self.telemetry: list[str] = []  # topics queued for huggingface_hub's telemetry thread
        # (thread, module of its code) for each thread started by the app, not by the test's client
        self.threads: list[tuple[threading.Thread, str]] = []


@pytest.fixture(scope="module")
def offsite():
    """Records, while the app runs, what could reach the network: see Offsite."""
    from huggingface_hub.utils import _telemetry

    record = Offsite()
    attempts = record.attempts
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect
    real_start, real_put = threading.Thread.start, _telemetry._TELEMETRY_QUEUE.put

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and str(host) not in LOCAL_NAMES and not _from_the_test_client():
            attempts.append(f"lookup {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if isinstance(address, tuple) and not ipaddress.ip_address(address[0]).is_loopback \
                and not _from_the_test_client():
            attempts.append(f"connect {address}")
        return real_connect(self, address)

    def start(self):
        if not _started_by_the_test_client():
            record.threads.append((self, _code_module(self)))
        return real_start(self)

    def put(item, *args, **kwargs):
        if not _started_by_the_test_client():
            record.telemetry.append(str(item.get("topic") if isinstance(item, dict) else item))
        return real_put(item, *args, **kwargs)

    socket.getaddrinfo, socket.socket.connect, threading.Thread.start = getaddrinfo, connect, start
    _telemetry._TELEMETRY_QUEUE.put = put
    yield record
    socket.getaddrinfo, socket.socket.connect, threading.Thread.start = real_getaddrinfo, real_connect, real_start
    del _telemetry._TELEMETRY_QUEUE.put  # back to the Queue class's method


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


def model_answer(app, question: str) -> str:
    """What the app's model answers in a new conversation with the default settings, asked directly.
    (A 135M model's exact words depend on the CPU's kernels; the same engine on the same machine
    answers the same, greedily.)"""
    from app.conversation import DEFAULT_SYSTEM_PROMPT, Settings
    from app.engine_api import Sampling

    messages = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": question}]
    return app.engine.generate(messages, Sampling(max_tokens=Settings().max_tokens)).text.strip()


def test_chat_endpoint_answers_a_message(app):
    answer = client(app.url).predict("What is the capital of France?", api_name="/chat")
    assert isinstance(answer, str) and answer == model_answer(app, "What is the capital of France?") != ""


def test_chat_is_the_only_public_endpoint(app):
    endpoints = client(app.url).view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert list(endpoints) == ["/chat"]


def test_concurrent_clients_are_queued_one_generation_at_a_time(app, monkeypatch):
    spans = []  # (start, end) of each engine.stream, from the call to its last chunk
    real = app.engine.stream

    def recording(messages, sampling, **options):
        start = time.monotonic()
        chunks = real(messages, sampling, **options)

        def timed():
            try:
                yield from chunks
            finally:
                spans.append((start, time.monotonic()))
        return timed()

    monkeypatch.setattr(app.engine, "stream", recording)
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
    assert answers[0] and answers.count(answers[0]) == 3 and answers[0] == model_answer(app, question)  # greedy


def test_the_app_never_reaches_the_network(app, offsite):
    client(app.url).predict("Hello!", api_name="/chat")
    # Gradio and huggingface_hub reach the network from threads they start in the background
    # (version check, launch analytics, telemetry): the app must have started none of them.
    assert offsite.threads, "the thread recorder saw nothing: the check below would prove nothing"
    phoning_home = [(t.name, module) for t, module in offsite.threads if module.startswith(PHONE_HOME_MODULES)]
    assert phoning_home == []
    assert offsite.telemetry == []  # nothing queued for huggingface_hub's telemetry thread either
    # Every other thread the app started either serves (it runs until the app closes: the HTTP
    # server, its event loop's and the queue's worker pools) or has finished; one that is still
    # finishing is waited for, so whatever it did is recorded before the check.
    for t, module in offsite.threads:
        if not t.daemon and module != "concurrent.futures.thread":
            t.join(timeout=120)
            assert not t.is_alive(), f"{t.name} ({module}) did not finish"
    assert offsite.attempts == []


def test_auth_is_required_when_set(tmp_path):
    running = serve(ModelChoice(fallback_model_path(), full=False), port=0, n_ctx=512, block=False,
                    auth=("ada", "lovelace"), notes_path=tmp_path / "notes.json",
                    conversations_root=tmp_path / "conversations")
    from gradio_client import Client
    from gradio_client.exceptions import AuthenticationError

    try:
        # Without credentials the app answers 401, which gradio_client reports as this error.
        with pytest.raises(AuthenticationError, match="credentials were not provided"):
            client(running.url)
        # The endpoint itself refuses, not only the page's config.
        refused = httpx.post(urljoin(running.url, "gradio_api/call/chat"), json={"data": ["Hello"]})
        assert refused.status_code == 401 and "Not authenticated" in refused.text
        with pytest.raises(ValueError, match="Could not login"):  # a wrong password is refused at login
            Client(running.url, auth=("ada", "babbage"), verbose=False)
        answer = Client(running.url, auth=("ada", "lovelace"), verbose=False).predict("Hello", api_name="/chat")
        assert isinstance(answer, str) and answer
    finally:
        running.close()


def test_the_openai_api_is_served_beside_the_page(app):
    from openai import OpenAI

    from app.conversation import DEFAULT_SYSTEM_PROMPT

    api = OpenAI(base_url=app.url.rstrip("/") + "/v1", api_key="unused")
    [model] = api.models.list().data
    question = "What is the capital of France?"
    answer = api.chat.completions.create(model=model.id, messages=[
        {"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": question}],
        temperature=0, max_tokens=1024)
    # the same engine as the page's chat: the same greedy answer
    assert answer.choices[0].message.content.strip() == model_answer(app, question)
    assert client(app.url).predict(question, api_name="/chat") == answer.choices[0].message.content.strip()


def test_the_page_serves_no_file_outside_its_own(app, tmp_path):
    import urllib.error
    import urllib.request

    secret = tmp_path / "secret.txt"
    secret.write_text("not for the browser")
    base = app.url.rstrip("/")
    for path in (str(secret), "/etc/passwd", str(Path(__file__).resolve())):
        for route in (f"/gradio_api/file={path}", f"/file={path}"):
            try:
                with urllib.request.urlopen(base + route, timeout=10) as response:
                    body = response.read()
            except urllib.error.HTTPError as e:
                assert e.code in (403, 404), (route, e.code)
                continue
            assert b"not for the browser" not in body and b"root:" not in body, route
