"""Robustness: the hostile-input corpus through every entry point, what a kill -9 loses, and a soak.

    python bench/robustness.py [MODEL_DIR] [--quick] [--requests 200] [--clients 8] [--kills 30]

MODEL_DIR is a converted Phi-4-multimodal folder; the default is the random-weight tiny-shape
checkpoint of bench/make_checkpoint.py, converted to f16 (made once in ~/.cache/phi4mm-bench),
which answers in milliseconds, so that what is measured is the app around the model.

1. The corpus (tests/hostile_corpus.py: broken, huge, odd and lying images, audio and prompts,
   each with what must become of it) through each entry point. Everything that loads the model
   runs in a child process with its address space capped (tests/hostile_corpus.py CAP_MB), so
   that a crash or an allocation of gigabytes is counted instead of ending the bench or pushing
   the machine into the OOM killer:
   - engine: `LocalEngine.generate`, each image/audio item as a path and as its decoded value;
   - conversation: `Conversation.ask` with an `Attachment` path (prompts as the question);
   - HTTP API: `python -m app.api`: chat completions (images as data: URLs, audio as
     input_audio and as audio_url), /v1/audio/transcriptions for the audio, one request of
     twelve 64-megapixel images, and three bodies that are not UTF-8 JSON;
   - page: the app (`app.ui.server.serve`) and gradio_client's `/chat`, for the prompts (the
     two a UTF-8 JSON client cannot encode, lone surrogates, go to the same endpoint as JSON
     escapes);
   - voice: `python -m app.voice --wav FILE --max-tokens 2 --no-speak --threads 1`, per clip;
   - converter: `python -m convert` on a truncated safetensors, an OUT that is a file, a corpus
     file as SRC.
   Per entry point: inputs tried; crashes (the process died) and hangs (no answer within the
   timeout), both must be 0; clear errors (a refusal whose message names the problem:
   tests/hostile_corpus.py `is_clear`); answers; unclear errors; outcomes other than the item
   expects; and whether the next normal request was answered. Every miss is listed under the table.
2. Losses: two processes adding 50 notes each to one notes file (tools/notes.py), then the
   notes that are missing; a conversation saved again and again (app/conversation_store.py) by
   a child process that a kill -9 hits at a random moment, --kills times: after each kill the
   last saved version must open, with every turn it had and every image and audio file readable.
3. Soak: --requests mixed requests (page /chat; API text, image and audio) from --clients
   concurrent clients against the app on the model (page and API on one engine), its resident
   memory after a warm-up that sends every picture and clip once (the bounded caches full) and
   at the end, the growth, and whether every client got every answer.

--quick: the soak at 40 requests and 8 kills. Nothing here asserts: the figures are printed.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import queue
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import numpy as np  # noqa: E402

from tests.signals import voiced  # noqa: E402
from tests.hostile_corpus import (  # noqa: E402
    ANSWER,
    AUDIO,
    CAP_MB,
    IMAGE,
    PROMPT,
    REFUSE,
    Item,
    corpus,
    is_clear,
    limit_memory,
    summary,
    write_files,
)

ROOT = Path(__file__).resolve().parent.parent
N_CTX = 4096
TIMEOUT_S = 120            # one request
TRANSCRIBE_TIMEOUT_S = 45  # the 10-minute clip is 20 windows: seconds on the tiny model
VOICE_TIMEOUT_S = 60
APP_CAP_MB = 8192          # the page process: Gradio's threads reserve more address space
NORMAL = "Hello, how are you today?"
# The engine refuses these for their length (a chat message); the transcription route pads or
# windows them and answers.
TRANSCRIBED = {"one-sample.wav", "ten-minutes.wav"}
NO_SPEECH_OK = {"silence.wav", "one-sample.wav", "ten-minutes.wav"}


# -- counting ------------------------------------------------------------------------------------

@dataclass
class Tally:
    """What one entry point did with the inputs it was given."""
    name: str
    tried: int = 0
    crashes: int = 0
    hangs: int = 0
    clear: int = 0
    answers: int = 0
    unclear: int = 0
    unexpected: int = 0
    next_ok: int = 0
    next_tried: int = 0
    slowest_refusal_s: float = 0.0
    misses: list[str] = field(default_factory=list)

    def record(self, item: Item, outcome: str, message: str = "", seconds: float = 0.0, where: str = "",
               expect: str | None = None) -> None:
        """outcome: answer, error, crash or hang; `expect` overrides the item's own expectation."""
        self.tried += 1
        expect = expect or item.expect
        label = f"{item.name}{f' ({where})' if where else ''}"
        short = " ".join(str(message).split())[:160]
        if outcome == "crash":
            self.crashes += 1
            self.misses.append(f"CRASH {label}: {short}")
        elif outcome == "hang":
            self.hangs += 1
            self.misses.append(f"HANG {label}: {short}")
        elif outcome == "answer":
            self.answers += 1
            if expect == REFUSE:
                self.unexpected += 1
                self.misses.append(f"answered, a refusal was due: {label}")
        else:
            self.slowest_refusal_s = max(self.slowest_refusal_s, seconds)
            if is_clear(message, item):
                self.clear += 1
            else:
                self.unclear += 1
                self.misses.append(f"unclear error {label}: {short!r}")
            if expect == ANSWER:
                self.unexpected += 1
                self.misses.append(f"refused, an answer was due: {label}: {short!r}")

    def followed(self, ok: bool, label: str = "", why: str = "") -> None:
        self.next_tried += 1
        self.next_ok += ok
        if not ok:
            self.misses.append(f"the next normal request failed after {label}{f': {why}' if why else ''}")


def print_tallies(tallies: list[Tally]) -> None:
    head = ("entry point", "tried", "crashes", "hangs", "clear errors", "answers", "unclear", "unexpected",
            "next ok", "slowest refusal")
    rows = [head] + [(t.name, str(t.tried), str(t.crashes), str(t.hangs), str(t.clear), str(t.answers),
                      str(t.unclear), str(t.unexpected), f"{t.next_ok}/{t.next_tried}" if t.next_tried else "-",
                      f"{t.slowest_refusal_s:.1f} s") for t in tallies]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    for row in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    for t in tallies:
        for miss in t.misses:
            print(f"  {t.name}: {miss}")
    print(flush=True)


# -- child processes -------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_mb(pid: int | str, key: str) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    found = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
    return int(found[1]) / 1024 if found else 0.0


def reset_peak(pid: int | str) -> None:
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM starts again from the current RSS
    except OSError:
        pass


class Lines:
    """A child's stdout, line by line, with a timeout per line."""

    def __init__(self, process: subprocess.Popen):
        self.process = process
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def next(self, timeout: float) -> str | None:
        """The next line; None at the end; TimeoutError when none came in time."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None


# The engine and the conversation core, in a child (python bench/robustness.py --child MODE ...):
# one JSON line when an input starts, one with its outcome, so that the parent can tell which
# input a crash or a hang belongs to, and start a new child at the next one.

def child(mode: str, model: str, folder: str, start: int) -> int:
    limit_memory()
    from app import media
    from app.agents import FinalAnswer
    from app.conversation import Attachment, Conversation, Settings
    from app.engine import LocalEngine
    from app.engine_api import Sampling

    engine = LocalEngine.load(model, n_ctx=N_CTX, n_threads=1)
    items = corpus(N_CTX)

    def engine_ask(content: Any) -> dict[str, Any]:
        try:
            engine.generate([{"role": "user", "content": content}], Sampling(max_tokens=3))
            return {"outcome": "answer"}
        except Exception as e:
            return {"outcome": "error", "message": str(e) or type(e).__name__, "type": type(e).__name__}

    def conversation_ask(conversation: Conversation, text: str, attachments: list) -> dict[str, Any]:
        final = [e for e in conversation.ask(text, attachments) if isinstance(e, FinalAnswer)][-1]
        return {"outcome": "error", "message": final.error} if final.error else {"outcome": "answer"}

    for index in range(start, len(items)):
        item = items[index]
        path = str(Path(folder) / item.name)
        if mode == "engine":
            forms: dict[str, Callable[[], dict]] = {}
            if item.kind == PROMPT:
                forms["text"] = lambda: engine_ask(item.data)
            else:
                forms["path"] = lambda: engine_ask([{"type": item.kind, item.kind: path},
                                                    {"type": "text", "text": "What is this?"}])
                try:  # the decoded value too (a heavy item: once is enough)
                    if not item.heavy:
                        value = media.read_image(path) if item.kind == IMAGE else media.read_audio(path)
                        forms["value"] = lambda: engine_ask([{"type": item.kind, item.kind: value},
                                                             {"type": "text", "text": "What is this?"}])
                except media.MediaError:
                    pass
        else:
            conversation = Conversation(engine, settings=Settings(max_tokens=3))
            if item.kind == PROMPT:
                forms = {"question": lambda: conversation_ask(conversation, item.data, [])}
            else:
                forms = {"attachment": lambda: conversation_ask(conversation, "What is this?",
                                                                [Attachment(item.kind, path)])}
        for form, ask in forms.items():
            print(json.dumps({"index": index, "form": form, "started": True}), flush=True)
            media.clear_caches()
            reset_peak("self")
            rss, t0 = status_mb("self", "VmRSS"), time.monotonic()
            result = ask()
            result.update(seconds=time.monotonic() - t0, peak_mb=status_mb("self", "VmHWM") - rss)
            if mode == "engine":
                after = engine_ask(NORMAL)
            else:
                after = conversation_ask(conversation, NORMAL, [])
            print(json.dumps({"index": index, "form": form, **result, "next_ok": after["outcome"] == "answer",
                              "next_error": after.get("message", "")}), flush=True)
    print(json.dumps({"done": True}), flush=True)
    return 0


def run_in_children(mode: str, model: Path, folder: Path, items: list[Item], tally: Tally,
                    costs: dict[str, tuple[float, float]]) -> None:
    start = 0
    while start < len(items):
        errors = open(folder.parent / f"{mode}-child.log", "a+")  # a pipe nobody reads could fill and block it
        process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", mode, str(model),
                                    str(folder), str(start)], cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=errors, text=True)
        lines, current, next_start = Lines(process), None, len(items)
        try:
            while True:
                try:
                    line = lines.next(TIMEOUT_S if current is not None else 300)
                except TimeoutError:
                    if current is not None:
                        tally.record(items[current[0]], "hang", f"no outcome in {TIMEOUT_S} s", where=current[1])
                        next_start = current[0] + 1
                    process.kill()
                    break
                if line is None:  # the child ended
                    process.wait()
                    if current is not None:
                        errors.seek(0)
                        tally.record(items[current[0]], "crash", f"exit status {process.returncode}: "
                                     f"{errors.read()[-300:]}", where=current[1])
                        next_start = current[0] + 1
                    break
                if not line.startswith("{"):
                    continue
                event = json.loads(line)
                if event.get("done"):
                    process.wait()
                    break
                if event.get("started"):
                    current = (event["index"], event["form"])
                    continue
                item = items[event["index"]]
                tally.record(item, event["outcome"], event.get("message", ""), event["seconds"], event["form"])
                tally.followed(event["next_ok"], f"{item.name} ({event['form']})", event["next_error"])
                if event["outcome"] == "error":
                    name = f"{item.name} ({event['form']})"
                    costs[f"{mode}: {name}"] = (event["seconds"], event["peak_mb"])
                current = None
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            errors.close()
        start = next_start


# -- the HTTP API ----------------------------------------------------------------------------------

class Server:
    """A child process serving HTTP (python -m app.api, or the app), restarted after a crash."""

    def __init__(self, command: Callable[[int], list[str]], ready_path: str, cap_mb: int, log: Path):
        self.command, self.ready_path, self.cap_mb, self.log = command, ready_path, cap_mb, log
        self.process: subprocess.Popen | None = None
        self.base = ""
        self.start()

    def start(self) -> None:
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        log = open(self.log, "a")
        self.process = subprocess.Popen(self.command(port), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, preexec_fn=lambda: limit_memory(self.cap_mb))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server did not start: see {self.log}")
            try:
                if httpx.get(self.base + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"the server did not start in 120 s: see {self.log}")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def check(self, tally: Tally, item: Item, where: str) -> bool:
        """False (a crash recorded, the server restarted) when the process has died."""
        if self.alive:
            return True
        tally.crashes += 1
        tally.misses.append(f"CRASH {item.name} ({where}): the server died (exit {self.process.returncode})")
        self.start()
        return False

    def rss_mb(self) -> float:
        return status_mb(self.process.pid, "VmRSS")

    def stop(self) -> None:
        if self.alive:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def chat_content(item: Item, audio_as: str = "input_audio") -> Any:
    if item.kind == PROMPT:
        return item.data
    if item.kind == IMAGE:
        part = {"type": "image_url", "image_url": {"url": item.data_url()}}
    elif audio_as == "input_audio":
        part = {"type": "input_audio", "input_audio": {"data": item.b64(), "format": item.audio_format}}
    else:
        part = {"type": "audio_url", "audio_url": {"url": item.data_url()}}
    return [part, {"type": "text", "text": "What is this?"}]


def post_json(http: httpx.Client, url: str, body: dict[str, Any], timeout: float = TIMEOUT_S) -> httpx.Response:
    # As json.dumps writes it: ASCII, a lone surrogate as its \\ud800 escape (UTF-8 JSON has no spelling for it).
    return http.post(url, content=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=timeout)


def api_outcome(response: httpx.Response) -> tuple[str, str]:
    if response.status_code == 200:
        return "answer", ""
    try:
        return "error", f"{response.status_code}: {response.json()['error']['message']}"
    except (ValueError, KeyError, TypeError):
        return "error", f"{response.status_code}: {response.text[:200]}"


def api_entry(model: Path, items: list[Item], log: Path) -> tuple[Tally, list[str]]:
    tally, extra = Tally("HTTP API"), []
    server = Server(lambda port: [sys.executable, "-m", "app.api", "--model", str(model), "--port", str(port),
                                  "--ctx", str(N_CTX), "--threads", "1"], "/health", CAP_MB, log)
    chat = lambda: server.base + "/v1/chat/completions"  # noqa: E731 (the port changes after a restart)

    def normal_ok(http: httpx.Client) -> tuple[bool, str]:
        try:
            response = post_json(http, chat(), {"messages": [{"role": "user", "content": NORMAL}], "max_tokens": 3})
            return response.status_code == 200, f"{response.status_code} {response.text[:160]}"
        except httpx.HTTPError as e:
            return False, f"{type(e).__name__}: {e}"

    def attempt(http: httpx.Client, item: Item, where: str, send: Callable[[], httpx.Response],
                expect: str | None = None) -> None:
        t0 = time.monotonic()
        try:
            outcome, message = api_outcome(send())
        except httpx.TimeoutException:
            outcome, message = "hang", "no response within the timeout"
        except httpx.TransportError as e:
            outcome, message = "crash", f"{type(e).__name__}: {e}"
        if not server.check(tally, item, where):
            tally.tried += 1
            return
        tally.record(item, outcome, message, time.monotonic() - t0, where, expect)
        ok, why = normal_ok(http)
        tally.followed(ok, f"{item.name} ({where})", why)

    try:
        with httpx.Client() as http:
            for item in items:
                body = {"messages": [{"role": "user", "content": chat_content(item)}], "max_tokens": 3}
                attempt(http, item, "chat", lambda: post_json(http, chat(), body))
                if item.kind == AUDIO:
                    url_body = {"messages": [{"role": "user", "content": chat_content(item, "audio_url")}],
                                "max_tokens": 3}
                    attempt(http, item, "audio_url", lambda: post_json(http, chat(), url_body))
                    attempt(http, item, "transcription", lambda: http.post(
                        server.base + "/v1/audio/transcriptions", files={"file": (item.name, item.data)},
                        data={"model": "whisper-1"}, timeout=TRANSCRIBE_TIMEOUT_S),
                        expect=ANSWER if item.name in TRANSCRIBED else None)
            # One request of twelve 64 MP images (each within the pixel limit): 3 MB of body.
            big = next(i for i in items if i.name == "64mp-solid.png")
            body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": big.data_url()}}] * 12}], "max_tokens": 3}
            reset_peak(server.process.pid)
            base, health = server.rss_mb(), []

            def probe() -> None:
                time.sleep(0.5)
                t0 = time.monotonic()
                try:
                    httpx.get(server.base + "/health", timeout=TIMEOUT_S)
                finally:
                    health.append(time.monotonic() - t0)

            prober = threading.Thread(target=probe, daemon=True)
            prober.start()
            attempt(http, big, "12 images in one request", lambda: post_json(http, chat(), body))
            prober.join(TIMEOUT_S)
            if server.alive:
                extra.append(f"12 x 64 MP images in one 3 MB request: server peak memory +"
                             f"{status_mb(server.process.pid, 'VmHWM') - base:,.0f} MB; /health answered in "
                             f"{health[0] if health else float('nan'):.1f} s meanwhile")
            for raw, label in ((b'{"messages": [{"role": "user", "content": "caf\xe9 \xff"}]}', "Latin-1 bytes"),
                               (b'{"messages": [{"role": "user", "content": "\x00 raw NUL"}]}', "raw control chars"),
                               (b'{"messages": [{"role": "user", "content": "half', "truncated JSON")):
                t0 = time.monotonic()
                response = http.post(chat(), content=raw, headers={"Content-Type": "application/json"},
                                     timeout=TIMEOUT_S)
                pseudo = Item(label, PROMPT, "", REFUSE, r".")
                tally.record(pseudo, *api_outcome(response), time.monotonic() - t0, "body")
                ok, why = normal_ok(http)
                tally.followed(ok, label, why)
    finally:
        server.stop()
    return tally, extra


# -- the page ----------------------------------------------------------------------------------------

APP_CHILD = """
import ctypes, signal, sys
from pathlib import Path
from app.model_store import ModelChoice
# SIGUSR1: give the C heap's free memory back to the system (glibc malloc_trim), to tell memory the
# allocator keeps from memory still in use.
signal.signal(signal.SIGUSR1, lambda *args: ctypes.CDLL("libc.so.6").malloc_trim(0))
from app.ui.server import serve
model, port, data = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
serve(ModelChoice(model, full=True), port=port, n_ctx=int(sys.argv[4]), n_threads=1, block=True,
      notes_path=data / "notes.json", conversations_root=data / "conversations")
"""


def app_server(model: Path, data: Path, log: Path) -> Server:
    return Server(lambda port: [sys.executable, "-c", APP_CHILD, str(model), str(port), str(data), str(N_CTX)],
                  "/v1/models", APP_CAP_MB, log)


def page_chat(client: Any, base: str, text: str) -> tuple[str, str]:
    """("answer", text) or ("error", message) from /chat. Text a UTF-8 JSON client cannot encode
    (lone surrogates) goes to the same endpoint as JSON escapes."""
    from gradio_client.exceptions import AppError

    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        started = httpx.post(f"{base}/gradio_api/call/chat", content=json.dumps({"data": [text]}),
                             headers={"Content-Type": "application/json"}, timeout=TIMEOUT_S)
        events = httpx.get(f"{base}/gradio_api/call/chat/{started.json()['event_id']}", timeout=TIMEOUT_S).text
        kind = re.findall(r"^event: (\w+)", events, re.MULTILINE)[-1]
        data = json.loads(re.findall(r"^data: (.*)$", events, re.MULTILINE)[-1])
        return ("answer", data[0]) if kind == "complete" else ("error", str(data))
    try:
        return "answer", client.submit(text, api_name="/chat").result(timeout=TIMEOUT_S)
    except AppError as e:
        return "error", str(e)


def page_entry(model: Path, items: list[Item], data: Path, log: Path) -> Tally:
    from gradio_client import Client

    tally = Tally("page /chat")
    server = app_server(model, data, log)
    try:
        client = Client(server.base, verbose=False)
        for item in items:
            t0 = time.monotonic()
            try:
                outcome, message = page_chat(client, server.base, item.data)
            except TimeoutError:
                outcome, message = "hang", f"no answer in {TIMEOUT_S} s"
            except Exception as e:  # the connection went away with the server
                outcome, message = ("crash" if not server.alive else "error"), f"{type(e).__name__}: {e}"
            if not server.check(tally, item, "chat"):
                tally.tried += 1
                client = Client(server.base, verbose=False)
                continue
            tally.record(item, outcome, message, time.monotonic() - t0)
            try:
                tally.followed(page_chat(client, server.base, NORMAL)[0] == "answer", item.name)
            except Exception:
                tally.followed(False, item.name)
    finally:
        server.stop()
    return tally


# -- the voice file mode and the converter ---------------------------------------------------------------

def voice_entry(model: Path, items: list[Item], files: dict[str, Path], data: Path) -> Tally:
    tally = Tally("voice --wav")

    def run(item: Item) -> tuple[Item, Any, float]:
        t0 = time.monotonic()
        try:
            return item, subprocess.run(
                [sys.executable, "-m", "app.voice", "--wav", str(files[item.name]), "--model", str(model),
                 "--max-tokens", "2", "--no-speak", "--threads", "1"], cwd=ROOT, capture_output=True, text=True,
                timeout=VOICE_TIMEOUT_S, stdin=subprocess.DEVNULL, env={**os.environ, "XDG_DATA_HOME": str(data)},
                preexec_fn=limit_memory), time.monotonic() - t0
        except subprocess.TimeoutExpired:
            return item, None, time.monotonic() - t0

    with ThreadPoolExecutor(2) as pool:
        for item, run_, seconds in pool.map(run, items):
            if run_ is None:
                tally.record(item, "hang", f"no exit in {VOICE_TIMEOUT_S} s")
                continue
            err = run_.stderr.strip().splitlines()
            if run_.returncode < 0 or "Traceback" in run_.stderr:
                tally.record(item, "crash", f"exit {run_.returncode}: {' | '.join(err[-3:])}")
            elif run_.returncode == 0:
                refused = re.findall(r"\[cannot answer: (.*)\]", run_.stdout)
                if refused and item.expect == REFUSE:  # said in the dialogue: a clear refusal
                    tally.record(item, "error", refused[0], seconds)
                else:
                    tally.record(item, "answer", seconds=seconds)
            elif run_.returncode == 2 and err and err[-1].startswith("phi4mm-voice: ") and \
                    sum(line.startswith("phi4mm-voice:") for line in err) == 1:
                tally.record(item, "error", err[-1], seconds)
            elif run_.returncode == 1 and err and err[-1].startswith("no speech found"):
                tally.answers += 1  # a clear outcome: nothing to answer
                tally.tried += 1
                if item.name not in NO_SPEECH_OK:
                    tally.unexpected += 1
                    tally.misses.append(f"{item.name}: exit 1 '{err[-1]}' after {seconds:.0f} s; "
                                        f"{'a refusal' if item.expect == REFUSE else 'an answer'} was due")
            else:
                tally.record(item, "error", f"exit {run_.returncode}: {' | '.join(err[-3:])}", seconds)
    return tally


def converter_entry(work: Path, files: dict[str, Path]) -> Tally:
    from bench.make_checkpoint import TINY, default_folder, make_checkpoint

    tally = Tally("converter")
    checkpoint = default_folder(TINY)
    if not (checkpoint / "config.json").exists():
        make_checkpoint(checkpoint, TINY, progress=False)
    src = work / "checkpoint"
    shutil.copytree(checkpoint, src)
    shard = sorted(src.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    (work / "a-file").write_text("not a folder")
    cases = [(src, work / "out", r"truncated", "truncated safetensors"),
             (default_folder(TINY), work / "a-file", r"not a folder", "OUT is a file"),
             (files["photo.jpg"], work / "out2", r"photo\.jpg", "SRC is a corpus file")]
    for source, out, pattern, label in cases:
        t0 = time.monotonic()
        try:
            run = subprocess.run([sys.executable, "-m", "convert", str(source), str(out), "--quiet"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            tally.record(Item(label, PROMPT, "", REFUSE, pattern), "hang", "no exit")
            continue
        one_line = run.stderr.startswith("error: ") and run.stderr.count("\n") == 1
        outcome = "crash" if run.returncode < 0 else "error"
        message = run.stderr.strip() if one_line and run.returncode == 2 else f"exit {run.returncode}: {run.stderr}"
        tally.record(Item(label, PROMPT, "", REFUSE, pattern), outcome, message, time.monotonic() - t0)
    return tally


# -- losses ----------------------------------------------------------------------------------------------

NOTES_CHILD = """
import sys
from tools.notes import NoteBook
book = NoteBook(sys.argv[1])
for k in range(int(sys.argv[3])):
    book.add_note(f"process {sys.argv[2]} note {k}")
"""


def notes_lost(work: Path, per_process: int = 50) -> str:
    path = work / "notes.json"
    children = [subprocess.Popen([sys.executable, "-c", NOTES_CHILD, str(path), str(p), str(per_process)], cwd=ROOT)
                for p in range(2)]
    for c in children:
        c.wait(TIMEOUT_S)
    from tools.notes import NoteBook

    notes = NoteBook(path).list_notes(limit=200)
    texts = {n["text"] for n in notes}
    wanted = {f"process {p} note {k}" for p in range(2) for k in range(per_process)}
    ids = [n["id"] for n in notes]
    return (f"notes: 2 processes x {per_process} added at once: {len(texts & wanted)} kept, "
            f"{len(wanted - texts)} lost, ids unique: {len(ids) == len(set(ids))}")


SAVER_CHILD = """
import sys
from pathlib import Path
import numpy as np
from PIL import Image
from app import conversation_store
from app.conversation import Attachment, Conversation
from app.engine_api import AUDIO, IMAGE
from tests.fakes import ScriptedEngine

folder, photo, in_memory = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "memory"
conversation = Conversation(ScriptedEngine(*(["Noted."] * 10_000)))
rng = np.random.default_rng(0)
camera = Image.fromarray(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8))  # a webcam frame
voice = (0.1 * np.sin(np.arange(48_000) / 9).astype(np.float32), 16_000)        # as the voice app holds it
for k in range(10_000):
    if in_memory:
        attachments = [Attachment(IMAGE, data=camera), Attachment(AUDIO, data=voice)] if k == 0 else []
    else:  # as the page attaches an upload: a private copy of the file
        attachments = [Attachment(IMAGE, conversation.keep(photo))]
    list(conversation.ask(f"question {k}", attachments))
    print(f"saving {len(conversation.turns)}", flush=True)
    conversation_store.save(conversation, folder)
    print(f"saved {len(conversation.turns)}", flush=True)
"""


def readable(folder: Path) -> tuple[bool, int, str]:
    """Whether the saved conversation opens with every media file readable: (ok, turns, why not)."""
    from app import conversation_store, media
    from tests.fakes import ScriptedEngine

    try:
        conversation = conversation_store.load(folder, ScriptedEngine())
    except ValueError as e:
        return False, 0, f"does not open: {e}"
    paths = [(a.kind, a.path) for t in conversation.turns for a in t.attachments]
    paths += [(p["type"], p[p["type"]]) for m in conversation.messages if isinstance(m.get("content"), list)
              for p in m["content"] if p.get("type") in (IMAGE, AUDIO)]
    for kind, path in paths:
        try:
            media.read_image(path) if kind == IMAGE else media.read_audio(path)
        except (OSError, media.MediaError) as e:
            return False, len(conversation.turns), f"media/{Path(path).name}: {str(e).replace(f'{path}: ', '')}"
    return True, len(conversation.turns), ""


def conversations_lost(work: Path, kills: int, scenario: str, seed: int = 0) -> list[str]:
    """`kills` times: a child saves a conversation again and again, a kill -9 hits it at a random
    moment after its first save; then the folder must open with every turn saved and readable media.
    scenario "files": every question has an image file attached as the page does (Conversation.keep);
    "memory": the first question has a webcam frame and a voice clip held in memory."""
    from PIL import Image

    rng = random.Random(seed)
    photo = work / "photo.png"
    if not photo.exists():
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (1500, 2000, 3), dtype=np.uint8)).save(photo)
    lost, mid_save, why, save_times = 0, 0, [], []
    for k in range(kills):
        folder, tmp = work / f"saved-{scenario}-{k}", work / f"tmp-{scenario}-{k}"
        tmp.mkdir()
        process = subprocess.Popen([sys.executable, "-c", SAVER_CHILD, str(folder), str(photo), scenario], cwd=ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                   env={**os.environ, "TMPDIR": str(tmp)})  # its private copies, removed below
        lines = Lines(process)
        saved, saving, t_saving, deadline = 0, None, 0.0, None
        while True:  # the first save, then a kill at a random moment within the next few saves
            try:
                line = lines.next(120 if deadline is None else max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                break
            if line is None:
                break
            if line.startswith("saving"):
                saving, t_saving = int(line.split()[1]), time.monotonic()
            elif line.startswith("saved"):
                saved, saving = int(line.split()[1]), None
                save_times.append(time.monotonic() - t_saving)
                if deadline is None:
                    deadline = time.monotonic() + rng.uniform(0, 4 * statistics.median(save_times))
            if deadline is not None and time.monotonic() >= deadline:
                break
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        while (line := lines.next(5)) is not None:  # what it printed before it died
            if line.startswith("saving"):
                saving = int(line.split()[1])
            elif line.startswith("saved"):
                saved, saving = int(line.split()[1]), None
        mid_save += saving is not None
        ok, turns, reason = readable(folder)
        if not ok or turns < saved:
            lost += 1
            why.append(f"kill {k + 1} ({'mid-save' if saving is not None else 'between saves'}, {saved} turns "
                       f"saved): {reason or f'{turns} turns opened'}")
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    what = {"files": "an image file attached to every question, as the page does",
            "memory": "a webcam frame and a voice clip held in memory"}[scenario]
    return [f"conversation ({what}) saved after every answer, kill -9 at a random moment: {kills} kills, "
            f"{mid_save} mid-save (median save {statistics.median(save_times) * 1000:.0f} ms); the last saved "
            f"version opened whole after {kills - lost}, lost {lost}"] + [f"  {w}" for w in why[:3]] + (
                [f"  (and {len(why) - 3} more like these)"] if len(why) > 3 else [])


# -- soak -----------------------------------------------------------------------------------------------

SOAK_KINDS = ("page", "api-text", "api-image", "api-audio")


SOAK_IMAGES, SOAK_CLIPS = 24, 8  # different pictures and clips: the embedding cache fills and evicts as in real use


def soak(model: Path, data: Path, log: Path, requests: int, clients: int,
         kinds: tuple[str, ...] = SOAK_KINDS) -> list[str]:
    """`requests` mixed requests after a warm-up that sends every picture and clip once, which
    fills the bounded caches (the engine's embedding cache, the media reader's): growth after it
    would be a leak, not a cache filling up."""
    from gradio_client import Client
    from PIL import Image

    server = app_server(model, data, log)
    try:
        images = []
        for seed in range(SOAK_IMAGES):
            buf = io.BytesIO()
            pixels = np.random.default_rng(seed).integers(0, 256, (240, 320, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(buf, "PNG")
            images.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
        clips = []
        for seed in range(SOAK_CLIPS):
            buf = io.BytesIO()
            import soundfile

            soundfile.write(buf, voiced(1.5, seed=seed).astype(np.float32), 16_000, format="WAV")
            clips.append(base64.b64encode(buf.getvalue()).decode())
        counter = iter(range(10**9))
        lock = threading.Lock()
        answered = [0] * clients
        failures: list[str] = []
        latencies: dict[str, list[float]] = {k: [] for k in kinds}

        def one(client_id: int, index: int, gradio: Any, http: httpx.Client) -> None:
            kind = kinds[index % len(kinds)]
            t0 = time.monotonic()
            try:
                if kind == "page":
                    text = gradio.submit(f"Question {index}: what is {index} plus 2?", api_name="/chat").result(
                        timeout=TIMEOUT_S)
                    ok = isinstance(text, str)
                else:
                    content: Any = f"Question {index}: name a colour."
                    if kind == "api-image":
                        content = [{"type": "image_url", "image_url": {"url": images[index % len(images)]}},
                                   {"type": "text", "text": "Describe the image."}]
                    elif kind == "api-audio":
                        content = [{"type": "input_audio", "input_audio": {"data": clips[index % len(clips)],
                                                                           "format": "wav"}},
                                   {"type": "text", "text": "Transcribe the audio clip into text."}]
                    response = post_json(http, server.base + "/v1/chat/completions",
                                         {"messages": [{"role": "user", "content": content}], "max_tokens": 16})
                    ok = response.status_code == 200
                    if not ok:
                        raise RuntimeError(f"{response.status_code} {response.text[:200]}")
            except Exception as e:
                with lock:
                    failures.append(f"client {client_id}, request {index} ({kind}): {type(e).__name__}: {e}")
                return
            with lock:
                answered[client_id] += ok
                latencies[kind].append(time.monotonic() - t0)

        # Each client keeps its connections (a gradio_client session, an HTTP connection) for the whole soak.
        sessions = [(Client(server.base, verbose=False) if "page" in kinds else None, httpx.Client())
                    for _ in range(clients)]

        def phase(total: int) -> None:
            done = threading.Barrier(clients + 1)
            budget = iter(range(total))

            def worker(client_id: int) -> None:
                try:
                    gradio, http = sessions[client_id]
                    while True:
                        with lock:
                            if next(budget, None) is None:
                                break
                            index = next(counter)
                        one(client_id, index, gradio, http)
                except Exception as e:
                    with lock:
                        failures.append(f"client {client_id}: {type(e).__name__}: {e}")
                finally:
                    done.wait()

            for c in range(clients):
                threading.Thread(target=worker, args=(c,), daemon=True).start()
            done.wait()

        warmup = len(kinds) * SOAK_IMAGES  # every picture (and every clip) once
        t0 = time.monotonic()
        phase(warmup)
        samples = [(warmup, server.rss_mb())]
        while samples[-1][0] < warmup + requests:  # the trend, to tell a leak from a cache filling up
            n = min(40, warmup + requests - samples[-1][0])
            phase(n)
            samples.append((samples[-1][0] + n, server.rss_mb()))
        rss_warm, rss_end = samples[0][1], samples[-1][1]
        seconds = time.monotonic() - t0
        server.process.send_signal(signal.SIGUSR1)
        time.sleep(2)
        rss_trimmed = server.rss_mb()
        for _, http in sessions:
            http.close()
        alive = server.alive
    finally:
        server.stop()
    growth = (rss_end - rss_warm) / rss_warm * 100
    served = sum(answered)
    lines = [f"soak: {warmup} warm-up + {requests} mixed requests ({', '.join(kinds)} in turn) from {clients} "
             f"concurrent clients "
             f"in {seconds:.0f} s; answered {served}, failed {len(failures)}; the app "
             f"{'still running' if alive else 'DIED'}",
             f"  resident memory of the app: {rss_warm:,.1f} MB after {warmup} warm-up requests (every picture and clip "
             f"once), "
             f"{rss_end:,.1f} MB at the end: {growth:+.1f}% (target <= 5%); after n requests: "
             + ", ".join(f"{n}: {mb:,.0f} MB" for n, mb in samples),
             f"  at the end after malloc_trim(0) (the C heap's free memory given back): {rss_trimmed:,.1f} MB, "
             f"{(rss_trimmed - rss_warm) / rss_warm * 100:+.1f}% from the warm-up's level",
             f"  clients answered: {sum(a > 0 for a in answered)}/{clients} (answers per client: "
             f"{', '.join(map(str, answered))}); every request of every client answered: {not failures}",
             "  median latency: " + ", ".join(f"{k} {statistics.median(v):.2f} s" for k, v in latencies.items() if v)]
    lines += [f"  {f}" for f in failures[:10]]
    return lines


# -- main ----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        mode, model, folder, start = argv[1:5]
        return child(mode, model, folder, int(start))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, help="converted model folder (default: the tiny bench model)")
    parser.add_argument("--quick", action="store_true", help="a smaller soak (40 requests) and 8 kills")
    parser.add_argument("--requests", type=int, help="soak requests (default 200; --quick 40)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent soak clients (8)")
    parser.add_argument("--kills", type=int, help="kill -9 during saves (default 30; --quick 8)")
    parser.add_argument("--kinds", nargs="+", default=list(SOAK_KINDS), choices=SOAK_KINDS,
                        help="the soak's requests, in turn (default: all four)")
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["engine", "conversation", "api", "page", "voice", "converter", "losses", "soak"])
    args = parser.parse_args(argv)
    requests = args.requests or (40 if args.quick else 200)
    kills = args.kills or (8 if args.quick else 30)

    from bench.decode import cpu_name, ensure_model

    model = ensure_model(args.model, True, None, None)
    items = corpus(N_CTX)
    work = Path(tempfile.mkdtemp(prefix="phi4mm-robustness-"))
    files = write_files(items, work / "corpus")
    data = work / "data"
    data.mkdir()
    import llama_cpp

    print(f"model      {model}")
    print(f"machine    {cpu_name()}, {os.cpu_count()} cores; llama-cpp-python {llama_cpp.__version__}; "
          f"Python {platform.python_version()}; the model on 1 thread, n_ctx {N_CTX}")
    print(f"corpus     {len(items)} items: {summary(items)}; children capped at {CAP_MB:,} MB of address space "
          f"(the page at {APP_CAP_MB:,})")
    print(f"timeouts   {TIMEOUT_S} s a request ({TRANSCRIBE_TIMEOUT_S} s a transcription, {VOICE_TIMEOUT_S} s a "
          f"voice run)\n", flush=True)

    t_start = time.monotonic()
    tallies: list[Tally] = []
    costs: dict[str, tuple[float, float]] = {}
    for mode in ("engine", "conversation"):
        if mode not in args.skip:
            tally = Tally(mode)
            run_in_children(mode, model, work / "corpus", items, tally, costs)
            tallies.append(tally)
            print(f"  {mode} done", flush=True)
    extra: list[str] = []
    if "api" not in args.skip:
        tally, extra = api_entry(model, items, work / "api.log")
        tallies.append(tally)
        print("  HTTP API done", flush=True)
    if "page" not in args.skip:
        tallies.append(page_entry(model, [i for i in items if i.kind == PROMPT], data, work / "page.log"))
        print("  page done", flush=True)
    if "voice" not in args.skip:
        tallies.append(voice_entry(model, [i for i in items if i.kind == AUDIO], files, data))
        print("  voice done", flush=True)
    if "converter" not in args.skip:
        tallies.append(converter_entry(work, files))
        print("  converter done", flush=True)
    print()
    print_tallies(tallies)
    expensive = sorted(costs.items(), key=lambda kv: -kv[1][1])[:4]
    if expensive:
        print("costliest refusals (engine child, peak memory growth): " + "; ".join(
            f"{name} {mb:,.0f} MB in {s:.1f} s" for name, (s, mb) in expensive))
    for line in extra:
        print(line)
    print(flush=True)

    if "losses" not in args.skip:
        print(notes_lost(work))
        for scenario in ("files", "memory"):
            for line in conversations_lost(work, kills, scenario):
                print(line)
        print(flush=True)
    if "soak" not in args.skip:
        for line in soak(model, data, work / "soak.log", requests, args.clients, kinds=tuple(args.kinds)):
            print(line)
    print(f"\n(total {time.monotonic() - t_start:.0f} s; logs in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
