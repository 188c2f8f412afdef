"""The decoder's storage format and llama.cpp settings against time to first token, decode speed and quality.

    python bench/formats.py [--layers 4] [--tiny] [--threads N] [--reps 3] [--formats f16 q8_0 q4_k_m q4_0 q4_0_q8]

Every format is a conversion (`python -m convert --outtype`) of the same random-weight
checkpoint at the real width (bench/make_checkpoint.py, --layers decoder layers: 4 fit a
2-core machine), cached under ~/.cache/phi4mm-bench by bench/decode.py's `ensure_model`.
For each format, with llama.cpp's flash attention off and on, loaded side by side and run
round-robin (so that a busy machine slows all alike), after a warm-up; medians:

- prefill: a fresh 512-token text prompt, one token out: prompt tokens / Usage.prefill_ms;
- image prefill: an 896x448 image question (801 image positions under the vision LoRA), its
  embeddings computed once and shared by every engine, so only llama.cpp is timed;
- decode: 64 greedy tokens: Usage.decode_tokens_per_s.
Then n_batch (= n_ubatch) 256, 512 and 1024 for the image prefill of the fastest setting.

Quality, against the f16 decoder: the next-token distributions of 12 prompts (8 text, 2 image,
2 audio) under each format, as KL(f16 || format) in nats and top-1 agreement. Random weights say
little about the error quantisation makes in a trained model (llama.cpp's published tables are
the evidence for that: docs/performance.md); this is a check that nothing is broken.

Nothing here asserts a timing: the figures are printed for a reader to judge.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402

from app.engine import LocalEngine  # noqa: E402
from app.engine_api import Sampling  # noqa: E402
from app.llama_backend import LlamaModel  # noqa: E402
from model.format import read_manifest  # noqa: E402
from bench.decode import cpu_name, ensure_model, filler, find_decode_prompt, med  # noqa: E402
from bench.ttft import fresh  # noqa: E402
from tests.signals import random_image, speechlike  # noqa: E402

FORMATS = ("f16", "q8_0", "q4_k_m", "q4_0", "q4_0_q8")
SR = 16_000


def fresh_text(engine: LocalEngine, body: str, r: int) -> list[dict]:
    return [{"role": "user", "content": f"Request {r}: {body}"}]  # a new first word: nothing reused


def image_question(r: int) -> list[dict]:
    # The same picture every time (its embeddings are cached after the first), a new question.
    return [{"role": "user", "content": [{"type": "image", "image": random_image(896, 448, seed=5)},
                                         {"type": "text", "text": f"Question {r}: what is in this picture?"}]}]


def prefill_rate(engine: LocalEngine, messages: list[dict]) -> float:
    """Prompt tokens per second of a cold prefill; the KV cache emptied first, the LoRA already in place
    (llama.cpp re-plans its graph at the first decode after a change of LoRA: bench/ttft.py measures that)."""
    fresh(engine, engine.template.build(messages).adapter, keep_embeddings=True)
    usage = engine.generate(messages, Sampling(max_tokens=1)).usage
    assert usage.cached_tokens == 0, usage
    return usage.prompt_tokens / (usage.prefill_ms / 1000)


def engines(folders: dict[str, Path], threads: int) -> dict[tuple[str, bool], LocalEngine]:
    """An engine per (format, flash attention), all loaded at once. Each format's weights are loaded
    once (llama.cpp runs several contexts on one model) and the numpy encoders, the same files in
    every folder, once for all: ten full engines would need ~35 GB."""
    out: dict[tuple[str, bool], LocalEngine] = {}
    first = None
    for fmt, folder in folders.items():
        loaded = LocalEngine.load(folder, n_ctx=4096, n_threads=threads) if first is None else None
        if loaded is None:
            manifest = read_manifest(folder)
            model = LlamaModel(manifest.backbone)
            for name, file in manifest.loras.items():
                model.load_adapter(name, file)
            loaded = LocalEngine(model, manifest, 4096, 512, threads, "f16")
            loaded.vision, loaded.speech = first.vision, first.speech
        first = first or loaded
        twin = LocalEngine(loaded.model, loaded.manifest, 4096, 512, threads, "f16", flash_attn=True)
        twin.vision, twin.speech = loaded.vision, loaded.speech
        out[(fmt, False)], out[(fmt, True)] = loaded, twin
    return out


def share_embeddings(source: LocalEngine, engines) -> None:
    """The image and audio embeddings `source` computed, handed to the other engines: the encoders are the
    same files in every folder, and each image costs ~20 s of encoder at the real shapes."""
    for engine in engines:
        if engine is not source:
            engine._embedding_cache.update(source._embedding_cache)


def decode_rate(engine: LocalEngine, messages: list[dict], n: int) -> float:
    return engine.generate(messages, Sampling(max_tokens=n, temperature=0)).usage.decode_tokens_per_s


def quality_prompts(engine: LocalEngine) -> list[list[dict]]:
    text = [[{"role": "user", "content": filler(engine, 40 + 20 * k, 50 + k)}] for k in range(8)]
    image = [[{"role": "user", "content": [{"type": "image", "image": random_image(448 + 224 * k, 448, seed=60 + k)},
                                           {"type": "text", "text": "Describe it."}]}] for k in range(2)]
    audio = [[{"role": "user", "content": [{"type": "audio", "audio": (speechlike(3 * SR, seed=70 + k), SR)},
                                           {"type": "text", "text": "Transcribe the audio clip into text."}]}]
             for k in range(2)]
    return text + image + audio


def distributions(engine: LocalEngine, prompts: list[list[dict]]) -> np.ndarray:
    rows = []
    for messages in prompts:
        logits, _ = engine.next_token_logits(messages)
        z = np.asarray(logits, np.float64)
        p = np.exp(z - z.max())
        rows.append(p / p.sum())
    return np.stack(rows)  # (prompts, vocab)


def table(head: tuple, body: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in [head] + body) for i in range(len(head))]
    for row in [head] + body:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print(flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the real-width checkpoint (4)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny shapes: a quick check of the script")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    args = parser.parse_args(argv)

    folders = {fmt: ensure_model(None, args.tiny, None if args.tiny else args.layers, fmt) for fmt in args.formats}
    sizes = {fmt: (folder / "backbone.gguf").stat().st_size / 2**30 for fmt, folder in folders.items()}
    print(f"model      random weights, {'tiny shapes' if args.tiny else f'real width, {args.layers} layers'}: "
          f"{', '.join(folders)}")
    print(f"machine    {cpu_name()}, {os.cpu_count()} cores; threads {args.threads}; "
          f"llama-cpp-python {llama_cpp.__version__}; n_ctx 4096, n_batch = n_ubatch 512, KV cache f16")
    print(f"runs       {args.reps} round-robin repetitions after a warm-up; medians\n", flush=True)

    configs = engines(folders, args.threads)
    any_engine = next(iter(configs.values()))
    body = filler(any_engine, 500, 1)
    decode_prompt = find_decode_prompt(any_engine, 64)
    results: dict[tuple, dict[str, list[float]]] = {c: {"text": [], "image": [], "decode": []} for c in configs}
    prefill_rate(any_engine, image_question(-1))  # the image's embeddings, computed once for all
    share_embeddings(any_engine, configs.values())
    for r in range(-1, args.reps):  # -1: the warm-up
        for config, engine in configs.items():
            time.sleep(0.3)
            fresh(engine, None, keep_embeddings=True)
            runs = {"text": prefill_rate(engine, fresh_text(engine, body, r)),
                    "decode": decode_rate(engine, decode_prompt, 64),
                    "image": prefill_rate(engine, image_question(r))}
            if r >= 0:
                for key, value in runs.items():
                    results[config][key].append(value)
        print(f"  repetition {r + 1} of {args.reps} done" if r >= 0 else "  warm-up done", flush=True)

    base = results[("f16", False)] if ("f16", False) in results else None
    rows = []
    for (fmt, fa), runs in results.items():
        cells = [f"{med(runs[k]):.1f}" for k in ("text", "image", "decode")]
        rel = f"{med(runs['image']) / med(base['image']):.2f}x" if base else "-"
        rows.append((f"{fmt}{' + flash attn' if fa else ''}", f"{sizes[fmt]:.2f}", *cells, rel))
    table(("decoder", "GiB", "prefill text tok/s", "prefill image tok/s", "decode tok/s", "image vs f16"), rows)

    best = max(results, key=lambda c: med(results[c]["image"]))
    print(f"n_batch = n_ubatch for the image prefill of the fastest setting ({best[0]}"
          f"{', flash attention' if best[1] else ''}):")
    batch_rows = []
    for n_batch in (256, 512, 1024):
        model = configs[best].model
        engine = LocalEngine(model, configs[best].manifest, 4096, n_batch, args.threads, "f16", flash_attn=best[1])
        engine.vision, engine.speech = any_engine.vision, any_engine.speech
        share_embeddings(any_engine, [engine])
        prefill_rate(engine, image_question(-1))
        batch_rows.append((str(n_batch), f"{med(prefill_rate(engine, image_question(r)) for r in range(args.reps)):.1f}"))
        engine._short.ctx.close()  # its own context only: the model is the table's
    table(("n_batch", "prefill image tok/s"), batch_rows)

    if "f16" in args.formats:
        prompts = quality_prompts(any_engine)
        reference = distributions(configs[("f16", False)], prompts)
        share_embeddings(configs[("f16", False)], configs.values())
        quality = []
        for fmt in args.formats:
            p = distributions(configs[(fmt, False)], prompts)
            kl = np.sum(reference * (np.log(reference + 1e-30) - np.log(p + 1e-30)), axis=1)
            same = np.mean(reference.argmax(1) == p.argmax(1)) * 100
            quality.append((fmt, f"{kl.mean():.5f}", f"{kl.max():.5f}", f"{same:.0f}%"))
        print(f"against the f16 decoder, next-token distributions of {len(prompts)} prompts (8 text, 2 image, 2 audio):")
        table(("decoder", "mean KL, nats", "max KL", "same top-1"), quality)
    return 0  # the process ends: llama.cpp frees what the engines share


if __name__ == "__main__":
    sys.exit(main())
