"""Write a random-weight Phi-4-multimodal checkpoint for benchmarks, in the original remote-code layout.

    python -m bench.make_checkpoint [OUT] [--layers N] [--tiny] [--seed S]

With the real shapes (docs/model.md, "Decoder" and "Checkpoint layouts"): a 32-layer
3072-wide decoder with a 200064-row vocabulary, both LoRAs (vision r=256, speech r=320)
inside the base weights, the SigLIP vision tower and the conformer speech encoder; bf16
safetensors in ~2 GB shards (about 11 GB in all). `--tiny` writes the same layout with the tiny shapes of the
tests (a 64-wide, 2-layer decoder, 512 tokens) to magnify per-token overhead.

Weights are uniform random with std ~1/sqrt(fan_in) (norms ~1), generated and written
in chunks, so memory stays at a few hundred MB whatever the model size.

The real o200k vocabulary cannot be downloaded here, so the tokenizer is a byte-level
BPE with the o200k split regex trained on Python's standard-library sources (8192
tokens by default), its special tokens at their REAL ids (199999, 200010.., padded to
200064 by the converter). Default OUT: ~/.cache/phi4mm-bench/checkpoint-{real,tiny}.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import sysconfig
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from convert.tokenizer import GPT4O_PATTERN  # noqa: E402

CACHE = Path(os.environ.get("PHI4MM_BENCH_CACHE", Path.home() / ".cache" / "phi4mm-bench"))

# rope_scaling.long_factor of Phi-4-mini / Phi-4-multimodal (docs/model.md, "Decoder").
LONG_FACTOR = [
    1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817, 2.187582649,
    2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687, 4.279200023, 4.785517845,
    5.351743533, 5.984965424, 6.693110555, 7.485043894, 8.370679318, 9.36110372, 10.4687158,
    11.70738129, 13.09260651, 14.64173252, 16.37415215, 18.31155283, 20.47818807, 22.90118105,
    25.61086418, 28.64115884, 32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71,
    32.93, 32.97, 33.28, 33.49, 33.5, 44.16, 47.77,
]

# The special tokens at their ids in the real vocabulary (docs/model.md, "Decoder").
REAL_SPECIAL_IDS = {
    "<|endoftext|>": 199999, "<|endoftext10|>": 200010, "<|endoftext11|>": 200011, "<|endofprompt|>": 200018,
    "<|assistant|>": 200019, "<|end|>": 200020, "<|user|>": 200021, "<|system|>": 200022, "<|tool|>": 200023,
    "<|/tool|>": 200024, "<|tool_call|>": 200025, "<|/tool_call|>": 200026, "<|tool_response|>": 200027,
    "<|tag|>": 200028,
}

PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] "
    "is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
    "'<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

SHARD_BYTES = 2 * 1024 ** 3
CHUNK_ELEMENTS = 1 << 24  # values generated at a time (64 MB of float32)


@dataclass(frozen=True)
class Shapes:
    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int                  # embedding rows (the tokenizer is padded to this)
    bpe_vocab: int              # trained byte-level BPE tokens, ids 0..bpe_vocab-1
    real_special_ids: bool      # specials at their real ids, else right after the BPE tokens
    original_ctx: int
    max_ctx: int
    partial_rotary: float
    vision_rank: int
    vision_alpha: int
    speech_rank: int
    speech_alpha: int
    # SigLIP vision tower (docs/model.md, "Vision encoder")
    v_hidden: int
    v_layers: int
    v_heads: int
    v_intermediate: int
    v_patch: int
    v_crop: int
    # conformer speech encoder (docs/model.md, "Speech encoder")
    a_hidden: int
    a_heads: int
    a_blocks: int
    a_intermediate: int
    a_conv_channels: int
    a_bias_max_distance: int
    a_input_size: int = 80
    a_time_reduction: int = 8

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def n_rope_factors(self) -> int:
        return int(self.head_dim * self.partial_rotary) // 2


REAL = Shapes(
    name="real", layers=32, hidden=3072, heads=24, kv_heads=8, intermediate=8192, vocab=200064, bpe_vocab=8192,
    real_special_ids=True, original_ctx=4096, max_ctx=131072, partial_rotary=0.75,
    vision_rank=256, vision_alpha=512, speech_rank=320, speech_alpha=640,
    v_hidden=1152, v_layers=27, v_heads=16, v_intermediate=4304, v_patch=14, v_crop=448,
    a_hidden=1024, a_heads=16, a_blocks=24, a_intermediate=1536, a_conv_channels=1024, a_bias_max_distance=500,
)

# The tests' tiny shapes (tests/tiny_checkpoint.py TinyShapes), with the real context sizes.
TINY = Shapes(
    name="tiny", layers=2, hidden=64, heads=4, kv_heads=2, intermediate=96, vocab=512, bpe_vocab=400,
    real_special_ids=False, original_ctx=4096, max_ctx=131072, partial_rotary=0.75,
    vision_rank=8, vision_alpha=16, speech_rank=12, speech_alpha=24,
    v_hidden=32, v_layers=3, v_heads=2, v_intermediate=48, v_patch=14, v_crop=448,
    a_hidden=32, a_heads=2, a_blocks=2, a_intermediate=48, a_conv_channels=16, a_bias_max_distance=20,
)


# -- tensors -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Spec:
    """One stored tensor and how to fill it: `kind` is linear | norm | bias | small | lora_b | positive."""
    name: str
    shape: tuple[int, ...]
    kind: str = "linear"

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _linear(prefix: str, out: int, inp: int, bias: bool = True) -> list[Spec]:
    specs = [Spec(f"{prefix}.weight", (out, inp))]
    return specs + [Spec(f"{prefix}.bias", (out,), "bias")] if bias else specs


def _norm(prefix: str, n: int) -> list[Spec]:
    return [Spec(f"{prefix}.weight", (n,), "norm"), Spec(f"{prefix}.bias", (n,), "bias")]


def _conv(prefix: str, shape: tuple[int, ...]) -> list[Spec]:
    return [Spec(f"{prefix}.weight", shape), Spec(f"{prefix}.bias", (shape[0],), "bias")]


def decoder_specs(s: Shapes) -> list[Spec]:
    """The LM with both LoRAs PEFT-wrapped in place (docs/model.md, "Checkpoint layouts")."""
    qkv = (s.heads + 2 * s.kv_heads) * s.head_dim
    linears = {"self_attn.qkv_proj": (qkv, s.hidden), "self_attn.o_proj": (s.hidden, s.heads * s.head_dim),
               "mlp.gate_up_proj": (2 * s.intermediate, s.hidden), "mlp.down_proj": (s.hidden, s.intermediate)}
    specs = [Spec("model.embed_tokens.weight", (s.vocab, s.hidden))]
    for i in range(s.layers):
        p = f"model.layers.{i}"
        specs.append(Spec(f"{p}.input_layernorm.weight", (s.hidden,), "norm"))
        for module, (out, inp) in linears.items():
            specs.append(Spec(f"{p}.{module}.base_layer.weight", (out, inp)))
            for adapter, r in (("vision", s.vision_rank), ("speech", s.speech_rank)):
                specs.append(Spec(f"{p}.{module}.lora_A.{adapter}.weight", (r, inp)))
                specs.append(Spec(f"{p}.{module}.lora_B.{adapter}.weight", (out, r), "lora_b"))
        specs.append(Spec(f"{p}.post_attention_layernorm.weight", (s.hidden,), "norm"))
    specs.append(Spec("model.norm.weight", (s.hidden,), "norm"))
    return specs


def vision_specs(s: Shapes) -> list[Spec]:
    """SigLIP tower (incl. the unused post-norm and pooling head), separators and projector."""
    p, c, f = "model.embed_tokens_extend.image_embed.", s.v_hidden, s.v_intermediate
    tower = p + "img_processor."
    specs = _conv(tower + "embeddings.patch_embedding", (c, 3, s.v_patch, s.v_patch))
    specs.append(Spec(tower + "embeddings.position_embedding.weight", ((s.v_crop // s.v_patch) ** 2, c), "small"))
    for j in range(s.v_layers):
        layer = f"{tower}encoder.layers.{j}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs += _linear(layer + "self_attn." + proj, c, c)
        specs += _norm(layer + "layer_norm1", c) + _norm(layer + "layer_norm2", c)
        specs += _linear(layer + "mlp.fc1", f, c) + _linear(layer + "mlp.fc2", c, f)
    specs += _norm(tower + "post_layernorm", c)
    head = tower + "head."
    specs += [Spec(head + "probe", (1, 1, c), "small"), Spec(head + "attention.in_proj_weight", (3 * c, c)),
              Spec(head + "attention.in_proj_bias", (3 * c,), "bias")]
    specs += _linear(head + "attention.out_proj", c, c) + _norm(head + "layernorm", c)
    specs += _linear(head + "mlp.fc1", f, c) + _linear(head + "mlp.fc2", c, f)
    specs += [Spec(p + "glb_GN", (1, 1, c), "small"), Spec(p + "sub_GN", (1, 1, 1, c), "small")]
    specs += _linear(p + "img_projection.0", s.hidden, c) + _linear(p + "img_projection.2", s.hidden, s.hidden)
    return specs


def audio_specs(s: Shapes) -> list[Spec]:
    """Conformer (nemo_conv subsampling, T5 relative bias, blocks) and both projectors."""
    p, h, ch = "model.embed_tokens_extend.audio_embed.", s.a_hidden, s.a_conv_channels
    enc = p + "encoder."
    specs = [Spec(enc + "encoder_embedding.global_mean", (s.a_input_size,), "bias"),
             Spec(enc + "encoder_embedding.global_invstd", (s.a_input_size,), "positive")]
    specs += _conv(enc + "embed.conv.0", (ch, 1, 3, 3))
    n_stages = int(math.log2(s.a_time_reduction))
    for i in range(1, n_stages):
        specs += _conv(f"{enc}embed.conv.{3 * i - 1}", (ch, 1, 3, 3))   # depthwise
        specs += _conv(f"{enc}embed.conv.{3 * i}", (ch, ch, 1, 1))      # pointwise
    freq = s.a_input_size
    for _ in range(n_stages):
        freq = (freq + 1) // 2
    specs += _linear(enc + "embed.out", h, ch * freq)
    specs.append(Spec(enc + "relative_attention_bias_layer.bias_values.weight",
                      (2 * s.a_bias_max_distance, s.a_heads), "small"))
    for k in range(s.a_blocks):
        b = f"{enc}encoders.{k}."
        for side in ("in", "out"):
            ff = f"{b}feed_forward_{side}."
            specs += _norm(ff + "layer_norm", h) + _linear(ff + "net.0.linear", 2 * s.a_intermediate, h)
            specs += _linear(ff + "net.2", h, s.a_intermediate)
        for proj in ("linear_q", "linear_k", "linear_v", "linear_out"):
            specs += _linear(b + "self_attn." + proj, h, h)
        specs += _norm(b + "conv.layer_norm", h) + _conv(b + "conv.glu.ext_pw_conv_1d", (2 * h, h, 1))
        specs += [Spec(b + "conv.glu.b1", (1, h, 1), "bias"), Spec(b + "conv.glu.b2", (1, h, 1), "bias")]
        specs += _conv(b + "conv.dw_sep_conv_1d.dw_conv", (h, 1, 3))
        specs += _conv(b + "conv.dw_sep_conv_1d.pw_conv", (h, h, 1))
        specs += _conv(b + "conv.ext_pw_conv_1d", (h, h, 1))
        specs += _norm(b + "layer_norm_att", h) + _norm(b + "layer_norm", h)
    for mode in ("speech", "vision"):
        specs += _linear(f"{p}audio_projection.{mode}.0", s.hidden, h)
        specs += _linear(f"{p}audio_projection.{mode}.2", s.hidden, s.hidden)
    return specs


def all_specs(s: Shapes) -> list[Spec]:
    return decoder_specs(s) + vision_specs(s) + audio_specs(s)


def _fill(spec: Spec, rows: int, rng: np.random.Generator) -> np.ndarray:
    """`rows` leading rows of the tensor, float32, uniform with the kind's spread."""
    row_shape = spec.shape[1:]
    n = rows * math.prod(row_shape)
    u = rng.random(n, dtype=np.float32)          # [0, 1)
    u -= 0.5
    u *= 2 * math.sqrt(3)                        # std 1
    if spec.kind == "linear":
        fan_in = math.prod(spec.shape[1:]) if len(spec.shape) > 1 else 1
        u *= 1.0 / math.sqrt(fan_in)
    elif spec.kind == "lora_b":
        u *= 0.1 / math.sqrt(spec.shape[1])      # a small, non-zero delta
    elif spec.kind == "norm":
        u *= 0.05
        u += 1.0
    elif spec.kind == "positive":
        u *= 0.1
        u += 1.0
    else:                                        # bias, small
        u *= 0.02
    return u.reshape((rows, *row_shape))


# -- safetensors, streamed ---------------------------------------------------------------------------

def _to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits, rounded to nearest even (as convert.safetensors_file.save_safetensors)."""
    bits = a.view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _shards(specs: list[Spec], shard_bytes: int) -> list[list[Spec]]:
    shards, current, used = [], [], 0
    for spec in specs:
        nbytes = 2 * spec.size
        if current and used + nbytes > shard_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(spec)
        used += nbytes
    return shards + [current] if current else shards


def write_shard(path: Path, specs: list[Spec], rng: np.random.Generator) -> None:
    """One bf16 safetensors file, each tensor generated and written in chunks (via `path.tmp`)."""
    header, offset = {}, 0
    for spec in specs:
        header[spec.name] = {"dtype": "BF16", "shape": list(spec.shape), "data_offsets": [offset, offset + 2 * spec.size]}
        offset += 2 * spec.size
    raw = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for spec in specs:
            row = math.prod(spec.shape[1:]) if len(spec.shape) > 1 else 1
            rows_total = spec.shape[0] if spec.shape else 1
            step = max(1, CHUNK_ELEMENTS // row)
            for start in range(0, rows_total, step):
                f.write(_to_bf16(_fill(spec, min(step, rows_total - start), rng)).tobytes())
    os.replace(tmp, path)


def write_weights(folder: Path, specs: list[Spec], seed: int, shard_bytes: int = SHARD_BYTES,
                  progress: bool = True) -> None:
    shards = _shards(specs, shard_bytes)
    rng = np.random.default_rng(seed)
    index, total = {}, 0
    for i, part in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        t0 = time.perf_counter()
        write_shard(folder / name, part, rng)
        nbytes = sum(2 * s.size for s in part)
        total += nbytes
        index.update({s.name: name for s in part})
        if progress:
            print(f"  {name}: {len(part)} tensors, {nbytes / 1e9:.2f} GB in {time.perf_counter() - t0:.0f} s",
                  flush=True)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2))


# -- tokenizer ---------------------------------------------------------------------------------------

def training_corpus(max_bytes: int = 4_000_000) -> Iterator[str]:
    """Python's own standard-library sources: always present, offline, English docstrings and code."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    used = 0
    for path in sorted(stdlib.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield text
        used += len(text)
        if used >= max_bytes:
            return


def special_ids(s: Shapes, n_bpe: int) -> dict[str, int]:
    if s.real_special_ids:
        return dict(REAL_SPECIAL_IDS)
    return {token: n_bpe + i for i, token in enumerate(REAL_SPECIAL_IDS)}


def write_tokenizer(folder: Path, s: Shapes) -> dict[str, int]:
    """tokenizer.json (byte-level BPE, o200k split, specials at their ids) + tokenizer_config.json."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4O_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=s.bpe_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(training_corpus(), trainer)
    data = json.loads(tok.to_str())
    n_bpe = len(data["model"]["vocab"])
    ids = special_ids(s, n_bpe)
    if max(ids.values()) >= s.vocab or min(ids.values()) < n_bpe:
        raise ValueError(f"special token ids {min(ids.values())}..{max(ids.values())} do not fit between "
                         f"the {n_bpe} BPE tokens and the {s.vocab} embedding rows")
    # Ids n_bpe..vocab-1 that are not specials stay unassigned: the converter pads them ([PAD{i}]).
    data["added_tokens"] = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for t, i in ids.items()]
    (folder / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    Tokenizer.from_file(str(folder / "tokenizer.json"))  # the tokenizers library accepts the sparse ids

    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer",
        "added_tokens_decoder": {str(i): {"content": t, "special": True} for t, i in ids.items()},
        "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "chat_template": PHI4_CHAT_TEMPLATE, "model_max_length": s.max_ctx,
    }, indent=2))
    return ids


# -- config ------------------------------------------------------------------------------------------

def write_config(folder: Path, s: Shapes, ids: dict[str, int]) -> None:
    """config.json of the original repository (model_type phi4mm), with these shapes."""
    n = s.n_rope_factors
    long_factor = LONG_FACTOR if n == len(LONG_FACTOR) else list(np.linspace(1.0, 8.0, n))
    eos = ids["<|endoftext|>"]
    config = {
        "architectures": ["Phi4MMForCausalLM"], "model_type": "phi4mm",
        "vocab_size": s.vocab, "hidden_size": s.hidden, "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers, "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "rope_theta": 10000.0, "partial_rotary_factor": s.partial_rotary,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0] * n, "long_factor": [float(x) for x in long_factor]},
        "max_position_embeddings": s.max_ctx, "original_max_position_embeddings": s.original_ctx,
        "tie_word_embeddings": True, "sliding_window": 262144, "bos_token_id": eos, "eos_token_id": eos,
        "pad_token_id": eos, "torch_dtype": "bfloat16",
        "vision_lora": {"r": s.vision_rank, "lora_alpha": s.vision_alpha, "dp": 0.0,
                        "layer": "layers.*((self_attn\\.(qkv_proj|o_proj))|(mlp\\.(gate_up|down)_proj))"},
        "speech_lora": {"r": s.speech_rank, "lora_alpha": s.speech_alpha, "dp": 0.01,
                        "layer": "((layers.*self_attn\\.(qkv|o)_proj)|(layers.*mlp\\.(gate_up|down)_proj))"},
        "audio_processor": {"name": "cascades", "config": {
            "attention_dim": s.a_hidden, "attention_heads": s.a_heads, "num_blocks": s.a_blocks,
            "linear_units": s.a_intermediate, "input_size": s.a_input_size, "time_reduction": s.a_time_reduction,
            "kernel_size": 3, "ext_pw_kernel_size": 1, "ext_pw_out_channel": s.a_hidden,
            "depthwise_seperable_out_channel": s.a_hidden, "depthwise_multiplier": 1, "input_layer": "nemo_conv",
            "nemo_conv_settings": {"conv_channels": s.a_conv_channels},
            "relative_attention_bias_args": {"type": "t5", "t5_bias_max_distance": s.a_bias_max_distance},
            "activation": "swish", "conv_activation": "swish", "conv_glu_type": "swish", "causal": True,
            "batch_norm": False, "bias_in_glu": True, "chunk_size": -1, "left_chunk": 18, "dropout_rate": 0.0,
            "encoder_embedding_config": {"input_size": s.a_input_size},
        }},
        "embd_layer": {"embedding_cls": "image_audio",
                       "image_embd_layer": {"crop_size": s.v_crop, "use_hd_transform": True,
                                            "with_learnable_separator": True, "hd_transform_order": "sub_glb",
                                            "image_token_compression_cls": "avg_pool_2d", "projection_cls": "mlp"},
                       "audio_embd_layer": {"compression_rate": s.a_time_reduction, "downsample_rate": 1,
                                            "projection_cls": "mlp"}},
        "img_processor": None,
    }
    if s.v_hidden != REAL.v_hidden:
        # The real file implies SigLIP-so400m's 16 heads; a smaller tower must say its own.
        config["vision_config"] = {"num_attention_heads": s.v_heads}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


# -- all of it ---------------------------------------------------------------------------------------

def tag(s: Shapes) -> str:
    """"real", "tiny", or e.g. "real-8l" for fewer layers than the named shapes have."""
    base = REAL if s.name == REAL.name else TINY
    return s.name if s.layers == base.layers else f"{s.name}-{s.layers}l"


def default_folder(s: Shapes) -> Path:
    return CACHE / f"checkpoint-{tag(s)}"


def make_checkpoint(out: Path, s: Shapes, seed: int = 0, progress: bool = True) -> Path:
    """Write the whole checkpoint folder; `config.json` last, so its presence means complete."""
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").unlink(missing_ok=True)
    t0 = time.perf_counter()
    ids = write_tokenizer(out, s)
    specs = all_specs(s)
    if progress:
        n_dec = sum(x.size for x in decoder_specs(s) if ".lora_" not in x.name)
        print(f"writing {out}: {sum(x.size for x in specs) / 1e9:.2f}B parameters "
              f"({n_dec / 1e9:.2f}B decoder), bf16", flush=True)
    write_weights(out, specs, seed, progress=progress)
    write_config(out, s, ids)
    if progress:
        print(f"done in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a random-weight Phi-4-multimodal checkpoint "
                                                 "(original remote-code layout) for benchmarks.")
    parser.add_argument("out", nargs="?", help=f"output folder (default {CACHE}/checkpoint-real or -tiny)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny shapes instead of the real ones")
    parser.add_argument("--layers", type=int, help="decoder layers (default: 32, or 2 with --tiny)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shapes = TINY if args.tiny else REAL
    if args.layers:
        shapes = replace(shapes, layers=args.layers)
    make_checkpoint(Path(args.out) if args.out else default_folder(shapes), shapes, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
