"""The OpenAI-compatible HTTP API (app/api/) as its clients see it: the official `openai` client,
unchanged, and raw bytes through httpx, against a scripted engine (no model, fast).

Covered: the models list, chat plain and streamed (usage, timings, SSE framing), sampling options
reaching the engine, tool calls (auto, named, required, streamed, and the round trip with the
result), JSON mode, OpenAI's error object for every refusal with the right status, the queue
under load (one generation at a time, 429 when full), a client that goes away mid-stream or
while it waits in line, /health, /metrics, and /v1/completions.
"""
from __future__ import annotations

import base64
import contextlib
import http.server
import io
import json
import re
import threading
import time
import wave
from dataclasses import dataclass
from typing import Any, Iterator

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from app.engine_api import AUDIO, IMAGE, ContextFull, Sampling, Usage
from tests.api_server import serving
from tests.fakes import ScriptedEngine

MODEL = "test-model"
KEY = "sekret-key"
TOOL_CALL = '[{"name": "add", "arguments": {"a": 1, "b": 2}}]<|/tool_call|>'  # the constrained continuation
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                   "required": ["a", "b"]}}}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               413: "invalid_request_error", 429: "rate_limit_error"}


class Engine(ScriptedEngine):
    """The scripted engine, recording when each generation ran and how many ran at once."""

    def __init__(self, *replies: Any, **options: Any):
        super().__init__(*replies, **options)
        self._lock = threading.Lock()
        self.active = 0
        self.max_active = 0
        self.spans: list[tuple[int, float, float]] = []  # (request index, first read, closed)

    def _play(self, index: int, reply: Any, sampling: Sampling, usage: Usage, stream: bool) -> Iterator[Any]:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        start = time.monotonic()
        try:
            yield from super()._play(index, reply, sampling, usage, stream)
        finally:
            with self._lock:
                self.active -= 1
                self.spans.append((index, start, time.monotonic()))


@dataclass
class Served:
    engine: Engine
    url: str                # .../v1
    client: OpenAI
    http: httpx.Client      # on the server's root, with the key where there is one

    def chat(self, content: str = "hi", **options: Any):
        return self.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                                   **options)

    def still_serving(self, expected: str = "ok") -> None:
        """The next request (the engine's next scripted reply) is answered, and promptly."""
        start = time.monotonic()
        assert self.chat("again?").choices[0].message.content == expected
        assert time.monotonic() - start < 1.0


@pytest.fixture(scope="module")
def shared_server() -> Iterator[tuple[Engine, str]]:
    """One server for the tests that need no options of their own (starting one costs ~0.4 s)."""
    engine = Engine()
    with serving(engine, model_name=MODEL) as url:
        yield engine, url


@pytest.fixture
def serve(shared_server) -> Iterator[Any]:
    """serve(*replies, modalities=..., delay=..., max_waiting=..., api_key=..., ...) -> Served:
    a scripted engine behind the API, in-process on loopback. Without server options, delay
    or `fresh=True`, the module's shared server is used, its engine scripted anew; otherwise
    a server of the test's own is started, and stopped when the test ends."""
    with contextlib.ExitStack() as stack:
        def start(*replies: Any, modalities: Any = (IMAGE, AUDIO), delay: float = 0.0, piece: int = 3,
                  fresh: bool = False, **config: Any) -> Served:
            if fresh or config or delay:
                engine = Engine(*replies, modalities=modalities, delay=delay, piece=piece)
                url = stack.enter_context(serving(engine, model_name=MODEL, **config))
            else:
                engine, url = shared_server
                deadline = time.monotonic() + 2
                while engine.active and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert not engine.active, "a generation of an earlier test is still running"
                engine.__init__(*replies, modalities=modalities, delay=delay, piece=piece)  # a new script
            key = config.get("api_key")
            client = stack.enter_context(openai_client(url, key or "unused"))
            http = stack.enter_context(plain_http(base_url=url.removesuffix("/v1"),
                                                  headers={"Authorization": f"Bearer {key}"} if key else {}))
            return Served(engine, url, client, http)

        yield start


# -- helpers ---------------------------------------------------------------------------------------

def plain_http(**options: Any) -> httpx.Client:
    """An httpx client for plain http on loopback. (verify=False skips loading the CA bundle,
    which costs ~0.1 s of CPU per client; nothing here uses TLS.)"""
    return httpx.Client(verify=False, timeout=10, **options)


def openai_client(url: str, key: str) -> OpenAI:
    """The official client, with no retries (a test wants to see each answer as it is)."""
    return OpenAI(base_url=url, api_key=key, max_retries=0, timeout=10, http_client=plain_http())


def error_of(response: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """The response is OpenAI's error object with this status (and code, param); returns the error."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ERROR_TYPES[status]
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


def raised(info: pytest.ExceptionInfo, status: int, code: str | None = None, param: str | None = None) -> dict:
    """The openai client's exception carries the status and OpenAI's error object."""
    e = info.value
    assert isinstance(e, openai.APIStatusError) and e.status_code == status
    error = error_of(e.response, status, code, param)
    assert e.body == error  # the client hands out the inner object, as it does for OpenAI's own
    return error


def sse_events(raw: bytes) -> list[str]:
    """The `data:` payloads of a server-sent event stream, checking the framing byte by byte."""
    assert re.fullmatch(rb"(data: [^\n]+\n\n)+", raw, re.S), raw[:500]
    return [event.decode()[len("data: "):] for event in raw.split(b"\n\n")[:-1]]


def settle(ok: bool) -> None:
    """Where a stream came back broken, give the server a moment to log its exception before
    pytest formats the failure: CPython before 3.11.8 can fail both (SystemError "AST constructor
    recursion depth mismatch", an INTERNALERROR) when two threads format tracebacks at once."""
    if not ok:
        time.sleep(0.5)


def png_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


def wav_bytes() -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(b"\x01\x00" * 1600)
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def audio_message(data: str, fmt: str = "wav") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "Transcribe."},
                                         {"type": "input_audio", "input_audio": {"data": data, "format": fmt}}]}]


@contextlib.contextmanager
def http_file_server(body: bytes) -> Iterator[tuple[str, list[str]]]:
    """A loopback HTTP server answering every GET with `body`; yields (url, paths requested)."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/cat.png", hits
    finally:
        server.shutdown()
        server.server_close()


# -- 1. models --------------------------------------------------------------------------------------

def test_models_lists_the_served_model_with_context_length_and_modalities(serve):
    api = serve()
    models = api.client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].object == "model"
    assert models[0].model_extra["context_length"] == api.engine.n_ctx
    assert set(models[0].model_extra["modalities"]) == {"text", IMAGE, AUDIO}


def test_models_of_a_text_only_model(serve):
    api = serve(modalities=())
    assert api.client.models.list().data[0].model_extra["modalities"] == ["text"]


# -- 2. chat, plain and streamed ----------------------------------------------------------------

REPLY = "Hello there! How can I help you today?"


def test_streamed_text_equals_the_plain_text(serve):
    api = serve(REPLY, REPLY)
    plain = api.chat()
    assert plain.object == "chat.completion" and plain.model == MODEL
    assert plain.choices[0].message.role == "assistant"
    assert plain.choices[0].message.content == REPLY
    assert plain.choices[0].finish_reason == "stop"

    chunks = list(api.chat(stream=True))
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # really streamed
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == ["stop"]
    assert chunks[-1].usage is None  # not asked for


def test_usage_cached_tokens_and_timings(serve):
    api = serve(REPLY, REPLY)
    response = api.chat()
    assert response.usage.prompt_tokens == 100 and response.usage.completion_tokens == 10
    assert response.usage.total_tokens == 110
    assert response.usage.prompt_tokens_details.cached_tokens == 40
    timings = response.model_extra["timings"]
    assert timings["adapter"] is None  # text only: the base model, no LoRA
    assert timings["ttft_ms"] == 650.0
    assert timings["prompt_per_second"] == pytest.approx(60 / 0.6)   # 60 new prompt tokens in 600 ms
    assert timings["predicted_per_second"] == pytest.approx(10 / 0.5)

    chunks = list(api.chat(stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == []
    assert last.usage.prompt_tokens == 100 and last.usage.completion_tokens == 10
    assert last.usage.prompt_tokens_details.cached_tokens == 40
    assert set(last.model_extra["timings"]) >= {"adapter", "ttft_ms", "prompt_per_second", "predicted_per_second"}
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "stop"


# -- 3. the SSE framing, byte by byte ---------------------------------------------------------------

def test_sse_framing_byte_by_byte(serve):
    api = serve(REPLY)
    with api.http.stream("POST", "/v1/chat/completions",
                         json={"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
                         ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].split(";")[0] == "text/event-stream"
        raw = b"".join(response.iter_raw())
    assert raw.endswith(b"\n\ndata: [DONE]\n\n")
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == REPLY


# -- 4. sampling options reach the engine ----------------------------------------------------------

def test_sampling_options_reach_the_engine(serve):
    api = serve("one", "two", "three END four")
    api.chat(max_tokens=5, temperature=0.3, top_p=0.9, seed=7, stop="END")
    api.chat(max_completion_tokens=6, stop=["END", "STOP"], extra_body={"top_k": 40})
    third = api.chat(stop=["END"])
    first, second, _ = api.engine.requests
    assert (first["max_tokens"], first["temperature"], first["top_p"], first["seed"], first["stop"]) == \
        (5, 0.3, 0.9, 7, ("END",))
    assert (second["max_tokens"], second["stop"], second["top_k"]) == (6, ("END", "STOP"), 40)
    assert first["grammar"] is None
    assert first["messages"] == [{"role": "user", "content": "hi"}]
    assert third.choices[0].message.content == "three "  # the stop string ends the answer, not shown


# -- 5. tools -------------------------------------------------------------------------------------

def test_tool_call_round_trip(serve):
    api = serve("<|tool_call|>" + TOOL_CALL, TOOL_CALL, "1 + 2 = 3.")
    question = {"role": "user", "content": "What is 1 + 2?"}
    response = api.client.chat.completions.create(model=MODEL, messages=[question], tools=[ADD])

    free, constrained = api.engine.requests
    system = free["messages"][0]
    assert system["role"] == "system"
    assert json.loads(system["tools"]) == [{"name": "add", "description": "Add two numbers.",
                                            "parameters": ADD["function"]["parameters"]}]
    assert free["messages"][1:] == [question]
    assert free["grammar"] is None
    assert constrained["grammar"]  # the call again, under the tool-call grammar
    assert constrained["messages"][-1] == {"role": "assistant", "content": "<|tool_call|>"}

    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id and call.type == "function" and call.function.name == "add"
    assert isinstance(call.function.arguments, str)
    assert json.loads(call.function.arguments) == {"a": 1, "b": 2}

    answer = api.client.chat.completions.create(model=MODEL, tools=[ADD], messages=[
        question,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "add", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "3"}])
    assert answer.choices[0].message.content == "1 + 2 = 3."
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].message.tool_calls is None
    seen = api.engine.requests[2]["messages"]
    assert seen[0]["role"] == "system" and "tools" in seen[0]
    assert seen[1:] == [question,
                        {"role": "assistant", "content": "<|tool_call|>" + TOOL_CALL},
                        {"role": "tool", "content": "3"}]


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "add"}}, "required"],
                         ids=["named", "required"])
def test_named_and_required_tool_choice_go_straight_to_the_constrained_call(serve, tool_choice):
    api = serve(TOOL_CALL)
    response = api.chat("What is 1 + 2?", tools=[ADD], tool_choice=tool_choice)
    [request] = api.engine.requests
    assert request["grammar"] and not request["stream"]
    assert request["messages"][-1] == {"role": "assistant", "content": "<|tool_call|>"}
    assert response.choices[0].finish_reason == "tool_calls"
    [call] = response.choices[0].message.tool_calls
    assert call.function.name == "add" and json.loads(call.function.arguments) == {"a": 1, "b": 2}


def test_streamed_tool_call(serve):
    call = '[{"name": "add", "arguments": {"a": 12345, "b": 67890}}]<|/tool_call|>'
    api = serve("<|tool_call|>" + call, call)
    chunks = list(api.chat("What is 12345 + 67890?", tools=[ADD], stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)  # no markup shown
    deltas = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert len(deltas) >= 3  # the name, then the arguments in pieces
    assert all(d.index == 0 for d in deltas)
    first, rest = deltas[0], deltas[1:]
    assert first.id and first.type == "function" and first.function.name == "add"
    assert all(d.id is None and d.function.name is None for d in rest)
    arguments = (first.function.arguments or "") + "".join(d.function.arguments for d in rest)
    assert json.loads(arguments) == {"a": 12345, "b": 67890}
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_tool_choice_none_declares_no_tools(serve):
    api = serve("Just text.")
    assert api.chat(tools=[ADD], tool_choice="none").choices[0].message.content == "Just text."
    assert api.engine.requests[0]["messages"] == [{"role": "user", "content": "hi"}]


# -- 6. JSON mode -----------------------------------------------------------------------------------

def test_json_mode_sets_a_json_schema(serve):
    # The engine enforces the schema (the llama.cpp engine turns it into a grammar).
    api = serve('{"ok": true}', '{"n": 1}', "ok")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert api.chat(response_format={"type": "json_object"}).choices[0].message.content == '{"ok": true}'
    api.chat(response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    json_object, json_schema = (r["json_schema"] for r in api.engine.requests)
    assert json_object == {"type": "object"}
    assert json_schema == schema

    with pytest.raises(openai.BadRequestError) as info:
        api.chat(response_format={"type": "json_schema", "json_schema": {"name": "n"}})
    raised(info, 400)
    assert len(api.engine.requests) == 2
    api.still_serving()


# -- 7. errors --------------------------------------------------------------------------------------

BAD_REQUESTS = {
    "empty messages": ({"messages": []}, None, None),
    "unknown role": ({"messages": [{"role": "robot", "content": "hi"}]}, None, None),
    "content of the wrong type": ({"messages": [{"role": "user", "content": 5}]}, None, None),
    "unknown content part": ({"messages": [{"role": "user", "content": [{"type": "video", "video": "x"}]}]},
                             None, None),
    "bad base64": ({"messages": image_message("data:image/png;base64,@@not base64@@")},
                   None, "messages[0].content[1]"),
    "not an image": ({"messages": image_message(data_url(b"this is not an image at all"))},
                     None, "messages[0].content[1]"),
    "not audio": ({"messages": audio_message(base64.b64encode(b"this is not audio at all").decode())},
                  None, "messages[0].content[1]"),
    "aac audio": ({"messages": audio_message(base64.b64encode(wav_bytes()).decode(), "aac")},
                  None, "messages[0].content[1].input_audio.format"),
    "n=2": ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, None, "n"),
    "file URL": ({"messages": image_message("file:///etc/passwd")}, None, "messages[0].content[1]"),
    "http URL": ({"messages": image_message("http://127.0.0.1:9/cat.png")},
                 "remote_media_disabled", "messages[0].content[1]"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_get_400_and_the_next_request_is_served(serve, case):
    api = serve("ok")
    body, code, param = BAD_REQUESTS[case]
    with pytest.raises(openai.BadRequestError) as info:
        api.client.chat.completions.create(model=MODEL, **body)
    raised(info, 400, code, param)
    assert api.engine.requests == []  # refused before the model
    api.still_serving()


def test_bad_json_body_is_400(serve):
    api = serve("ok")
    error_of(api.http.post("/v1/chat/completions", content=b"{not json",
                           headers={"Content-Type": "application/json"}), 400)
    api.still_serving()


def test_image_for_a_model_that_cannot_read_images(serve):
    api = serve("ok", modalities=())
    with pytest.raises(openai.BadRequestError) as info:
        api.client.chat.completions.create(model=MODEL, messages=image_message(data_url(png_bytes())))
    raised(info, 400, "unsupported_modality", "messages[0].content[1]")
    api.still_serving()


def test_valid_media_reach_the_engine(serve):
    """The control for the media errors: a real PNG and WAV are passed on as their files' bytes,
    for the engine to decode once it knows the prompt fits."""
    api = serve("an image", "a sound")
    api.client.chat.completions.create(model=MODEL, messages=image_message(data_url(png_bytes())))
    api.client.chat.completions.create(model=MODEL, messages=audio_message(base64.b64encode(wav_bytes()).decode()))
    image_part = api.engine.requests[0]["messages"][0]["content"][1]
    audio_part = api.engine.requests[1]["messages"][0]["content"][1]
    assert image_part["type"] == IMAGE and image_part[IMAGE] == png_bytes()
    assert audio_part["type"] == AUDIO and audio_part[AUDIO] == wav_bytes()


def test_remote_and_file_urls_are_not_fetched(serve, tmp_path):
    picture = tmp_path / "cat.png"
    picture.write_bytes(png_bytes())
    with http_file_server(png_bytes()) as (url, hits):
        api = serve("ok")
        for refused in (url, picture.as_uri()):
            with pytest.raises(openai.BadRequestError) as info:
                api.client.chat.completions.create(model=MODEL, messages=image_message(refused))
            raised(info, 400)
        assert hits == []
        api.still_serving()

        # --allow-remote-media fetches http(s) (the control), but never a file: URL
        remote = serve("a cat", "ok", allow_remote_media=True)
        remote.client.chat.completions.create(model=MODEL, messages=image_message(url))
        assert hits == ["/cat.png"]
        assert remote.engine.requests[0]["messages"][0]["content"][1][IMAGE] == png_bytes()
        with pytest.raises(openai.BadRequestError) as info:
            remote.client.chat.completions.create(model=MODEL, messages=image_message(picture.as_uri()))
        raised(info, 400)
        remote.still_serving()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_context_too_long_is_400_even_when_streamed(serve, stream):
    api = serve(ContextFull("the conversation (5000 tokens) does not fit in the context (4096)"),
                ContextFull("the conversation (5000 tokens) does not fit in the context (4096)"), "ok")
    with pytest.raises(openai.BadRequestError) as info:
        api.chat(stream=stream)
    assert "does not fit" in raised(info, 400, "context_length_exceeded")["message"]
    # the same as raw bytes: a plain JSON error, not a stream broken after its headers
    error_of(api.http.post("/v1/chat/completions",
                           json={"model": MODEL, "stream": stream, "messages": [{"role": "user", "content": "hi"}]}),
             400, "context_length_exceeded")
    api.still_serving()


def test_api_key(serve):
    api = serve("right key", "ok", api_key=KEY)
    with plain_http(base_url=api.url.removesuffix("/v1")) as anonymous:
        for path in ("/v1/models", "/health", "/metrics"):
            error_of(anonymous.get(path), 401, "invalid_api_key")
            error_of(anonymous.get(path, headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
            assert api.http.get(path).status_code == 200
        error_of(anonymous.post("/v1/chat/completions",
                                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}), 401)
    with openai_client(api.url, "wrong") as wrong:
        with pytest.raises(openai.AuthenticationError) as info:
            wrong.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        raised(info, 401, "invalid_api_key")
    assert api.engine.requests == []
    assert api.chat().choices[0].message.content == "right key"
    api.still_serving()


def test_unknown_model_and_unknown_route_are_404(serve):
    api = serve("ok")
    with pytest.raises(openai.NotFoundError) as info:
        api.client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    raised(info, 404, "model_not_found", "model")
    for method, path in (("GET", "/v1/nothing"), ("POST", "/v1/nothing"), ("GET", "/nothing"),
                         ("GET", "/v1/chat/completions")):
        error_of(api.http.request(method, path), 404)
    api.still_serving()


def test_body_over_the_limit_is_413(serve):
    api = serve("ok", max_body_bytes=4096)
    with pytest.raises(openai.APIStatusError) as info:
        api.chat("x" * 5000)
    raised(info, 413)
    assert api.engine.requests == []
    api.still_serving()


def test_chunked_body_over_the_limit_is_413(serve):
    """A body sent without Content-Length (chunked) is held to the same limit."""
    api = serve("ok", max_body_bytes=4096)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    response = api.http.post("/v1/chat/completions", content=iter([body[:100], body[100:]]),
                             headers={"Content-Type": "application/json"})
    assert "content-length" not in response.request.headers
    error_of(response, 413)
    assert api.engine.requests == []
    api.still_serving()


def test_queue_full_is_429_with_retry_after(serve):
    api = serve("a slow answer, piece by piece", "ok", delay=0.05, max_waiting=0)
    holder: dict[str, str] = {}
    thread = threading.Thread(target=lambda: holder.update(text=api.chat("first").choices[0].message.content))
    thread.start()
    assert api.engine.started.wait(5)
    with pytest.raises(openai.RateLimitError) as info:
        api.chat("second")
    raised(info, 429, "queue_full")
    assert int(info.value.response.headers["Retry-After"]) > 0
    error_of(api.http.post("/v1/completions", json={"model": MODEL, "prompt": "x"}), 429, "queue_full")
    thread.join(5)
    assert holder["text"] == "a slow answer, piece by piece"
    assert len(api.engine.requests) == 1
    api.still_serving()


# -- 8. load ---------------------------------------------------------------------------------------

def test_eight_concurrent_clients_are_served_one_at_a_time(serve):
    replies = [f"answer number {k}, told in several pieces" for k in range(8)]
    api = serve(*replies, delay=0.005)
    answers: dict[int, str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def ask(i: int) -> None:
        try:
            with openai_client(api.url, "unused") as client:  # a client of its own, as 8 programs would
                barrier.wait()
                if i % 2:
                    stream = client.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": f"question {i}"}], stream=True)
                    answers[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
                else:
                    answers[i] = client.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": f"question {i}"}]).choices[0].message.content
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors, errors
    # each client got the whole reply the engine generated for its own question, untouched
    asked = {r["messages"][0]["content"]: k for k, r in enumerate(api.engine.requests)}
    assert sorted(asked) == sorted(f"question {i}" for i in range(8))
    assert answers == {i: replies[asked[f"question {i}"]] for i in range(8)}
    # and the generations never overlapped
    assert api.engine.max_active == 1
    spans = sorted(api.engine.spans, key=lambda s: s[1])
    assert all(earlier[2] <= later[1] for earlier, later in zip(spans, spans[1:]))
    assert not any(api.engine.stopped_early)


# -- 9. a client that goes away ---------------------------------------------------------------------

def test_disconnect_mid_stream_stops_the_generation(serve):
    api = serve("0123456789" * 60, "ok", delay=0.05)  # 200 pieces: 10 s if nothing stops it
    with api.http.stream("POST", "/v1/chat/completions",
                         json={"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
                         ) as response:
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events == 2:
                break
    closed_at, read_at_close = time.monotonic(), api.engine.pieces_read
    deadline = closed_at + 2
    while not api.engine.stopped_early and time.monotonic() < deadline:
        time.sleep(0.01)
    assert api.engine.stopped_early == [True]
    assert api.engine.closed_at[0] - closed_at < 1.0
    assert api.engine.pieces_read - read_at_close <= 3
    assert api.engine.pieces_read < 20
    api.still_serving()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_client_that_gives_up_in_line_gets_no_generation(serve, stream):
    """A client gone while it waited for the model gives up its place: its generation is never
    run (or stops at its first token), and does not hold up the clients behind it."""
    api = serve("a slow answer for the first", "0123456789" * 10, "ok", delay=0.02)  # 9 pieces, then 34
    holder = threading.Thread(target=api.chat, args=("first",))
    holder.start()
    assert api.engine.started.wait(5)
    with pytest.raises(httpx.TimeoutException):
        api.http.post("/v1/chat/completions", timeout=0.1, json={
            "model": MODEL, "stream": stream, "messages": [{"role": "user", "content": "gave up"}]})
    holder.join(5)
    time.sleep(0.4)  # time enough to notice the client is gone; 20 pieces if it is not noticed
    assert api.engine.pieces_read <= 9 + 3, \
        f"generated for a client that had gone: {api.engine.pieces_read - 9} pieces"


# -- 10. health and metrics ------------------------------------------------------------------------

def test_health(serve):
    response = serve().http.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_metrics_after_a_request(serve):
    api = serve("counted", fresh=True)  # counters of its own
    api.chat()
    response = api.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert "# TYPE phi4mm_requests_total counter" in text
    assert 'phi4mm_requests_total{route="/v1/chat/completions",status="200"} 1\n' in text  # counted once
    assert "phi4mm_prompt_tokens_total 100\n" in text
    assert "phi4mm_cached_tokens_total 40\n" in text
    assert "phi4mm_completion_tokens_total 10\n" in text
    assert "phi4mm_queue_depth 0\n" in text
    assert "phi4mm_ttft_seconds_count 1\n" in text
    for line in text.splitlines():  # the exposition format: comments, or `name{labels} value`
        assert line.startswith("# ") or re.fullmatch(r'[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? [0-9.e+-]+', line), line


# -- 11. /v1/completions ---------------------------------------------------------------------------

def test_completions_take_the_raw_prompt(serve):
    text = "upon a time there was a llama."
    api = serve(text, text, "ok")
    plain = api.client.completions.create(model=MODEL, prompt="Once", max_tokens=7, temperature=0.5)
    assert plain.object == "text_completion"
    assert plain.choices[0].text == text and plain.choices[0].finish_reason == "stop"
    assert plain.usage.prompt_tokens == 100 and plain.usage.completion_tokens == 10
    request = api.engine.requests[0]
    assert request["messages"] == "Once"  # the prompt itself, no chat messages
    assert (request["max_tokens"], request["temperature"]) == (7, 0.5)

    chunks = list(api.client.completions.create(model=MODEL, prompt="Once", stream=True,
                                                stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    settle(streamed == text)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert api.engine.requests[1]["messages"] == "Once"

    with pytest.raises(openai.BadRequestError) as info:
        api.client.completions.create(model=MODEL, prompt="Once", echo=True)
    raised(info, 400, param="echo")
    with pytest.raises(openai.BadRequestError) as info:
        api.client.completions.create(model=MODEL, prompt=["Once", "Twice"])
    raised(info, 400, param="prompt")
    assert len(api.engine.requests) == 2
    assert api.client.completions.create(model=MODEL, prompt="Again").choices[0].text == "ok"


def test_completions_sse_framing(serve):
    api = serve("upon a time")
    with api.http.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "Once", "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].split(";")[0] == "text/event-stream"
        raw = b"".join(r.iter_raw())
    settle(raw.endswith(b"data: [DONE]\n\n"))
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == "upon a time"
