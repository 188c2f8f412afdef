"""The hostile-input corpus (tests/hostile_corpus.py) through every entry point that takes it.

For each item and each way in: no crash, no hang (every call is bounded), and either an answer
or a clear refusal (an exception type or status, and a message naming the problem: never a
traceback or "internal error"); then the next normal request still works.

    media reader      bytes and paths                    MediaError, or the decoded value
    engine            LocalEngine, paths and values      in a child process (memory capped): a crash is a result
    conversation      Attachment paths                   FinalAnswer.error, the conversation goes on
    HTTP API          data: URLs, input_audio,           400 with OpenAI's error object
                      audio_url, transcriptions
    HTTP API, capped  python -m app.api in a child       the `capped` items and a many-image request
    page              gradio_client /chat (text)         the app's error, or the answer
    voice file mode   python -m app.voice --wav          exit 0, or exit 2 with one phi4mm-voice: line
    converter         python -m convert                  exit 2 with one error: line

A refusal must also be cheap: the engine refuses a prompt that cannot fit before it encodes
anything, so it should not need more than REFUSAL_MB of memory to say so.

What loads a model is marked slow. The engines run the tiny converted Phi-4-multimodal (the
page runs SmolLM2, the app's text-only fallback), with a few tokens per answer.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import httpx
import pytest

from app import media
from tests.hostile_corpus import (
    ANSWER,
    AUDIO,
    IMAGE,
    PROMPT,
    REFUSE,
    UNCLEAR,
    Item,
    audio,
    corpus,
    is_clear,
    limit_memory,
    prompts,
    write_files,
)

ROOT = Path(__file__).resolve().parents[1]
N_CTX = 4096          # the tiny model's context in these tests: the corpus's over-context items are sized for it
PAGE_CTX = 2048       # the page's SmolLM2
TIMEOUT_S = 120       # one request, however hostile
TRANSCRIBE_TIMEOUT_S = 45  # the 10-minute clip is 20 windows: seconds on the tiny model
VOICE_TIMEOUT_S = 60   # a clip answers in 2-4 s; the 10-minute one in 7 s
REFUSAL_MB = 512      # the most a refusal may cost the engine in memory (peak RSS growth)
NORMAL = "Hello, how are you today?"

CORPUS = corpus(N_CTX)
MEDIA = [item for item in CORPUS if item.kind in (IMAGE, AUDIO)]
AUDIO_ITEMS = [item for item in CORPUS if item.kind == AUDIO]
BY_NAME = {item.name: item for item in CORPUS}
IN_PROCESS = [item for item in CORPUS if not item.capped]  # for the tests that run the app in this process

# The media reader reads these; the engine refuses them for their length (too short for one
# feature frame, too long for the context).
READ_BUT_REFUSED_LATER = {"one-sample.wav", "ten-minutes.wav", "64mp-solid.png"}
# The transcription route cuts a clip into 30 s windows and pads one shorter than a feature
# frame: it answers what a chat message refuses for its length.
TRANSCRIBED_THOUGH_CHAT_REFUSES = {"one-sample.wav", "ten-minutes.wav"}


def ids(items: list[Item]) -> list[str]:
    return [item.name for item in items]


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """fn() on a thread of its own; a failure if it takes longer than `seconds` (a hang)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed back to the test
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"no answer and no error after {seconds} s: a hang")
    if "error" in box:
        raise box["error"]
    return box["value"]


def assert_clear(message: str, item: Item, where: str) -> None:
    assert is_clear(message, item), f"{where}: unclear refusal of {item.name} (wanted /{item.error}/): {message!r}"


# -- fast: the corpus and the media reader ----------------------------------------------------------

def test_the_corpus_has_every_item_the_brief_lists():
    names = ids(CORPUS)
    assert len(names) == len(set(names))
    for name in ("empty.png", "truncated.png", "truncated.jpg", "bomb-900mp.png", "1x1.png", "20000x20.png",
                 "16bit.png", "cmyk.jpg", "palette-transparent.png", "animated.gif", "exif-rotated.jpg", "photo.jpg",
                 "empty.wav", "one-sample.wav", "ten-minutes.wav", "silence.wav", "nan.wav", "inf.wav",
                 "clipped.wav", "pcm8.wav", "pcm24.wav", "float32.wav", "float64.wav", "six-channels.wav",
                 "rate-8000.wav", "rate-22050.wav", "rate-44100.wav", "rate-48000.wav", "rate-96000.wav",
                 "lying-header.wav", "clip.mp3", "clip.flac", "clip.ogg", "over-context", "one-megabyte",
                 "non-utf8", "control-chars", "run-100k", "special-tokens", "lone-surrogate"):
        assert name in BY_NAME, name
    for item in CORPUS:
        assert item.expect in (ANSWER, REFUSE) and (item.expect == ANSWER) == (item.error is None), item
    assert len(BY_NAME["ten-minutes.wav"].data) < 5 * 2**20 and len(BY_NAME["one-megabyte"].data) == 2**20
    assert len(BY_NAME["bomb-900mp.png"].data) < 200 and len(BY_NAME["run-100k"].data) == 100_000
    assert "\ud800" in BY_NAME["lone-surrogate"].data and "\udce9" in BY_NAME["non-utf8"].data


def test_clear_means_named_and_no_traceback():
    item = BY_NAME["nan.wav"]
    assert is_clear("x.wav: the audio holds NaN or infinite samples", item)
    assert not is_clear("Traceback (most recent call last):\n ... NaN", item)
    assert not is_clear("Internal Server Error", item) and not is_clear("MemoryError", item)
    assert not is_clear("the model failed: MemoryError: std::bad_alloc", BY_NAME["rate-1hz-400k.wav"])
    assert not is_clear("the audio is bad", item)  # does not name the problem


@pytest.fixture(autouse=True)
def _fresh_media_caches():
    media.clear_caches()
    yield
    media.clear_caches()


@pytest.mark.parametrize("item", MEDIA, ids=ids(MEDIA))
def test_the_media_reader_decodes_or_refuses_clearly(item, tmp_path):
    read = media.read_image if item.kind == IMAGE else media.read_audio
    path = write_files([item], tmp_path)[item.name]
    for source in (item.data, path):
        if item.expect == ANSWER or item.name in READ_BUT_REFUSED_LATER:
            value = read(source)
            if item.kind == AUDIO:
                samples, rate = value
                assert samples.size and rate > 0 and float(abs(samples).max()) <= 1.0
            else:
                assert value.width >= 1 and value.height >= 1
        else:
            with pytest.raises(media.MediaError) as refused:
                read(source)
            assert_clear(str(refused.value), item, "media")
            if isinstance(source, Path):
                assert str(refused.value).startswith(str(source))  # the path first


# -- the tiny converted Phi-4-multimodal ---------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tests.tiny_checkpoint import TinyShapes, build_reference, save_native

    return save_native(build_reference(TinyShapes(max_ctx=N_CTX), seed=2), tmp_path_factory.mktemp("corpus-ckpt"))


@pytest.fixture(scope="module")
def tiny_model(checkpoint, tmp_path_factory):
    from convert.pipeline import convert_checkpoint

    out = tmp_path_factory.mktemp("corpus-model")
    convert_checkpoint(checkpoint, out, "f32", quiet=True)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_files(CORPUS, tmp_path_factory.mktemp("corpus-files"))


@pytest.fixture(scope="module")
def engine(tiny_model):
    from app.engine import LocalEngine

    eng = LocalEngine.load(tiny_model, n_ctx=N_CTX, n_threads=1, kv_type="f32")
    yield eng
    eng.close()


# -- the engine, in a child process: a crash there is a result, not the end of the test run ------------

ENGINE_CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    from tests.hostile_corpus import AUDIO, IMAGE, PROMPT, corpus, limit_memory
    limit_memory()
    from app import media
    from app.engine import LocalEngine
    from app.engine_api import Sampling

    model, folder, n_ctx = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    engine = LocalEngine.load(model, n_ctx=n_ctx, n_threads=1, kv_type="f32")

    def status_mb(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024

    def ask(content):
        media.clear_caches()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # the peak RSS (VmHWM) starts again from the current RSS
        except OSError:
            pass
        rss, t0 = status_mb("VmRSS"), time.monotonic()
        try:
            c = engine.generate([{"role": "user", "content": content}], Sampling(max_tokens=3))
            out = {"outcome": "answer", "finish": c.finish_reason, "tokens": c.usage.completion_tokens}
        except Exception as e:
            out = {"outcome": "error", "type": type(e).__name__, "message": str(e),
                   "classes": [k.__name__ for k in type(e).__mro__]}
        return {**out, "seconds": time.monotonic() - t0, "peak_growth_mb": status_mb("VmHWM") - rss}

    for item in corpus(n_ctx):
        forms = {}
        if item.kind == PROMPT:
            forms["text"] = item.data
        else:
            path = str(folder / item.name)
            forms["path"] = [{"type": item.kind, item.kind: path}, {"type": "text", "text": "What is this?"}]
            try:  # the decoded value, where the media reader reads the file (a heavy item: once is enough)
                if not item.heavy:
                    value = media.read_image(path) if item.kind == IMAGE else media.read_audio(path)
                    forms["value"] = [{"type": item.kind, item.kind: value}, {"type": "text", "text": "What?"}]
            except media.MediaError:
                pass
        for form, content in forms.items():
            print(json.dumps({"name": item.name, "form": form, "started": True}), flush=True)
            result = ask(content)
            after = ask("Hello, how are you today?")
            print(json.dumps({"name": item.name, "form": form, **result, "after": after}), flush=True)
    print(json.dumps({"done": True}), flush=True)
""")


@pytest.fixture(scope="module")
def engine_results(tiny_model, files):
    folder = next(iter(files.values())).parent
    run = subprocess.run([sys.executable, "-c", ENGINE_CHILD, str(tiny_model), str(folder), str(N_CTX)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    lines = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    results: dict[str, dict[str, dict]] = {}
    for line in lines:
        if "started" in line:
            results.setdefault(line["name"], {})[line["form"]] = {"outcome": "crash", "returncode": run.returncode,
                                                                 "stderr": run.stderr[-2000:]}
        elif "name" in line:
            results[line["name"]][line["form"]] = line
    results["_done"] = {"ok": bool(lines) and lines[-1] == {"done": True}, "returncode": run.returncode,
                        "stderr": run.stderr[-3000:]}
    return results


@pytest.mark.slow
@pytest.mark.parametrize("item", CORPUS, ids=ids(CORPUS))
def test_the_engine_answers_or_refuses_clearly_and_goes_on(item, engine_results):
    forms = engine_results.get(item.name)
    assert forms, f"the engine child never got to {item.name}: {engine_results['_done']}"
    assert item.kind == PROMPT or "path" in forms
    for form, result in forms.items():
        where = f"engine ({form})"
        assert result["outcome"] != "crash", f"{where}: the process died on {item.name}: {result}"
        if item.expect == ANSWER:
            assert result["outcome"] == "answer", f"{where}: {item.name} refused: {result}"
            assert result["tokens"] >= 1 or result["finish"] == "stop"
        else:
            assert result["outcome"] == "error", f"{where}: {item.name} answered: {result}"
            assert "ValueError" in result["classes"] or "EngineError" in result["classes"], result
            assert_clear(result["message"], item, where)
        assert result["after"]["outcome"] == "answer", f"{where}: the next normal request failed: {result['after']}"


@pytest.mark.slow
@pytest.mark.parametrize("item", [i for i in CORPUS if i.expect == REFUSE], ids=ids([i for i in CORPUS
                                                                                     if i.expect == REFUSE]))
def test_a_refusal_is_cheap(item, engine_results):
    for form, result in engine_results.get(item.name, {}).items():
        if result["outcome"] == "error":
            assert result["peak_growth_mb"] < REFUSAL_MB and result["seconds"] < 10, \
                f"engine ({form}): refusing {item.name} cost {result['peak_growth_mb']:,.0f} MB of peak memory " \
                f"and {result['seconds']:.1f} s: {result['message'][:200]}"


@pytest.mark.slow
def test_the_engine_child_went_through_the_whole_corpus(engine_results):
    assert engine_results["_done"]["ok"], engine_results["_done"]


# -- the conversation core ---------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("item", IN_PROCESS, ids=ids(IN_PROCESS))
def test_the_conversation_reports_the_error_and_goes_on(item, engine, files):
    from app.agents import FinalAnswer
    from app.conversation import Attachment, Conversation, Settings

    conversation = Conversation(engine, settings=Settings(max_tokens=3))

    def ask(text: str, attachments: list[Attachment]) -> FinalAnswer:
        finals = [e for e in within(TIMEOUT_S, lambda: list(conversation.ask(text, attachments)))
                  if isinstance(e, FinalAnswer)]
        assert len(finals) == 1
        return finals[0]

    if item.kind == PROMPT:
        final = ask(item.data, [])
    else:
        final = ask("What is this?", [Attachment(item.kind, str(files[item.name]))])
    turn = conversation.turns[-1]
    if item.expect == ANSWER:
        assert final.error is None and turn.error is None, final.error
        assert final.usage is not None and final.usage.prompt_tokens > 0
    else:
        assert final.error and turn.error == final.error and not turn.pending
        assert_clear(final.error, item, "conversation")
        if item.kind != PROMPT and item.name not in READ_BUT_REFUSED_LATER:
            assert item.name in final.error  # which attachment
    later = ask(NORMAL, [])
    assert later.error is None and later.usage.prompt_tokens > 0
    assert len(conversation.turns) == 2 and not conversation.busy
    if item.expect == REFUSE:  # the model never sees the failed question again
        assert all(m.get("content") != item.data for m in conversation.messages)


# -- the HTTP API, in this process ------------------------------------------------------------------

@pytest.fixture(scope="module")
def api_url(engine):
    from tests.api_server import serving

    with serving(engine, model_name="tiny") as url:
        yield url


def chat_body(item: Item, stream: bool = False) -> dict[str, Any]:
    if item.kind == PROMPT:
        content: Any = item.data
    elif item.kind == IMAGE:
        content = [{"type": "image_url", "image_url": {"url": item.data_url()}},
                   {"type": "text", "text": "What is this?"}]
    else:
        content = [{"type": "input_audio", "input_audio": {"data": item.b64(), "format": item.audio_format}},
                   {"type": "text", "text": "What is this?"}]
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 3,
            "temperature": 0, "stream": stream}


def check_api_answer(status: int, body: Any, item: Item, where: str) -> None:
    if item.expect == ANSWER:
        assert status == 200, f"{where}: {item.name}: {status} {body}"
    else:
        assert status == 400, f"{where}: {item.name}: {status} {body}"
        error = body["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert_clear(error["message"], item, where)


# The openai client (like gradio_client and httpx's json=) encodes a request as UTF-8 JSON, which a
# lone surrogate has no spelling in (UnicodeEncodeError in the client). Such text still reaches a
# server as JSON's "\\ud800" escape, as json.dumps writes it by default: sent that way here.
CLIENT_CANNOT_SEND = {"non-utf8", "lone-surrogate"}


def post_ascii_json(http: httpx.Client, url: str, body: dict[str, Any]) -> httpx.Response:
    return http.post(url, content=json.dumps(body), headers={"Content-Type": "application/json"})


def normal_request_works(http: httpx.Client, api_url: str) -> None:
    normal = http.post(f"{api_url}/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": NORMAL}], "max_tokens": 3})
    assert normal.status_code == 200 and normal.json()["choices"][0]["message"]["content"] is not None
    assert http.get(api_url.removesuffix("/v1") + "/health").json()["status"] == "ok"


@pytest.mark.slow
@pytest.mark.parametrize("item", IN_PROCESS, ids=ids(IN_PROCESS))
def test_the_http_api_answers_or_says_400_clearly(item, api_url):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=api_url, api_key="unused", timeout=TIMEOUT_S, max_retries=0)
    body = chat_body(item)
    with httpx.Client(timeout=TIMEOUT_S) as http:
        if item.name in CLIENT_CANNOT_SEND:
            response = post_ascii_json(http, f"{api_url}/chat/completions", body)
            check_api_answer(response.status_code, response.json(), item, "API")
        else:
            try:
                answer = client.chat.completions.create(**{k: v for k, v in body.items() if k != "stream"})
                check_api_answer(200, answer.model_dump(), item, "API")
                assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.prompt_tokens > 0
            except BadRequestError as e:
                check_api_answer(e.status_code, {"error": e.body}, item, "API")
        # Streamed, a refused prompt is still a plain 400 (the stream never opens), not a broken stream.
        request = http.build_request("POST", f"{api_url}/chat/completions", content=json.dumps(chat_body(item, True)),
                                     headers={"Content-Type": "application/json"})
        response = http.send(request, stream=True)
        try:
            raw = response.read().decode("utf-8", "replace")
        finally:
            response.close()
        if item.expect == ANSWER:
            assert response.status_code == 200 and raw.rstrip().endswith("data: [DONE]"), raw[-500:]
            assert '"error"' not in raw
        else:
            check_api_answer(response.status_code, json.loads(raw), item, "API (stream)")
        normal_request_works(http, api_url)


IN_PROCESS_AUDIO = [item for item in AUDIO_ITEMS if not item.capped]


@pytest.mark.slow
@pytest.mark.parametrize("item", IN_PROCESS_AUDIO, ids=ids(IN_PROCESS_AUDIO))
def test_audio_urls_read_as_input_audio_does(item, api_url):
    body = chat_body(item)
    body["messages"][0]["content"][0] = {"type": "audio_url", "audio_url": {"url": item.data_url()}}
    with httpx.Client(timeout=TIMEOUT_S) as http:
        response = post_ascii_json(http, f"{api_url}/chat/completions", body)
        check_api_answer(response.status_code, response.json(), item, "API (audio_url)")
        normal_request_works(http, api_url)


def transcribe(api_url: str, item: Item) -> tuple[int, Any]:
    """POST /audio/transcriptions (verbose_json) with the item as the file: (status, body), or a hang."""
    with httpx.Client(timeout=TRANSCRIBE_TIMEOUT_S) as http:
        try:
            response = http.post(f"{api_url}/audio/transcriptions", files={"file": (item.name, item.data)},
                                 data={"model": "whisper-1", "response_format": "verbose_json"})
        except httpx.TimeoutException:
            pytest.fail(f"transcriptions: no answer to {item.name} within {TRANSCRIBE_TIMEOUT_S} s")
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text


def check_transcription(status: int, body: Any, item: Item) -> None:
    if item.expect == ANSWER or item.name in TRANSCRIBED_THOUGH_CHAT_REFUSES:
        assert status == 200, f"{item.name}: {status} {body}"
        n_windows = max(1, -(-round(body["duration"] * 16_000) // (30 * 16_000)))
        assert len(body["segments"]) == n_windows and body["segments"][-1]["end"] == pytest.approx(body["duration"])
    else:
        assert status == 400 and isinstance(body, dict), f"{item.name}: {status} {str(body)[:300]}"
        assert body["error"]["param"] == "file", body
        assert_clear(body["error"]["message"], item, "transcriptions")


@pytest.mark.slow
@pytest.mark.parametrize("item", IN_PROCESS_AUDIO, ids=ids(IN_PROCESS_AUDIO))
def test_the_transcription_route_transcribes_or_says_400_clearly(item, api_url):
    check_transcription(*transcribe(api_url, item), item)
    with httpx.Client(timeout=TIMEOUT_S) as http:
        normal_request_works(http, api_url)


@pytest.mark.slow
@pytest.mark.parametrize("body", [
    b'{"model": "tiny", "messages": [{"role": "user", "content": "caf\xe9 \xff\xfe"}], "max_tokens": 3}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "\x00\x01 control"}], "max_tokens": 3}',
    b'{"model": "tiny", "messages": [{"role": "user", "content": "half',
], ids=["latin1-bytes", "raw-control-chars", "truncated-json"])
def test_a_body_that_is_not_json_in_utf8_is_400(body, api_url):
    with httpx.Client(timeout=TIMEOUT_S) as http:
        response = http.post(f"{api_url}/chat/completions", content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"] and not UNCLEAR.search(error["message"])
        normal_request_works(http, api_url)


# -- the HTTP API in a child process with its memory capped: what asks for gigabytes ----------------------

def peak_rss_mb(pid: int, reset: bool = False) -> float:
    """The process's peak RSS (VmHWM) in MB; `reset` starts it again from the current RSS."""
    if reset:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)[1]) / 1024


@pytest.fixture(scope="module")
def capped_api(tiny_model):
    """`python -m app.api` on the tiny model, its address space capped at CAP_MB: (url, process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "app.api", "--model", str(tiny_model), "--port", str(port),
                               "--ctx", str(N_CTX), "--threads", "1"], cwd=ROOT, preexec_fn=limit_memory,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url.removesuffix("/v1") + "/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"the API did not start: {server.communicate()[0][-2000:]}")
        time.sleep(0.2)
    yield url, server
    server.terminate()
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        server.kill()


CAPPED = [item for item in CORPUS if item.capped]


@pytest.mark.slow
@pytest.mark.parametrize("item", CAPPED, ids=ids(CAPPED))
def test_what_asks_for_gigabytes_is_refused_clearly_by_the_api(item, capped_api):
    url, server = capped_api
    with httpx.Client(timeout=TIMEOUT_S) as http:
        body = chat_body(item)
        del body["model"]  # the child serves its folder's name; no model named is the served one
        response = post_ascii_json(http, f"{url}/chat/completions", body)
        check_api_answer(response.status_code, response.json(), item, "API (capped)")
        assert server.poll() is None
        check_transcription(*transcribe(url, item), item)
        assert server.poll() is None, "the API process died"
        normal = http.post(f"{url}/chat/completions", json={"messages": [{"role": "user", "content": NORMAL}],
                                                            "max_tokens": 3})
        assert normal.status_code == 200


@pytest.mark.slow
def test_many_images_within_the_pixel_limit_are_refused_without_gigabytes_or_a_frozen_server(capped_api):
    # Twelve 200 kB PNGs of 64 MP each (the limit per image): 3 MB of request, far over the context.
    url, server = capped_api
    image = BY_NAME["64mp-solid.png"]
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image.data_url()}}
                                                      for _ in range(12)]}], "max_tokens": 3}
    base = peak_rss_mb(server.pid, reset=True)
    health: list[float] = []

    def probe_health() -> None:
        time.sleep(0.5)
        start = time.monotonic()
        try:
            httpx.get(url.removesuffix("/v1") + "/health", timeout=TIMEOUT_S)
        finally:
            health.append(time.monotonic() - start)

    prober = threading.Thread(target=probe_health, daemon=True)
    prober.start()
    with httpx.Client(timeout=TIMEOUT_S) as http:
        response = post_ascii_json(http, f"{url}/chat/completions", body)
    prober.join(TIMEOUT_S)
    grown = peak_rss_mb(server.pid) - base
    assert server.poll() is None, "the API process died"
    check_api_answer(response.status_code, response.json() if response.headers.get("content-type", "").startswith(
        "application/json") else {"error": {"message": response.text}}, image, "API (12 x 64 MP)")
    assert grown < 1024, f"refusing 3 MB of images cost {grown:,.0f} MB of memory"
    assert health and health[0] < 2, f"/health waited {health[0] if health else '>120'} s behind the images"


# -- the page: gradio_client's /chat, on SmolLM2 --------------------------------------------------------

PAGE_PROMPTS = prompts(PAGE_CTX)
# gradio_client cannot send CLIENT_CANNOT_SEND either (UnicodeEncodeError in the client): they go to
# the same endpoint as JSON escapes.
PAGE_MAX_TOKENS = 8  # /chat answers with the default settings (1,024 tokens: minutes for SmolLM2 here)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from app.model_store import ModelChoice, fallback_model_path
    from app.ui import handlers
    from app.ui.server import serve

    tmp = tmp_path_factory.mktemp("corpus-page")
    with pytest.MonkeyPatch.context() as patch:
        real = handlers.Handlers.new_conversation

        def shorter(self, system=None):
            conversation = real(self, system)
            conversation.settings.max_tokens = PAGE_MAX_TOKENS
            return conversation

        patch.setattr(handlers.Handlers, "new_conversation", shorter)
        running = serve(ModelChoice(fallback_model_path(), full=False), port=0, n_ctx=PAGE_CTX, block=False,
                        notes_path=tmp / "notes.json", conversations_root=tmp / "conversations")
        try:
            yield running
        finally:
            running.close()


@pytest.fixture(scope="module")
def page_client(page):
    from gradio_client import Client

    return Client(page.url, verbose=False)


def page_chat(client: Any, text: str) -> tuple[str, str]:
    """("answer", text) or ("error", message) from the page's /chat, within TIMEOUT_S."""
    from gradio_client.exceptions import AppError

    job = client.submit(text, api_name="/chat")
    try:
        return "answer", job.result(timeout=TIMEOUT_S)
    except AppError as e:
        return "error", str(e)


def page_chat_raw(url: str, text: str) -> tuple[str, str]:
    """The same endpoint without gradio_client: Gradio's HTTP API, the request as ASCII JSON."""
    base = url.rstrip("/")
    with httpx.Client(timeout=TIMEOUT_S) as http:
        started = http.post(f"{base}/gradio_api/call/chat", content=json.dumps({"data": [text]}),
                            headers={"Content-Type": "application/json"})
        assert started.status_code == 200, started.text
        events = http.get(f"{base}/gradio_api/call/chat/{started.json()['event_id']}").text
    kind = re.findall(r"^event: (\w+)", events, re.MULTILINE)[-1]
    data = json.loads(re.findall(r"^data: (.*)$", events, re.MULTILINE)[-1])
    if kind == "complete":
        return "answer", data[0]
    assert kind == "error", events
    return "error", str(data)


@pytest.mark.slow
@pytest.mark.parametrize("item", PAGE_PROMPTS, ids=ids(PAGE_PROMPTS))
def test_the_page_chat_answers_or_refuses_clearly(item, page, page_client):
    if item.name in CLIENT_CANNOT_SEND:
        outcome, text = within(TIMEOUT_S + 10, lambda: page_chat_raw(page.url, item.data))
    else:
        outcome, text = within(TIMEOUT_S + 10, lambda: page_chat(page_client, item.data))
    if item.expect == ANSWER:
        assert outcome == "answer" and isinstance(text, str) and text.strip(), (outcome, text)
    else:
        assert outcome == "error", (outcome, text[:300])
        assert_clear(text, item, "page")
    outcome, text = within(TIMEOUT_S + 10, lambda: page_chat(page_client, NORMAL))
    assert outcome == "answer" and text.strip()


# -- the voice assistant's file mode, in child processes ---------------------------------------------------

VOICE_ITEMS = audio(N_CTX)
NO_SPEECH = re.compile(r"^no speech found in .+$", re.MULTILINE)


@pytest.fixture(scope="module")
def voice_runs(tiny_model, files, tmp_path_factory):
    data = tmp_path_factory.mktemp("voice-data")

    def run(item: Item) -> tuple[Item, subprocess.CompletedProcess | str]:
        try:
            return item, subprocess.run(
                [sys.executable, "-m", "app.voice", "--wav", str(files[item.name]), "--model", str(tiny_model),
                 "--max-tokens", "2", "--no-speak", "--threads", "1"],
                cwd=ROOT, capture_output=True, text=True, timeout=VOICE_TIMEOUT_S, stdin=subprocess.DEVNULL,
                env={**os.environ, "XDG_DATA_HOME": str(data)}, preexec_fn=limit_memory)
        except subprocess.TimeoutExpired:
            return item, f"no exit after {VOICE_TIMEOUT_S} s"

    with ThreadPoolExecutor(2) as pool:  # 2 cores
        return {item.name: result for item, result in pool.map(run, VOICE_ITEMS)}


@pytest.mark.slow
@pytest.mark.parametrize("item", VOICE_ITEMS, ids=ids(VOICE_ITEMS))
def test_voice_file_mode_answers_or_exits_2_with_one_line(item, voice_runs):
    run = voice_runs[item.name]
    assert not isinstance(run, str), f"{item.name}: a hang: {run}"
    assert "Traceback" not in run.stderr and run.returncode >= 0, (run.returncode, run.stderr[-2000:])
    if item.expect == REFUSE and run.returncode == 2:
        lines = run.stderr.strip().splitlines()
        assert len([line for line in lines if line.startswith("phi4mm-voice:")]) == 1 and \
            lines[-1].startswith("phi4mm-voice: "), run.stderr
        assert_clear(lines[-1], item, "voice")
    elif run.returncode == 0:
        assert re.search(r"^\d+ utterance\(s\) answered$", run.stderr, re.MULTILINE), run.stderr
        assert "assistant: " in run.stdout
        # an utterance the engine refuses (too short, too long) is said in the dialogue, not a crash
        refused = re.findall(r"\[cannot answer: (.*)\]", run.stdout)
        if item.expect == ANSWER:
            assert not refused, run.stdout
    else:
        # A recording in which voice activity detection hears no speech (silence, one sample,
        # ten minutes of low noise): exit 1, said so.
        assert run.returncode == 1 and NO_SPEECH.search(run.stderr), (run.returncode, run.stderr[-2000:])
        assert item.name in {"silence.wav", "one-sample.wav", "ten-minutes.wav"}, \
            f"{item.name}: {run.stderr.strip().splitlines()[-2:]}"


# -- the converter ------------------------------------------------------------------------------------

def convert_fails_in_one_line(*args: Any) -> str:
    run = subprocess.run([sys.executable, "-m", "convert", *map(str, args), "--quiet"], cwd=ROOT,
                         capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    return run.stderr.strip()


@pytest.mark.slow
def test_the_converter_refuses_bad_input_in_one_line(checkpoint, files, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(checkpoint, src)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 3])
    assert "is truncated" in convert_fails_in_one_line(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    weights.write_bytes(data)

    (tmp_path / "a-file").write_text("not a folder")
    assert "exists and is not a folder" in convert_fails_in_one_line(src, tmp_path / "a-file")
    assert (tmp_path / "a-file").read_text() == "not a folder"
    # A corpus file where a checkpoint folder should be, and an empty folder.
    assert convert_fails_in_one_line(files["photo.jpg"], tmp_path / "out2")
    (tmp_path / "empty").mkdir()
    assert "no config.json" in convert_fails_in_one_line(tmp_path / "empty", tmp_path / "out3")
