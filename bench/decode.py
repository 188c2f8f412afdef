"""Prefill, decode and multi-turn speed: our `LocalEngine` against llama-cpp-python's plain `Llama`, same GGUF.

    python -m bench.decode [MODEL_DIR] [--tiny] [--reps 5] [--threads N] [--prompt-tokens 512] ...

MODEL_DIR is a converted folder (manifest.json + backbone.gguf). Without it the script uses
~/.cache/phi4mm-bench/gguf-real-q4_k_m-encoders-bf16 (or gguf-tiny-f16-encoders-bf16 with --tiny),
making the random-weight checkpoint (bench/make_checkpoint.py) and converting it first if missing.

Both sides load the same backbone.gguf with the same n_ctx, n_batch = n_ubatch, threads
and flash-attention setting (app/llama_backend.py LlamaContext), decode greedily and
are run interleaved (ours, theirs, theirs, ours, ...), so a busy machine slows both
alike; the table gives medians and the median of the per-repetition ratios ours/theirs.

- prefill: a fresh prompt of --prompt-tokens tokens, 1 token out. Rate = new tokens /
  time to first token (ours: template, tokenisation, prefill, first sample; theirs:
  tokenisation, `Llama.generate` up to its first token, after `Llama.reset()`).
- decode: --decode-tokens greedy tokens after a short prompt (ours: `LocalEngine.generate`,
  which also detokenises; theirs: the `Llama.generate` token loop with an
  end-of-generation check). "wall": (tokens - 1) / time from the first to the last token.
  "median step": from the median period of the llama_decode calls, which a step the OS
  preempted does not move (on a shared 2-core machine such steps dominate the wall time
  of a tiny model); that step is split into the time inside llama_decode and the time
  between two calls (sampling, detokenising, Python: the per-token overhead of each side).
- second turn: a chat of ~--history-tokens tokens; TTFT of the next turn with our
  engine, which prefills only the new tokens, against a cold prefill of the same full
  prompt by `Llama` (reset first).

Nothing here asserts a timing: the figures are printed for a reader to judge.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402

from app.engine import LocalEngine, _common_prefix  # noqa: E402
from app.engine_api import Sampling  # noqa: E402
from model.format import is_converted  # noqa: E402
from bench.make_checkpoint import CACHE, REAL, TINY, default_folder, make_checkpoint, tag  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "A local assistant reads text, images and speech, and answers questions about them.",
    "Yesterday the weather in London was rainy, while Madrid stayed sunny and warm all day.",
    "The committee will meet on Tuesday to review the budget for the next three years.",
    "Small robots explore the garden at night, collecting leaves and counting stars.",
    "Please summarise the main arguments of the report in five short bullet points.",
    "Numbers such as 12345, 3.14159 and 2048 appear in many technical documents.",
    "She opened the old notebook and found a map of the island drawn in pencil.",
    "Tools can convert units, tell the time in other cities and keep short notes.",
    "In the afternoon the train to the coast was late because of a signal failure.",
]


# -- the model folder --------------------------------------------------------------------------------

def ensure_model(folder: Path | None, tiny: bool, layers: int | None, outtype: str | None) -> Path:
    """The converted folder to benchmark; made (checkpoint + conversion) when the default is missing."""
    if folder is not None:
        return folder
    shapes = TINY if tiny else REAL
    if layers:
        shapes = replace(shapes, layers=layers)
    from convert.pipeline import convert_checkpoint, encoder_storage

    outtype = outtype or ("f16" if tiny else "q4_k_m")
    # the encoders' storage in the name: a folder converted when they were stored otherwise is not reused
    folder = CACHE / f"gguf-{tag(shapes)}-{outtype}-encoders-{encoder_storage(outtype)}"
    if is_converted(folder):
        return folder
    checkpoint = default_folder(shapes)
    if not (checkpoint / "config.json").exists():
        print(f"making the {shapes.name}-shape checkpoint in {checkpoint} (once)", flush=True)
        make_checkpoint(checkpoint, shapes)
    print(f"converting it to {outtype} in {folder} (once)", flush=True)
    convert_checkpoint(checkpoint, folder, outtype)
    return folder


# -- prompts -----------------------------------------------------------------------------------------

def filler(engine: LocalEngine, n_tokens: int, seed: int) -> str:
    """English-like text of about `n_tokens` tokens (sentences shuffled by `seed`)."""
    rng = np.random.default_rng(seed)
    words: list[str] = []
    while len(engine.tokenize(" ".join(words))) < n_tokens:
        words += SENTENCES[rng.integers(len(SENTENCES))].split()
    while len(engine.tokenize(" ".join(words))) > n_tokens and len(words) > 1:
        words.pop()
    return " ".join(words)


def rendered(engine: LocalEngine, messages: list[dict]) -> str:
    """The prompt text our engine builds (text-only prompts are one piece)."""
    pieces = engine.template.build(messages).pieces
    assert len(pieces) == 1 and isinstance(pieces[0], str), "text-only prompt expected"
    return pieces[0]


def chat_history(engine: LocalEngine, n_tokens: int) -> list[dict]:
    """A system prompt and user/assistant turns of ~120 tokens each, ~n_tokens in all."""
    messages = [{"role": "system", "content": "You are a helpful assistant running locally."}]
    turn = 0
    while len(engine.tokenize(rendered(engine, messages))) < n_tokens:
        messages.append({"role": "user" if turn % 2 == 0 else "assistant", "content": filler(engine, 120, 100 + turn)})
        turn += 1
    if messages[-1]["role"] == "user":
        messages.append({"role": "assistant", "content": filler(engine, 60, 99)})
    return messages


# -- one measured run each ---------------------------------------------------------------------------

@dataclass
class Run:
    new_tokens: int           # prompt tokens actually prefilled
    reused_tokens: int
    ttft_s: float
    intervals: int = 0        # tokens after the first
    decode_s: float = 0.0
    tokens: tuple = ()
    in_decode_s: float = 0.0  # time inside llama_decode calls, all of them (see DecodeClock)
    step_ms: float = 0.0      # median period of the single-token llama_decode calls
    inside_ms: float = 0.0    # median time inside one of them
    between_us: float = 0.0   # median time between two of them
    finish_reason: str = ""

    @property
    def step_rate(self) -> float:
        return 1000 / self.step_ms if self.step_ms > 0 else float("nan")

    @property
    def prefill_rate(self) -> float:
        return self.new_tokens / self.ttft_s

    @property
    def decode_rate(self) -> float:
        return self.intervals / self.decode_s if self.decode_s > 0 else float("nan")


def ours(engine: LocalEngine, messages: list[dict], max_tokens: int) -> Run:
    done = engine.generate(messages, Sampling(max_tokens=max_tokens))
    t = done.usage
    samples = t.completion_tokens + (done.finish_reason == "stop")  # an end token is sampled, not counted
    return Run(new_tokens=t.prompt_tokens - t.cached_tokens, reused_tokens=t.cached_tokens,
               ttft_s=t.ttft_ms / 1000, intervals=max(samples - 1, 0), decode_s=t.decode_ms / 1000,
               tokens=tuple(done.token_ids), finish_reason=done.finish_reason)


class Theirs:
    """llama-cpp-python's `Llama`, used the plain way: tokenize, `generate`, stop at an end token."""

    def __init__(self, path: Path, n_ctx: int, n_batch: int, n_threads: int):
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                                   n_threads=n_threads, n_threads_batch=n_threads, flash_attn=False,
                                   verbose=False)
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)

    def run(self, prompt: str, max_tokens: int, cold: bool) -> Run:
        llm = self.llm
        if cold:
            llm.reset()
        t0 = time.perf_counter()
        tokens = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        reused = self._cached_prefix(tokens) if not cold else 0
        out: list[int] = []
        t_first = t_last = t0
        samples = 0
        for token in llm.generate(tokens, temp=0.0):
            t_last = time.perf_counter()
            samples += 1
            if samples == 1:
                t_first = t_last
            if llama_cpp.llama_vocab_is_eog(self.vocab, token):
                break
            out.append(token)
            if len(out) >= max_tokens:
                break
        return Run(new_tokens=len(tokens) - reused, reused_tokens=reused, ttft_s=t_first - t0,
                   intervals=samples - 1, decode_s=t_last - t_first, tokens=tuple(out))

    def _cached_prefix(self, tokens: list[int]) -> int:
        """What `Llama.generate` will keep of its cache (it re-decodes the last token of a full match)."""
        n = _common_prefix(self.llm._input_ids.tolist(), tokens)
        return n - 1 if n == len(tokens) else n

    def close(self) -> None:
        self.llm.close()


def interleaved(reps: int, a: Callable[[int], Run], b: Callable[[int], Run]) -> tuple[list[Run], list[Run]]:
    """a, b, b, a, a, b, ...: each side goes first half the time."""
    runs_a, runs_b = [], []
    for r in range(reps):
        if r % 2 == 0:
            runs_a.append(a(r))
            runs_b.append(b(r))
        else:
            runs_b.append(b(r))
            runs_a.append(a(r))
    return runs_a, runs_b


Row = tuple[str, str, str, str]  # label, ours, theirs, ratio (or difference)


def compare(label: str, a: list[Run], b: list[Run], metric: Callable[[Run], float], fmt: str,
            diff: bool = False) -> Row:
    """A table row: median of each side, and the median of the per-repetition ratios (or differences)."""
    if diff:
        last = fmt.format(med(metric(x) - metric(y) for x, y in zip(a, b)))
        last = last if last.startswith("-") else "+" + last
    else:
        last = f"{med(metric(x) / metric(y) for x, y in zip(a, b)):.3f}"
    return label, fmt.format(med(metric(x) for x in a)), fmt.format(med(metric(y) for y in b)), last


def split_rows(a: list[Run], b: list[Run]) -> list[Row]:
    """Time to first token = time inside llama_decode + the rest (template, tokenising, sampling)."""
    return [compare("  inside llama_decode, ms", a, b, lambda r: r.in_decode_s * 1e3, "{:.1f}", diff=True),
            compare("  rest (template, tokenise, sample), ms", a, b,
                    lambda r: (r.ttft_s - r.in_decode_s) * 1e3, "{:.1f}", diff=True)]


def med(values) -> float:
    return statistics.median(values)


class DecodeClock:
    """Records when each llama_decode call starts and ends, whichever module name it is called by."""

    def __init__(self):
        self.spans: list[tuple[float, float]] = []
        self._saved: list[tuple[object, object]] = []

    def __enter__(self) -> "DecodeClock":
        import llama_cpp.llama_cpp as low  # llama-cpp-python's own classes call through this module

        spans = self.spans

        def timed(*args, _original=llama_cpp.llama_decode):
            t0 = time.perf_counter()
            try:
                return _original(*args)
            finally:
                spans.append((t0, time.perf_counter()))

        for module in (llama_cpp, low):
            self._saved.append((module, module.llama_decode))
            module.llama_decode = timed
        return self

    def __exit__(self, *exc) -> None:
        for module, original in reversed(self._saved):
            module.llama_decode = original

    def measure(self, run: Run) -> Run:
        """`run` with its total time inside llama_decode, and medians over its single-token steps (the
        first call re-decodes the prompt's last token): medians, so preempted steps do not count."""
        run = replace(run, in_decode_s=sum(b - a for a, b in self.spans))
        steps = self.spans[1:]
        if len(steps) < 2:
            return run
        period = [b[0] - a[0] for a, b in zip(steps, steps[1:])]
        inside = [b - a for a, b in steps]
        between = [b[0] - a[1] for a, b in zip(steps, steps[1:])]
        return replace(run, step_ms=med(period) * 1e3, inside_ms=med(inside) * 1e3, between_us=med(between) * 1e6)


def clocked(fn: Callable[[], Run]) -> Run:
    with DecodeClock() as clock:
        run = fn()
    return clock.measure(run)


# -- the benchmark -----------------------------------------------------------------------------------

def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def find_decode_prompt(engine: LocalEngine, n_tokens: int, tries: int = 50) -> list[dict]:
    """A short prompt whose greedy continuation does not end before n_tokens (random weights end at random)."""
    best, best_n = None, -1
    for k in range(tries):
        messages = [{"role": "user", "content": f"Story {k}: tell me about a small robot in the garden."}]
        run = ours(engine, messages, n_tokens)
        if run.finish_reason == "length":
            return messages
        if run.intervals > best_n:
            best, best_n = messages, run.intervals
    print(f"note: no prompt decodes {n_tokens} tokens without an end token; using one that decodes "
          f"{best_n + 1}", flush=True)
    return best


def print_setup(engine: LocalEngine, theirs: Theirs, threads: int, reps: int) -> None:
    """What runs where, read back from both llama.cpp contexts."""
    ours_ctx, theirs_ctx = engine._short.ctx.ptr, theirs.llm.ctx
    flash = theirs.llm.context_params.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    print(f"model      {engine.model.path} ({engine.manifest.outtype if engine.manifest else '?'}, "
          f"{engine.model.meta('phi3.block_count')} layers, vocab {engine.model.n_vocab})")
    print(f"machine    {cpu_name()}, {os.cpu_count()} cores; threads {threads}; "
          f"llama-cpp-python {llama_cpp.__version__}")
    print("contexts   ours/theirs: " + ", ".join(
        f"{name} {getter(ours_ctx)}/{getter(theirs_ctx)}" for name, getter in
        (("n_ctx", llama_cpp.llama_n_ctx), ("n_batch", llama_cpp.llama_n_batch),
         ("n_ubatch", llama_cpp.llama_n_ubatch), ("threads", llama_cpp.llama_n_threads)))
          + f", flash attention off/{'on' if flash else 'off'}")
    print(f"runs       {reps} interleaved repetitions after a warm-up; medians", flush=True)


def prefill_phase(engine: LocalEngine, theirs: Theirs, reps: int, n_tokens: int) -> list[Row]:
    body = filler(engine, n_tokens, 1)

    def prompt(r: int) -> list[dict]:  # a new first word each time: nothing to reuse but `<|user|>`
        return [{"role": "user", "content": f"Request {r}: {body}"}]

    ours(engine, prompt(-1), 1), theirs.run(rendered(engine, prompt(-1)), 1, cold=True)  # warm-up
    a, b = interleaved(reps, lambda r: clocked(lambda: ours(engine, prompt(r), 1)),
                       lambda r: clocked(lambda: theirs.run(rendered(engine, prompt(r)), 1, cold=True)))
    n = round(med(x.new_tokens for x in a))
    row = compare(f"prefill {n} tok, tok/s", a, b, lambda r: r.prefill_rate, "{:.1f}")
    print(f"  prefill done ({row[1]} vs {row[2]} tok/s)", flush=True)
    return [row] + split_rows(a, b)


def decode_phase(engine: LocalEngine, theirs: Theirs, reps: int, n_tokens: int) -> list[Row]:
    messages = find_decode_prompt(engine, n_tokens)
    text = rendered(engine, messages)
    theirs.run(text, n_tokens, cold=True)  # warm-up
    a, b = interleaved(reps, lambda r: clocked(lambda: ours(engine, messages, n_tokens)),
                       lambda r: clocked(lambda: theirs.run(text, n_tokens, cold=False)))
    same = sum(x.tokens == y.tokens for x, y in zip(a, b))
    diverge = min((_common_prefix(x.tokens, y.tokens) for x, y in zip(a, b) if x.tokens != y.tokens),
                  default=None)
    note = (f" (first difference at token {diverge}: llama.cpp's logits depend on how the prompt was "
            f"batched, and random weights have near-ties)" if diverge is not None else "")
    print(f"  decode done; greedy tokens identical in {same}/{reps} runs{note}", flush=True)
    return [compare(f"decode {a[0].intervals + 1} tok, tok/s (wall)", a, b, lambda r: r.decode_rate, "{:.2f}"),
            compare("decode tok/s (median step)", a, b, lambda r: r.step_rate, "{:.2f}"),
            compare("  inside llama_decode, ms/token", a, b, lambda r: r.inside_ms, "{:.3f}", diff=True),
            compare("  between decodes, µs/token", a, b, lambda r: r.between_us, "{:.1f}", diff=True)]


def turn_phase(engine: LocalEngine, theirs: Theirs, reps: int, history_tokens: int) -> list[Row]:
    history = chat_history(engine, history_tokens)
    first = history + [{"role": "user", "content": "Please summarise our conversation in one sentence."}]
    answer = engine.generate(first, Sampling(max_tokens=16)).text
    second = first + [{"role": "assistant", "content": answer},
                      {"role": "user", "content": "Thanks. Now list three follow-up questions."}]
    text = rendered(engine, second)

    def warm(r: int) -> Run:
        engine.generate(first, Sampling(max_tokens=16))  # back to the end of turn one (untimed)
        return clocked(lambda: ours(engine, second, 1))

    warm(-1), theirs.run(text, 1, cold=True)  # warm-up
    a, b = interleaved(reps, warm, lambda r: clocked(lambda: theirs.run(text, 1, cold=True)))
    speedup = med([y.ttft_s / x.ttft_s for x, y in zip(a, b)])
    new, reused = round(med(x.new_tokens for x in a)), round(med(x.reused_tokens for x in a))
    row = (f"2nd turn TTFT ms (ours: {new} new + {reused} reused; theirs cold: {round(med(y.new_tokens for y in b))})",
           f"{med(x.ttft_s for x in a) * 1000:.1f}", f"{med(y.ttft_s for y in b) * 1000:.1f}", f"{speedup:.1f}x faster")
    return [row] + split_rows(a, b)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, help="converted model folder (default: the bench cache)")
    parser.add_argument("--tiny", action="store_true", help="the tiny-shape checkpoint (magnifies per-token overhead)")
    parser.add_argument("--outtype", help="for the default folder: q4_k_m (real) / f16 (tiny) unless given")
    parser.add_argument("--layers", type=int, help="for the default folder: fewer decoder layers (a quicker run)")
    parser.add_argument("--reps", type=int, help="interleaved repetitions (default 5, tiny 21)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-tokens", type=int, help="default 64 (tiny 256)")
    parser.add_argument("--history-tokens", type=int, default=1500)
    parser.add_argument("--skip", nargs="*", default=[], choices=["prefill", "decode", "turn"])
    args = parser.parse_args(argv)
    reps = args.reps or (21 if args.tiny else 5)
    n_decode = args.decode_tokens or (256 if args.tiny else 64)

    folder = ensure_model(args.model, args.tiny, args.layers, args.outtype)
    engine = LocalEngine.load(folder, n_ctx=args.n_ctx, n_threads=args.threads, n_batch=args.n_batch)
    n_ctx = engine._short.ctx.n_ctx  # the window a prompt under original_context uses
    theirs = Theirs(engine.model.path, n_ctx, args.n_batch, args.threads)
    print_setup(engine, theirs, args.threads, reps)

    rows: list[Row] = []
    if "prefill" not in args.skip:
        rows += prefill_phase(engine, theirs, reps, args.prompt_tokens)
    if "decode" not in args.skip:
        rows += decode_phase(engine, theirs, reps, n_decode)
    if "turn" not in args.skip:
        rows += turn_phase(engine, theirs, reps, args.history_tokens)

    print()
    head = ("", "ours (LocalEngine)", "llama-cpp Llama", "ours/theirs")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    for row in [head] + rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))
    theirs.close()
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
