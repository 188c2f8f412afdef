"""Time to first token, end to end: our `LocalEngine` against transformers + peft on the CPU, same weights.

    python bench/ttft.py [--tiny] [--layers N] [--threads N] [--reps R] [--outtype q4_k_m] [--decode-only]
    python bench/ttft.py --memory-only     # our process's memory alone, at 32 layers (no transformers)

The model is bench/make_checkpoint.py's random-weight Phi-4-multimodal at the real shapes (the
tests' tiny shapes with --tiny; --layers N cuts the decoder to N layers, the real width with 4
layers is what fits a 2-core machine), converted to --outtype (default the app's, q4_k_m) and
cached under ~/.cache/phi4mm-bench by bench/decode.py's `ensure_model`. Both sides read the same
random weights: ours from the converted GGUFs (the decoder in --outtype, the encoders bf16 on disk
and in memory, computing in float32), transformers from the bf16 checkpoint widened to float32.

Rows: a text question after a ~500-token chat history; an 896x448 image question; a 640x480
webcam frame at the page's default detail (app/ui/handlers.py WEBCAM_MAX_CROPS); a 5 s and a
30 s spoken question (the voice assistant's prompt: the clip + app/voice/assistant.py
SPOKEN_TURN); the 896x448 image with a 5 s spoken question. Media first, then the text, as the
page sends them.

Ours: `engine.generate(messages, Sampling(max_tokens=1))` and its `Usage`: encoder_ms (image
crops / log-mel + the numpy encoders), prefill_ms (llama.cpp decoding every prompt position),
ttft_ms (request start -> first token sampled: template, tokenising, encoders, prefill, sample).
Before every run the engine forgets everything (`fresh`: its embedding cache and both KV
caches emptied), and every repetition has a new image, clip and system prompt, so nothing is
reused; each run is checked to have prefilled every position (cached_tokens == 0). The row's
LoRA is put in place (and used once) beforehand: llama.cpp re-plans its graph at the first
decode after a change of LoRA, a cost measured apart (`switch_phase`) and printed under the table.

Theirs: transformers' `Phi4MultimodalForCausalLM` with the two LoRAs as peft adapters (as
tests/tiny_checkpoint.py builds it), eager attention, float32, torch.set_num_threads(threads);
the vision LoRA for prompts with an image, the speech LoRA for audio-only prompts, none for
text, as our engine picks them. Timed: `Phi4MultimodalProcessor` (tokenizer, image processor,
feature extractor) on the same prompt text (rendered by the model's chat template, one
placeholder per image / clip, which the processor expands), then one forward with
`logits_to_keep=1` (what `generate` runs for its first token) and the argmax. Its encoder time
is taken by forward hooks on the image and audio embedding modules. Both sides must read the
same number of prompt positions and of image and audio placeholders, and transformers' encoders
must have run (checked). The tokenizers library renumbers the bench tokenizer's sparse special
ids (199999, 200010.. after 8192 BPE tokens: make_checkpoint.py) to 8192.., so with the real
shapes special tokens read other embedding rows on the two sides: the same work, other values.

Runs are interleaved: each repetition runs every row on both sides, alternating which goes
first, after a short pause (BLAS threads spin for a while after a call); after one warm-up
of each path; medians, and the median of the per-repetition ratios ours / theirs.

Also printed:
- prefill GFLOP/s. FLOPs of prefilling n positions through L layers, width d, q = heads x
  head_dim, kv = kv_heads x head_dim, MLP width f, vocabulary V, LoRA rank r (0 for text):
      2 n L (P + R)  +  2 L q n (n + 1)  +  2 d V
  P = d (q + 2 kv) + q d + d 2f + f d    (weights of qkv, o, gate_up, down)
  R = r ((d + q + 2 kv) + (q + d) + (d + 2f) + (f + d))    (the LoRA's A and B)
  2 n (P + R) per layer is 2 FLOPs per weight per position; 2 q n (n + 1) is causal attention
  (q k^T and a v over the i <= n earlier positions); 2 d V the logits of the last position.
  Against the machine's own float32 GEMM peak, measured here: numpy (OpenBLAS) matmuls of square
  float32 matrices (1024, 2048, 3072) on the same threads, best of 5, once before and once after
  the runs (torch's shown too).
  llama.cpp's q4_k_m products are integer dot products on quantised activations, so this is an
  equivalent rate, not a count of float32 operations.
- decode: greedy tokens per second after a short text prompt, ours (Usage.decode_tokens_per_s, the
  q4_k_m decoder) against transformers' KV-cached loop (what `generate` runs: one token a forward),
  first; --decode-only stops after it (and the memory).
- the resident memory of our process with the model and both encoders loaded: a separate process
  that loads our engine only (no torch) and asks the image + speech row's question once; its peak
  while answering (VmHWM, reset after loading), after it (and how much of that is file-backed:
  mapped files), and at the peak of its life (the larger of the loading's VmHWM and that). With --layers
  N < 32 the 32-layer figure is estimated: + (32 - N) x (one layer's tensors in backbone.gguf and
  in both LoRA files, read from the GGUFs, + one layer's KV cache at n_ctx 4096, f16).
- with --layers N < 32, TTFT estimated at 32 layers: the decoder part of each side (ours:
  prefill_ms; theirs: forward minus encoders) scaled by 32 / N, the rest as measured.
  An estimate: the decoder is all that changes with the layer count, but nothing was run at 32.

Nothing here asserts a timing: the figures are printed for a reader to judge.
"""
from __future__ import annotations

import argparse
import os
import sys


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tests' tiny shapes (a run of a few minutes)")
    p.add_argument("--layers", type=int, help="decoder layers of the checkpoint (default 32, tiny 2)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--reps", type=int, help="interleaved repetitions (default 3, tiny 7)")
    p.add_argument("--outtype", default="q4_k_m", help="decoder type of the conversion (default q4_k_m, the app's)")
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--decode-only", action="store_true", help="only the decode comparison (and the memory)")
    p.add_argument("--memory-only", action="store_true",
                   help="only our process's memory (no transformers: the full 32 layers fit)")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)  # a converted folder: measure our RSS, print JSON
    return p.parse_args(argv)


if __name__ == "__main__":
    ARGS = _args()
    # numpy's OpenBLAS sizes its thread pool at import: set it (and OpenMP's, MKL's) first.
    _want = {k: str(ARGS.threads) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if any(os.environ.get(k) != v for k, v in _want.items()):
        os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:],
                  dict(os.environ, **_want))

import ast  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

# transformers imports torchvision, whose compiled ops do not load here (tests/conftest.py).
sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from app.engine import LocalEngine  # noqa: E402
from app.engine_api import AUDIO, IMAGE, Sampling  # noqa: E402
from app.prompt import Media, Text  # noqa: E402
from app.voice.assistant import SPOKEN_TURN  # noqa: E402
from bench.decode import cpu_name, ensure_model, filler, find_decode_prompt  # noqa: E402
from convert.pipeline import encoder_storage  # noqa: E402
from tests.signals import random_image, speechlike  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SR = 16_000
PAUSE_S = 0.5
GIB = 2 ** 30
TARGET_GIB = 6.0
REAL_LAYERS = 32
DECODE_TOKENS = 32


def module_constant(path: Path, name: str):
    """A constant assigned in a module's source, read without importing it (the page's module imports gradio)."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"{name} is not assigned in {path}")


WEBCAM_MAX_CROPS = module_constant(ROOT / "app" / "ui" / "handlers.py", "WEBCAM_MAX_CROPS")


# -- the rows ----------------------------------------------------------------------------------------

@dataclass
class Row:
    label: str
    make: Callable[[int], list[dict]]   # repetition -> messages (new content each repetition)


def prompt_tokens(engine: LocalEngine, messages: list[dict]) -> int:
    """Positions of a text-only prompt: the template's markup (special tokens parsed) and the messages' text."""
    return sum(len(engine.tokenize(p, special=True) if isinstance(p, str) else engine.tokenize(p.text, special=False))
               for p in engine.template.build(messages).pieces)


def history(engine: LocalEngine, n_tokens: int) -> list[dict]:
    """User and assistant turns of ~120 tokens each, ~n_tokens in all with a system prompt, the assistant's last."""
    system = [{"role": "system", "content": "You are a helpful assistant running locally. Session 0."}]
    turns: list[dict] = []
    while prompt_tokens(engine, system + turns) < n_tokens or turns[-1]["role"] == "user":
        role = "assistant" if len(turns) % 2 else "user"
        turns.append({"role": role, "content": filler(engine, 120, 100 + len(turns))})
    return turns


def rows(engine: LocalEngine) -> list[Row]:
    turns = history(engine, 500)  # the system prompt changes per repetition

    def text(r: int) -> list[dict]:
        system = {"role": "system", "content": f"You are a helpful assistant running locally. Session {r}."}
        return [system] + turns + [{"role": "user", "content": "Please summarise our conversation in one sentence."}]

    def image(w: int, h: int, max_crops: int | None, r: int) -> dict:
        part = {"type": "image", "image": random_image(w, h, seed=1000 * w + h + r)}
        return part if max_crops is None else {**part, "max_crops": max_crops}

    def clip(seconds: float, r: int) -> dict:
        return {"type": "audio", "audio": (speechlike(int(seconds * SR), seed=int(seconds * 100) + r), SR)}

    def user(*parts: dict, question: str) -> list[dict]:
        return [{"role": "user", "content": [*parts, {"type": "text", "text": question}]}]

    return [
        Row("text, 500-token history", text),
        Row("image 896x448", lambda r: user(image(896, 448, None, r), question="What is in this picture?")),
        Row(f"webcam 640x480, max_crops {WEBCAM_MAX_CROPS}",
            lambda r: user(image(640, 480, WEBCAM_MAX_CROPS, r), question="What do you see?")),
        Row("speech 5 s", lambda r: user(clip(5, r), question=SPOKEN_TURN)),
        Row("speech 30 s", lambda r: user(clip(30, r), question=SPOKEN_TURN)),
        Row("image 896x448 + speech 5 s", lambda r: user(image(896, 448, None, r), clip(5, r), question=SPOKEN_TURN)),
    ]


def warmups() -> list[list[dict]]:
    """Every path once, small: no adapter, vision LoRA + both encoders (vision-speech projector), speech LoRA."""
    def small(*parts):
        return [{"role": "user", "content": [*parts, {"type": "text", "text": "Warm up."}]}]
    return [[{"role": "user", "content": "Warm up."}],
            small({"type": "image", "image": random_image(448, 448, seed=7), "max_crops": 1},
                  {"type": "audio", "audio": (speechlike(SR, seed=7), SR)}),
            small({"type": "audio", "audio": (speechlike(SR, seed=8), SR)})]


# -- ours --------------------------------------------------------------------------------------------

@dataclass
class Ours:
    tokens: int
    adapter: str | None
    encoder_ms: float
    prefill_ms: float
    ttft_ms: float


def fresh(engine: LocalEngine, lora: str | None, keep_embeddings: bool = False) -> None:
    """Forget every position cached (and every image and clip encoded, unless `keep_embeddings`), so the
    next request starts cold, with the LoRA `lora` in place and used once: llama.cpp re-plans its graph at
    the first decode after a change of LoRA, a cost `switch_phase` measures apart."""
    if not keep_embeddings:
        engine._embedding_cache.clear()
    names = (lora,) if lora else ()
    for window in (engine._short, engine._long):
        if window is None:
            continue
        window.ctx.truncate(0)
        window.keys, window.segments = [], []
        if window.adapters != names:
            window.ctx.set_adapters(names)
            window.adapters = names
            window.ctx.decode_tokens(engine.tokenize("Hi")[:1], 0, want_logits=True)
            window.ctx.truncate(0)


def run_ours(engine: LocalEngine, messages: list[dict], previous_lora: str | None | bool = True) -> Ours:
    """One cold request; `previous_lora`: the LoRA left in place by the request before (True: this one's own)."""
    fresh(engine, engine.template.build(messages).adapter if previous_lora is True else previous_lora)
    usage = engine.generate(messages, Sampling(max_tokens=1)).usage
    if usage.cached_tokens:
        raise RuntimeError(f"{usage.cached_tokens} positions came from the cache: the run is not cold")
    return Ours(usage.prompt_tokens, usage.adapter, usage.encoder_ms, usage.prefill_ms, usage.ttft_ms)


def switch_phase(engine: LocalEngine, row: Row, reps: int) -> tuple[float, float]:
    """Median prefill ms of `row` with its LoRA in place, and the median extra ms when the request before
    used no LoRA (text), interleaved."""
    same, changed = [], []
    for r in range(reps):
        pair = [(same, True), (changed, None)]
        for runs, previous in pair if r % 2 == 0 else pair[::-1]:
            time.sleep(PAUSE_S)
            runs.append(run_ours(engine, row.make(100 + r), previous).prefill_ms)
    return med(same), med(b - a for a, b in zip(same, changed))


# -- theirs: transformers + peft on the same weights ------------------------------------------------

@dataclass
class Theirs:
    tokens: int
    processor_ms: float
    encoder_ms: float
    forward_ms: float
    ttft_ms: float


def _known(cls, values: dict) -> dict:
    """The keys of `values` that `cls` (a transformers config) takes."""
    import inspect
    names = set(inspect.signature(cls.__init__).parameters)
    return {k: v for k, v in values.items() if k in names and v is not None}


class Reference:
    """Phi4MultimodalForCausalLM + the vision and speech LoRAs (peft), float32, eager attention,
    loaded from the checkpoint our GGUFs were converted from."""

    def __init__(self, checkpoint: Path, placeholders: dict[str, dict], threads: int):
        import peft
        import torch
        from transformers import (
            Phi4MultimodalAudioConfig,
            Phi4MultimodalConfig,
            Phi4MultimodalFeatureExtractor,
            Phi4MultimodalForCausalLM,
            Phi4MultimodalImageProcessor,
            Phi4MultimodalProcessor,
            Phi4MultimodalVisionConfig,
            PreTrainedTokenizerFast,
        )
        from transformers.initialization import no_init_weights

        from convert.checkpoint import Checkpoint
        from tests.tiny_checkpoint import LORA_TARGETS

        self.torch = torch
        torch.set_num_threads(threads)
        ckpt = Checkpoint.open(checkpoint)
        t = ckpt.text
        image_token, audio_token = placeholders[IMAGE]["token"], placeholders[AUDIO]["token"]
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_file=str(checkpoint / "tokenizer.json"), bos_token="<|endoftext|>", eos_token="<|endoftext|>",
            pad_token="<|endoftext|>", extra_special_tokens={"image_token": image_token, "audio_token": audio_token})
        self.processor = Phi4MultimodalProcessor(Phi4MultimodalImageProcessor(), Phi4MultimodalFeatureExtractor(),
                                                 tokenizer)
        # The placeholders' ids as this tokenizer reads them. The tokenizers library renumbers the bench
        # tokenizer's sparse special ids (199999, 200010.. after 8192 BPE tokens) to 8192.., so with the real
        # shapes the special tokens read other embedding rows than ours: the same work, other values.
        self.image_id, self.audio_id = (tokenizer.convert_tokens_to_ids(x) for x in (image_token, audio_token))
        vision = _known(Phi4MultimodalVisionConfig, {**ckpt.vision_config(), "image_token_id": self.image_id})
        audio = _known(Phi4MultimodalAudioConfig, {**ckpt.audio_config(), "audio_token_id": self.audio_id})
        config = Phi4MultimodalConfig(
            vocab_size=t.vocab_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads, num_key_value_heads=t.num_kv_heads,
            rms_norm_eps=t.rms_norm_eps, max_position_embeddings=t.max_position_embeddings,
            original_max_position_embeddings=t.original_max_position_embeddings,
            rope_parameters={"rope_type": "longrope", "rope_theta": t.rope_theta,
                             "partial_rotary_factor": t.rotary_dim / t.head_dim,
                             "original_max_position_embeddings": t.original_max_position_embeddings,
                             "short_factor": t.short_factor, "long_factor": t.long_factor},
            tie_word_embeddings=True, sliding_window=None, bos_token_id=t.bos_token_id,
            pad_token_id=t.pad_token_id, eos_token_id=t.eos_token_ids, vision_config=vision, audio_config=audio)
        with no_init_weights():  # every weight is copied from the checkpoint below
            model = Phi4MultimodalForCausalLM._from_config(config, attn_implementation="eager", dtype=torch.float32)
        state = model.state_dict()
        missing = []
        with torch.no_grad():
            for name, tensor in state.items():
                if ckpt.has(name):
                    tensor.copy_(torch.from_numpy(ckpt.load(name)))
                elif name != "lm_head.weight":
                    missing.append(name)
            if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
                model.lm_head.weight.copy_(model.model.embed_tokens.weight)
        if missing:
            raise RuntimeError(f"not in the checkpoint: {missing[:5]}{'...' if len(missing) > 5 else ''}")
        for name in ("vision", "speech"):
            lora = ckpt.lora(name)
            cfg = peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, target_modules=LORA_TARGETS, lora_dropout=0.0)
            if isinstance(model, peft.PeftModel):
                model.add_adapter(name, cfg)
            else:
                model = peft.get_peft_model(model, cfg, adapter_name=name)
            modules = dict(model.get_base_model().named_modules())
            with torch.no_grad():
                for module, (load_a, load_b) in lora.pairs.items():
                    modules[module].lora_A[name].weight.copy_(torch.from_numpy(load_a()))
                    modules[module].lora_B[name].weight.copy_(torch.from_numpy(load_b()))
        self.model = model.eval()
        self.embeddings = model.get_base_model().model.embed_tokens_extend
        for sub in (self.embeddings.image_embed, self.embeddings.audio_embed):
            sub.register_forward_pre_hook(self._enter)
            sub.register_forward_hook(self._leave)
        self._encoder_s, self._t = 0.0, 0.0

        self.image_token, self.audio_token = image_token, audio_token

    def _enter(self, *_):
        self._t = time.perf_counter()

    def _leave(self, *_):
        self._encoder_s += time.perf_counter() - self._t

    def run(self, engine: LocalEngine, messages: list[dict]) -> Theirs:
        """Processor + forward to the first token. The prompt text is the model's chat template rendered
        (by our renderer, outside the timing: microseconds) with one placeholder per image or clip."""
        torch = self.torch
        prompt = engine.template.build(messages)
        text, images, clips, max_crops = [], [], [], None
        n_image = n_audio = 0  # positions our engine gives them
        for piece in prompt.pieces:
            if isinstance(piece, Media):
                if piece.kind == IMAGE:
                    text.append(self.image_token)
                    images.append(piece.value)
                    max_crops = piece.options.get("max_crops") or engine.vision.cfg.max_crops
                    n_image += engine.vision.num_tokens(*piece.value.size, max_crops)
                else:
                    text.append(self.audio_token)
                    samples, rate = piece.value
                    assert rate == SR
                    clips.append(samples)
                    n_audio += engine.speech.num_tokens(len(samples))
            else:
                text.append(piece.text if isinstance(piece, Text) else piece)
        kwargs = {}
        if images:
            kwargs.update(images=images, dynamic_hd=max_crops)
        if clips:
            kwargs.update(audio=clips, sampling_rate=SR)
        adapter = prompt.adapter
        self._encoder_s = 0.0
        t0 = time.perf_counter()
        inputs = self.processor(text="".join(text), return_tensors="pt", **kwargs)
        t1 = time.perf_counter()
        if adapter is None:
            selected = self.model.disable_adapter()
        else:
            self.model.set_adapter(adapter)
            selected = contextlib.nullcontext()
        with torch.inference_mode(), selected:
            logits = self.model(**inputs, logits_to_keep=1).logits
            int(logits[0, -1].argmax())
        t2 = time.perf_counter()
        ids = inputs["input_ids"][0]
        found = (int((ids == self.image_id).sum()), int((ids == self.audio_id).sum()))
        if found != (n_image, n_audio):
            raise RuntimeError(f"transformers' prompt has {found} image/audio placeholders, ours {(n_image, n_audio)}")
        if (n_image or n_audio) and self._encoder_s == 0:
            raise RuntimeError("transformers' encoders did not run")
        return Theirs(int(inputs["input_ids"].shape[1]), (t1 - t0) * 1e3, self._encoder_s * 1e3, (t2 - t1) * 1e3,
                      (t2 - t0) * 1e3)

    def decode_rate(self, engine: LocalEngine, messages: list[dict], n: int) -> float:
        """Greedy tokens per second after a text prompt, with the KV cache, as `generate` runs it: n steps
        of one token each (no end-of-text check: random weights end at random), timed after the first."""
        torch = self.torch
        text = "".join(p.text if isinstance(p, Text) else p for p in engine.template.build(messages).pieces)
        inputs = self.processor(text=text, return_tensors="pt")
        with torch.inference_mode(), self.model.disable_adapter():
            out = self.model(**inputs, use_cache=True, logits_to_keep=1)
            past, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
            t0 = time.perf_counter()
            for _ in range(n):
                out = self.model(input_ids=token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
            return n / (time.perf_counter() - t0)


# -- machine figures ---------------------------------------------------------------------------------

def gemm_peak(sizes=(1024, 2048, 3072), tries=5) -> tuple[float, float]:
    """Best float32 GEMM rate, GFLOP/s, of numpy (OpenBLAS) and torch, square matrices, these threads."""
    import torch
    rng = np.random.default_rng(0)
    best_np = best_torch = 0.0
    for n in sizes:
        a, b = (rng.standard_normal((n, n), dtype=np.float32) for _ in range(2))
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        a @ b, ta @ tb  # warm
        for _ in range(tries):
            for kind, f in (("np", lambda a=a, b=b: a @ b), ("torch", lambda a=ta, b=tb: a @ b)):
                time.sleep(0.1)
                t = time.perf_counter()
                f()
                rate = 2 * n ** 3 / (time.perf_counter() - t) / 1e9
                if kind == "np":
                    best_np = max(best_np, rate)
                else:
                    best_torch = max(best_torch, rate)
    return best_np, best_torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(folder: Path, threads: int, n_ctx: int) -> None:
    """Our process alone: load the engine, ask the image + speech question once, print the peak RSS (JSON)."""
    assert "torch" not in sys.modules

    def status() -> dict[str, int]:
        lines = Path("/proc/self/status").read_text().splitlines()
        return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in lines) if v.strip().endswith("kB")}

    # VmHWM, the peak resident size, starts again here and after loading. Not ru_maxrss: exec keeps
    # the parent's peak in it (the parent may hold torch).
    Path("/proc/self/clear_refs").write_text("5")
    engine = LocalEngine.load(folder, n_ctx=n_ctx, n_threads=threads)
    loaded = rss_bytes()
    peak = status()["VmHWM"]                       # the loading's peak
    Path("/proc/self/clear_refs").write_text("5")
    messages = rows(engine)[-1].make(0)
    usage = engine.generate(messages, Sampling(max_tokens=1)).usage
    after = status()
    file_backed, answering = after["RssFile"], after["VmHWM"]
    peak = max(peak, answering)
    print(json.dumps({"loaded": loaded, "after": rss_bytes(), "peak": peak, "answering": answering,
                      "file_backed": file_backed, "tokens": usage.prompt_tokens}))


def per_layer_bytes(folder: Path, n_layers: int) -> dict[str, float]:
    """One decoder layer's share of memory: its tensors in backbone.gguf and both LoRA files, its KV cache."""
    import gguf
    out = {}
    for name in ("backbone", "lora-vision", "lora-speech"):
        reader = gguf.GGUFReader(folder / f"{name}.gguf")
        out[name] = sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("blk.")) / n_layers
    return out


# -- the benchmark -----------------------------------------------------------------------------------

def med(values) -> float:
    return statistics.median(list(values))


def prefill_flops(shape: dict, n: int, rank: int) -> float:
    d, q, kv, f, L, V = (shape[k] for k in ("d", "q", "kv", "f", "layers", "vocab"))
    P = d * (q + 2 * kv) + q * d + d * 2 * f + f * d
    R = rank * ((d + q + 2 * kv) + (q + d) + (d + 2 * f) + (f + d))
    return 2 * n * L * (P + R) + 2 * L * q * n * (n + 1) + 2 * d * V


def table(head: tuple, body: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in [head] + body) for i in range(len(head))]
    for row in [head] + body:
        print("  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def our_memory(folder: Path, args) -> dict:
    """`memory_child` in a process of its own (no torch in it); prints and returns its figures."""
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", str(folder),
                          "--threads", str(args.threads), "--n-ctx", str(args.n_ctx)],
                         capture_output=True, text=True, env=dict(os.environ), check=False)
    if out.returncode:
        print(out.stderr[-3000:], file=sys.stderr)
        raise RuntimeError("the memory measurement failed")
    memory = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"our process alone: {memory['loaded'] / GIB:.2f} GiB resident once loaded, at most "
          f"{memory['answering'] / GIB:.2f} GiB while answering an image + speech question ({memory['tokens']} tokens), "
          f"{memory['after'] / GIB:.2f} GiB after it ({memory['file_backed'] / GIB:.2f} GiB of it file-backed: mapped "
          f"files); {memory['peak'] / GIB:.2f} GiB at the peak of the process's life (target {TARGET_GIB:.0f} GiB)",
          flush=True)
    return memory


def main(args) -> int:
    tiny = args.tiny
    reps = args.reps or (7 if tiny else 3)
    folder = ensure_model(None, tiny, args.layers, args.outtype)
    manifest = json.loads((folder / "manifest.json").read_text())
    checkpoint = Path(manifest["source"])
    if args.memory_only:
        print(f"model      {folder} ({manifest['outtype']} decoder, "
              f"{json.loads((checkpoint / 'config.json').read_text())['num_hidden_layers']} layers)")
        our_memory(folder, args)
        return 0

    import llama_cpp
    import torch
    import transformers

    config = json.loads((checkpoint / "config.json").read_text())
    n_layers = int(config["num_hidden_layers"])
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    shape = {"d": config["hidden_size"], "q": config["num_attention_heads"] * head_dim,
             "kv": config["num_key_value_heads"] * head_dim, "f": config["intermediate_size"], "layers": n_layers,
             "vocab": config["vocab_size"]}
    print(f"model      {folder} ({manifest['outtype']} decoder, {n_layers} layers, width {shape['d']}, "
          f"vocabulary {shape['vocab']}; encoders {encoder_storage(manifest['outtype'])} on disk and in memory)")
    print(f"reference  {checkpoint} (bf16 -> float32), transformers {transformers.__version__}, "
          f"torch {torch.__version__}, eager attention")
    print(f"machine    {cpu_name()}, {os.cpu_count()} cores, {platform.python_version()}; threads {args.threads} "
          f"(llama.cpp, OPENBLAS_NUM_THREADS, torch.set_num_threads); llama-cpp-python {llama_cpp.__version__}, "
          f"numpy {np.__version__}")
    print(f"runs       {reps} interleaved repetitions after a warm-up; medians", flush=True)

    t = time.perf_counter()
    peak_np, peak_torch = gemm_peak()
    print(f"float32 GEMM peak (square 1024..3072, best of 5): numpy {peak_np:.1f} GFLOP/s, "
          f"torch {peak_torch:.1f} GFLOP/s ({time.perf_counter() - t:.0f} s)", flush=True)

    memory = our_memory(folder, args)

    t = time.perf_counter()
    engine = LocalEngine.load(folder, n_ctx=args.n_ctx, n_threads=args.threads)
    print(f"ours loaded in {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    ref = Reference(checkpoint, manifest["placeholders"], args.threads)
    print(f"transformers + peft loaded in {time.perf_counter() - t:.0f} s", flush=True)

    decode_prompt = find_decode_prompt(engine, DECODE_TOKENS + 1)
    ours_decode, theirs_decode = [], []
    for r in range(reps + 1):  # the first is a warm-up
        time.sleep(PAUSE_S)
        a = engine.generate(decode_prompt, Sampling(max_tokens=DECODE_TOKENS + 1, temperature=0)).usage
        time.sleep(PAUSE_S)
        b = ref.decode_rate(engine, decode_prompt, DECODE_TOKENS)
        if r:
            ours_decode.append(a.decode_tokens_per_s)
            theirs_decode.append(b)
    print(f"\nDecode, greedy tokens/s after a short prompt ({DECODE_TOKENS} tokens, medians of {reps}): ours "
          f"{med(ours_decode):.2f}, theirs {med(theirs_decode):.2f}: ours {med(ours_decode) / med(theirs_decode):.1f}x "
          f"faster", flush=True)
    if args.decode_only:
        engine.close()
        return 0

    cases = rows(engine)
    for messages in warmups() + [cases[0].make(-1)]:
        run_ours(engine, messages), ref.run(engine, messages)
    print("warm-up done", flush=True)

    ours: dict[str, list[Ours]] = {c.label: [] for c in cases}
    theirs: dict[str, list[Theirs]] = {c.label: [] for c in cases}
    for r in range(reps):
        t = time.perf_counter()
        for i, case in enumerate(cases):
            messages = case.make(r)
            sides = [("ours", lambda m=messages: run_ours(engine, m)),
                     ("theirs", lambda m=messages: ref.run(engine, m))]
            for side, fn in sides if (r + i) % 2 == 0 else sides[::-1]:
                time.sleep(PAUSE_S)
                (ours if side == "ours" else theirs)[case.label].append(fn())
            a, b = ours[case.label][-1], theirs[case.label][-1]
            if a.tokens != b.tokens:
                print(f"  WARNING {case.label}: ours read {a.tokens} positions, theirs {b.tokens}", flush=True)
        print(f"repetition {r + 1}/{reps} done in {time.perf_counter() - t:.0f} s", flush=True)
    switch_row = next(c for c in cases if c.label.startswith("speech 5"))
    switch_same, switch_extra = switch_phase(engine, switch_row, reps)
    again = gemm_peak()  # the machine is shared: the best of a measurement before and one after
    print(f"float32 GEMM peak again: numpy {again[0]:.1f} GFLOP/s, torch {again[1]:.1f} GFLOP/s", flush=True)
    peak_np, peak_torch = max(peak_np, again[0]), max(peak_torch, again[1])

    ranks = manifest.get("lora_rank", {})
    body, flops_body, est_body = [], [], []
    for case in cases:
        a, b = ours[case.label], theirs[case.label]
        n = round(med(x.tokens for x in a))
        adapter = a[0].adapter
        ratio = med(x.ttft_ms / y.ttft_ms for x, y in zip(a, b))
        body.append((case.label, n, adapter or "-", f"{med(x.encoder_ms for x in a):.0f}",
                     f"{med(x.prefill_ms for x in a):.0f}", f"{med(n / x.prefill_ms * 1e3 for x in a):.1f}",
                     f"{med(x.ttft_ms for x in a):.0f}", f"{med(y.processor_ms for y in b):.0f}",
                     f"{med(y.encoder_ms for y in b):.0f}", f"{med(y.forward_ms - y.encoder_ms for y in b):.0f}",
                     f"{med(y.ttft_ms for y in b):.0f}", f"{ratio:.2f}"))
        flops = prefill_flops(shape, n, ranks.get(adapter, 0) if adapter else 0)
        rate = med(flops / (x.prefill_ms / 1e3) / 1e9 for x in a)
        flops_body.append((case.label, n, f"{flops / 1e9:.1f}", f"{rate:.1f}", f"{rate / peak_np:.2f}"))
        if n_layers < REAL_LAYERS and not tiny:
            k = REAL_LAYERS / n_layers
            ours32 = [x.ttft_ms + (k - 1) * x.prefill_ms for x in a]
            theirs32 = [y.ttft_ms + (k - 1) * (y.forward_ms - y.encoder_ms) for y in b]
            est_body.append((case.label, f"{med(x.prefill_ms for x in a) * k / 1e3:.1f}", f"{med(ours32) / 1e3:.1f}",
                             f"{med(y.forward_ms - y.encoder_ms for y in b) * k / 1e3:.1f}",
                             f"{med(theirs32) / 1e3:.1f}",
                             f"{med(x / y for x, y in zip(ours32, theirs32)):.2f}"))

    print(f"\nTime to first token, ms (medians of {reps}; ours/theirs = median of the per-repetition ratios, "
          f"< 1: ours faster; the goal is 0.65)")
    table(("", "tokens", "LoRA", "ours enc", "ours prefill", "prefill tok/s", "ours TTFT",
           "theirs proc", "theirs enc", "theirs decoder", "theirs TTFT", "ours/theirs"), body)

    print(f"(ours: the row's LoRA already in place. The first request after a change of LoRA costs more: "
          f"{switch_row.label}, prefill {switch_same:.0f} ms, {switch_extra:+.0f} ms after a text request, "
          f"median of {reps})")

    print(f"\nOur prefill against the machine's float32 GEMM peak ({peak_np:.1f} GFLOP/s, numpy, the better of the two "
          f"measurements; torch {peak_torch:.1f}; "
          f"FLOPs = 2nL(P+R) + 2Lqn(n+1) + 2dV, see the docstring)")
    table(("", "tokens", "prefill GFLOP", "ours GFLOP/s", "of peak"), flops_body)

    if est_body:
        print(f"\nEstimated at {REAL_LAYERS} layers (decoder part x {REAL_LAYERS}/{n_layers}, the rest as measured; "
              f"an estimate, not a run), seconds")
        table(("", "ours prefill", "ours TTFT", "theirs decoder", "theirs TTFT", "ours/theirs"), est_body)

    print(f"\nResident memory of our process (engine + both encoders, no torch): at most "
          f"{memory['answering'] / GIB:.2f} GiB while answering the image + speech question, {memory['peak'] / GIB:.2f} "
          f"GiB at the peak of its life (target {TARGET_GIB:.0f} GiB)")
    if n_layers < REAL_LAYERS and not tiny:
        layer = per_layer_bytes(folder, n_layers)
        kv = args.n_ctx * 2 * shape["kv"] * 2  # K and V, f16, the 4096-position window
        extra = (REAL_LAYERS - n_layers) * (sum(layer.values()) + kv)
        print(f"  estimated at {REAL_LAYERS} layers: {(memory['answering'] + extra) / GIB:.2f} GiB while answering, "
              f"{(memory['peak'] + extra) / GIB:.2f} GiB at the peak = measured + "
              f"{REAL_LAYERS - n_layers} x ({layer['backbone'] / 2**20:.0f} MiB backbone + "
              f"{(layer['lora-vision'] + layer['lora-speech']) / 2**20:.0f} MiB LoRAs + {kv / 2**20:.0f} MiB KV cache) "
              f"per layer, from the GGUF files (an estimate)")
    engine.close()
    return 0


if __name__ == "__main__":
    if ARGS.memory_child:
        memory_child(Path(ARGS.memory_child), ARGS.threads, ARGS.n_ctx)
        sys.exit(0)
    sys.exit(main(ARGS))
