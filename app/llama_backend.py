"""A thin, typed layer over llama-cpp-python's low-level C API.

The high-level `Llama` gives one fixed LoRA and no embeddings input
(docs/llama-cpp.md, "LoRA adapters"), so the engine drives llama.cpp directly:
one `LlamaModel` (weights, vocabulary, LoRA adapters) and one or more
`LlamaContext`s (a KV cache each) on it.
"""
from __future__ import annotations

import ctypes
import logging
import os
import re
from pathlib import Path

import llama_cpp as L
import numpy as np

_backend_ready = False


def _init_backend(verbose: bool) -> None:
    global _backend_ready
    # llama-cpp-python routes llama.cpp's log through this logger.
    logging.getLogger("llama-cpp-python").setLevel(logging.DEBUG if verbose else logging.ERROR)
    if not _backend_ready:
        L.llama_backend_init()
        _backend_ready = True


class LlamaError(RuntimeError):
    pass


# llama.cpp's pre-tokenizer (the regex that splits text into words before BPE; for Phi-4 the
# gpt-4o one) recurses once per character of a match, on the calling thread's stack. A long
# run of letters, punctuation or spaces overflows it and kills the whole process: measured
# with llama-cpp-python 0.3.36, about 330 bytes of stack per character, so 25,000 "a"s crash
# the 8 MB main thread, 3,000 a thread of 1 MB, 1,000 one of 256 KB (tests/test_hostile_input.py
# finds the limit again). Runs are cut into pieces of MAX_RUN characters, tokenized one after
# the other: safe on any thread of 256 KB or more, and ordinary text, which has no such runs,
# tokenizes exactly as before.
MAX_RUN = 512
_LONG_RUN = re.compile(rf"\S{{{MAX_RUN + 1},}}|\s{{{MAX_RUN + 1},}}")


def _bounded_pieces(text: str) -> list[str]:
    """`text` cut so that no piece holds a run of more than MAX_RUN non-space (or space) characters."""
    pieces, start = [], 0
    for run in _LONG_RUN.finditer(text):
        for cut in range(run.start() + MAX_RUN, run.end(), MAX_RUN):
            pieces.append(text[start:cut])
            start = cut
    pieces.append(text[start:])
    return [p for p in pieces if p] or [text]


class LlamaModel:
    """Weights + vocabulary of one GGUF, and the LoRA adapters loaded on it."""

    def __init__(self, path: str | os.PathLike, verbose: bool = False):
        _init_backend(verbose)
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model file not found: {path}")
        params = L.llama_model_default_params()
        # Read into memory, not mapped: on CPUs where llama.cpp repacks the quantised weights for
        # faster products (q4_0, q4_K on AVX2 and NEON) a mapped file keeps every repacked tensor
        # twice in the resident size, the file's pages beside the repacked copy.
        params.load_mode = L.LLAMA_LOAD_MODE_NONE
        self.ptr = L.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise LlamaError(f"llama.cpp could not load {path} (not a GGUF it supports?)")
        self.path = path
        self.vocab = L.llama_model_get_vocab(self.ptr)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_embd = L.llama_model_n_embd_inp(self.ptr)
        self.n_ctx_train = L.llama_model_n_ctx_train(self.ptr)
        self.add_bos = bool(L.llama_vocab_get_add_bos(self.vocab))
        self.adapters: dict[str, ctypes.c_void_p] = {}

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = L.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def chat_template(self) -> str | None:
        raw = L.llama_model_chat_template(self.ptr, None)
        return raw.decode("utf-8") if raw else None

    def token_text(self, token: int, special: bool = True) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def tokenize(self, text: str, add_bos: bool = False, special: bool = True) -> list[int]:
        """Text -> token ids; with `special`, special tokens written in the text (`<|end|>`) are parsed as such.

        A run of more than MAX_RUN characters without a space (or of spaces) is tokenized in
        pieces of MAX_RUN: see `_bounded_pieces`.
        """
        ids: list[int] = []
        for i, piece in enumerate(_bounded_pieces(text)):
            ids += self._tokenize(piece, add_bos and i == 0, special)
        return ids

    def _tokenize(self, text: str, add_bos: bool, special: bool) -> list[int]:
        try:
            raw = text.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (from JSON "\\ud800", say): read as U+FFFD
            raw = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace").encode("utf-8")
        n_max = len(raw) + 8
        tokens = (L.llama_token * n_max)()
        n = L.llama_tokenize(self.vocab, raw, len(raw), tokens, n_max, add_bos, special)
        if n < 0:
            tokens = (L.llama_token * -n)()
            n = L.llama_tokenize(self.vocab, raw, len(raw), tokens, -n, add_bos, special)
        return list(tokens[:n])

    def is_end_of_generation(self, token: int) -> bool:
        return bool(L.llama_vocab_is_eog(self.vocab, token))

    def load_adapter(self, name: str, path: str | os.PathLike) -> None:
        ptr = L.llama_adapter_lora_init(self.ptr, str(path).encode())
        if not ptr:
            raise LlamaError(f"llama.cpp could not load the {name} LoRA from {path}")
        self.adapters[name] = ptr

    def close(self) -> None:
        if self.ptr:
            L.llama_model_free(self.ptr)  # frees its adapters too
            self.ptr = None


class LlamaContext:
    """One KV cache (sequence 0) on a model: decode tokens or embedding rows, read logits."""

    def __init__(self, model: LlamaModel, n_ctx: int, n_batch: int, n_threads: int, kv_type: str = "f16",
                 flash_attn: bool = False):
        params = L.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.n_seq_max = 1
        params.n_threads = n_threads
        params.n_threads_batch = n_threads
        # Off by default, as llama-cpp-python's `Llama`, so benchmarks compare like with like.
        params.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        kv = {"f16": L.GGML_TYPE_F16, "f32": L.GGML_TYPE_F32}[kv_type]
        params.type_k = params.type_v = kv
        self.ptr = L.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise LlamaError(f"llama.cpp could not create a context of {n_ctx} tokens")
        self.model = model
        self.n_ctx = L.llama_n_ctx(self.ptr)
        self.n_batch = n_batch
        self.memory = L.llama_get_memory(self.ptr)
        self._tokens = L.llama_batch_init(n_batch, 0, 1)
        self._embeds = L.llama_batch_init(n_batch, model.n_embd, 1)
        self._active: tuple[str, ...] = ()

    # -- adapters -------------------------------------------------------------------------

    def set_adapters(self, names: tuple[str, ...]) -> None:
        """Replace the active LoRA set (scale 1.0 each: the GGUF's alpha/r reproduces PEFT)."""
        if names == self._active:
            return
        n = len(names)
        ptrs = (L.llama_adapter_lora_p_ctypes * max(n, 1))(*[self.model.adapters[a] for a in names])
        scales = (ctypes.c_float * max(n, 1))(*[1.0] * n)
        if L.llama_set_adapters_lora(self.ptr, ptrs if n else None, n, scales if n else None) != 0:
            raise LlamaError(f"llama.cpp refused the adapter set {names}")
        self._active = names

    # -- cache ----------------------------------------------------------------------------

    def truncate(self, n_keep: int) -> None:
        """Drop every cached position from `n_keep` on."""
        if n_keep == 0:
            L.llama_memory_clear(self.memory, True)
        elif not L.llama_memory_seq_rm(self.memory, 0, n_keep, -1):
            raise LlamaError("llama.cpp could not trim the KV cache")

    # -- decoding -------------------------------------------------------------------------

    def decode_tokens(self, tokens: list[int], pos0: int, want_logits: bool) -> None:
        """Prefill `tokens` at positions pos0..; chunks of n_batch (a larger batch aborts llama.cpp)."""
        def fill(b, start: int, stop: int) -> None:
            for i, tok in enumerate(tokens[start:stop]):
                b.token[i] = tok

        self._decode_chunks(self._tokens, len(tokens), pos0, want_logits, fill)

    def decode_embeddings(self, rows: np.ndarray, pos0: int, want_logits: bool) -> None:
        """Prefill embedding rows (n, n_embd) in place of tokens, chunked like tokens."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.model.n_embd:
            raise ValueError(f"embeddings must be (n, {self.model.n_embd}), got {rows.shape}")

        def fill(b, start: int, stop: int) -> None:
            chunk = rows[start:stop]
            ctypes.memmove(b.embd, chunk.ctypes.data, chunk.nbytes)

        self._decode_chunks(self._embeds, len(rows), pos0, want_logits, fill)

    def _decode_chunks(self, b, n: int, pos0: int, want_logits: bool, fill) -> None:
        """Decode n positions in batches of at most n_batch; `fill` writes each batch's inputs."""
        for start in range(0, n, self.n_batch):
            stop = min(start + self.n_batch, n)
            b.n_tokens = stop - start
            fill(b, start, stop)
            for i in range(stop - start):
                b.pos[i] = pos0 + start + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = 0
            b.logits[stop - start - 1] = int(want_logits and stop == n)
            self._decode(b)

    def _decode(self, batch) -> None:
        rc = L.llama_decode(self.ptr, batch)
        if rc != 0:
            raise LlamaError(f"llama_decode failed (code {rc}; the context may be full)")

    def logits(self) -> np.ndarray:
        """A copy of the last output row's logits, float32 (n_vocab,)."""
        ptr = L.llama_get_logits_ith(self.ptr, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    def close(self) -> None:
        if self.ptr:
            L.llama_batch_free(self._tokens)
            L.llama_batch_free(self._embeds)
            L.llama_free(self.ptr)
            self.ptr = None


def json_schema_grammar(schema: dict) -> str:
    """GBNF for JSON valid under `schema`, by llama-cpp-python's own converter."""
    import json

    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    # Round-trip through JSON so that tuples and other Python-only values become JSON values.
    converter.visit(converter.resolve_refs(json.loads(json.dumps(schema)), "schema"), "")
    return converter.format_grammar()


class Sampler:
    """A llama.cpp sampler chain: optional grammar, then top-k / top-p / temperature, or greedy."""

    def __init__(self, model: LlamaModel, temperature: float, top_p: float, top_k: int,
                 seed: int | None, grammar: str | None):
        self.ptr = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if grammar:
            g = L.llama_sampler_init_grammar(model.vocab, grammar.encode("utf-8"), b"root")
            if not g:
                L.llama_sampler_free(self.ptr)
                raise ValueError("the grammar does not parse (llama.cpp GBNF expected, with a 'root' rule)")
            L.llama_sampler_chain_add(self.ptr, g)
        if temperature <= 0:
            L.llama_sampler_chain_add(self.ptr, L.llama_sampler_init_greedy())
        else:
            if top_k > 0:
                L.llama_sampler_chain_add(self.ptr, L.llama_sampler_init_top_k(top_k))
            if top_p < 1.0:
                L.llama_sampler_chain_add(self.ptr, L.llama_sampler_init_top_p(top_p, 1))
            L.llama_sampler_chain_add(self.ptr, L.llama_sampler_init_temp(temperature))
            seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little")
            L.llama_sampler_chain_add(self.ptr, L.llama_sampler_init_dist(seed))

    def sample(self, ctx: LlamaContext) -> int:
        """Pick the next token from the context's last logits (and let the chain accept it)."""
        return L.llama_sampler_sample(self.ptr, ctx.ptr, -1)

    def close(self) -> None:
        if self.ptr:
            L.llama_sampler_free(self.ptr)
            self.ptr = None
