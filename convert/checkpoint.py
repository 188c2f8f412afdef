"""Open a Phi-4-multimodal checkpoint folder in either layout and present it one way.

Layouts (docs/model.md, "Checkpoint layouts"):
- "remote-code": microsoft/Phi-4-multimodal-instruct as published (model_type `phi4mm`).
  The LM linears are PEFT-wrapped in place: `...qkv_proj.base_layer.weight` plus
  `...qkv_proj.lora_A.vision.weight` etc., both adapters inside the base safetensors.
- "transformers": `Phi4MultimodalForCausalLM` (model_type `phi4_multimodal`) with PEFT
  adapters saved in `vision-lora/` and `speech-lora/`.

Everything is exposed under transformers-native names, so the writers downstream
know one naming scheme only.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from convert.safetensors_file import SafetensorsError, SafetensorsFolder

LAYOUT_REMOTE = "remote-code"
LAYOUT_NATIVE = "transformers"
ADAPTERS = ("vision", "speech")

# Original -> native names of the encoder parts (docs/model.md, "Checkpoint layouts"; transformers'
# conversion rules).
_REMOTE_TO_NATIVE = [
    (r"(audio_embed\.encoder\.encoders\.\d+\.feed_forward_(in|out))\.net\.0\.linear", r"\1.gate_up_proj"),
    (r"(audio_embed\.encoder\.encoders\.\d+\.feed_forward_(in|out))\.net\.2", r"\1.down_proj"),
    (r"(audio_embed\.encoder\.encoders\.\d+\.self_attn)\.linear_(q|k|v)", r"\1.\2_proj"),
    (r"(audio_embed\.encoder\.encoders\.\d+\.self_attn)\.linear_out", r"\1.o_proj"),
    (r"image_embed\.img_projection\.0", "image_embed.img_projection_up"),
    (r"image_embed\.img_projection\.2", "image_embed.img_projection_down"),
    (r"image_embed\.glb_GN", "image_embed.global_img_feature_extensor"),
    (r"image_embed\.sub_GN", "image_embed.sub_img_feature_extensor"),
    (r"audio_embed\.audio_projection\.speech\.0", "audio_embed.up_proj_for_speech"),
    (r"audio_embed\.audio_projection\.speech\.2", "audio_embed.down_proj_for_speech"),
    (r"audio_embed\.audio_projection\.vision\.0", "audio_embed.up_proj_for_vision_speech"),
    (r"audio_embed\.audio_projection\.vision\.2", "audio_embed.down_proj_for_vision_speech"),
]

LM_LORA_TARGET = re.compile(r"^model\.layers\.(\d+)\.(self_attn\.qkv_proj|self_attn\.o_proj|mlp\.gate_up_proj|mlp\.down_proj)$")
IMAGE_PREFIX = "model.embed_tokens_extend.image_embed."
AUDIO_PREFIX = "model.embed_tokens_extend.audio_embed."


class CheckpointError(ValueError):
    """The folder is not a checkpoint this converter can read; the message says why."""


@dataclass
class TextConfig:
    """The decoder's hyperparameters, read from either config format."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rotary_dim: int
    max_position_embeddings: int
    original_max_position_embeddings: int
    short_factor: list[float] | None
    long_factor: list[float] | None
    attention_factor: float
    sliding_window: int
    tie_word_embeddings: bool
    bos_token_id: int
    eos_token_ids: list[int]
    pad_token_id: int | None


@dataclass
class LoraAdapter:
    """One PEFT adapter on the LM: per target module (native name without `.weight`), A and B."""
    name: str
    rank: int
    alpha: float
    pairs: dict[str, tuple[Callable[[], np.ndarray], Callable[[], np.ndarray]]] = field(default_factory=dict)
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None


def _text_config(cfg: dict) -> TextConfig:
    def need(key: str):
        if key not in cfg:
            raise CheckpointError(f"config.json lacks {key!r}")
        return cfg[key]

    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    # Older configs keep rope under `rope_scaling` + top-level keys; transformers 5 under `rope_parameters`.
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type in ("su", "yarn"):
        rope_type = "longrope"
    partial = float(rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    theta = float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    max_pos = int(need("max_position_embeddings"))
    # The top-level value wins over the one inside rope_parameters, as in transformers
    # (docs/model.md, "transformers as the reference").
    orig = int(cfg.get("original_max_position_embeddings") or rope.get("original_max_position_embeddings") or max_pos)
    rotary_dim = int(head_dim * partial)
    short = long = None
    attention_factor = 1.0
    if rope_type == "longrope":
        short, long = rope.get("short_factor"), rope.get("long_factor")
        for name, factors in (("short_factor", short), ("long_factor", long)):
            if factors is None or len(factors) != rotary_dim // 2:
                raise CheckpointError(f"rope {name} must have {rotary_dim // 2} values (rotary dim {rotary_dim} / 2), "
                                      f"got {None if factors is None else len(factors)}")
        factor = float(rope.get("factor") or max_pos / orig)
        attention_factor = rope.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
    elif rope_type != "default":
        raise CheckpointError(f"unsupported rope type {rope_type!r} (expected longrope)")
    eos = cfg.get("eos_token_id", cfg.get("bos_token_id"))
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    return TextConfig(
        vocab_size=int(need("vocab_size")), hidden_size=hidden, intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")), num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads), head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)), rope_theta=theta, rotary_dim=rotary_dim,
        max_position_embeddings=max_pos, original_max_position_embeddings=orig,
        short_factor=[float(x) for x in short] if short else None,
        long_factor=[float(x) for x in long] if long else None,
        attention_factor=float(attention_factor), sliding_window=int(cfg.get("sliding_window") or 0),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        bos_token_id=int(cfg.get("bos_token_id", eos_ids[0])), eos_token_ids=eos_ids,
        pad_token_id=cfg.get("pad_token_id"),
    )


class Checkpoint:
    """A checkpoint folder, its layout, and its tensors under transformers-native names."""

    def __init__(self, folder: Path, layout: str, config: dict, weights: SafetensorsFolder):
        self.folder = folder
        self.layout = layout
        self.config = config
        self.text = _text_config(config)
        self._weights = weights
        self._native_to_stored: dict[str, str] = {}
        for stored in weights.names():
            native = self._native_name(stored)
            if native is not None:
                self._native_to_stored[native] = stored

    # -- opening --------------------------------------------------------------------------

    @classmethod
    def open(cls, folder: str | Path) -> "Checkpoint":
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is not a folder")
        if not (folder / "config.json").exists():
            raise CheckpointError(f"no config.json in {folder}: not a Hugging Face checkpoint folder")
        config = _read_json(folder / "config.json")
        model_type = config.get("model_type")
        try:
            weights = SafetensorsFolder(folder)
        except FileNotFoundError:
            raise CheckpointError(f"no *.safetensors weights in {folder} (is the download complete?)") from None
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from None
        names = weights.names()
        has_inline_lora = any(".lora_A.vision." in n for n in names)
        has_base_layer = any(".base_layer." in n for n in names)
        if model_type == "phi4mm" or (has_inline_lora and has_base_layer):
            if not (has_inline_lora and has_base_layer):
                raise CheckpointError(f"{folder}: model_type phi4mm but the weights have no `base_layer` / "
                                      f"`lora_A.vision` tensors; unknown layout")
            layout = LAYOUT_REMOTE
        elif model_type == "phi4_multimodal":
            missing = [f"{a}-lora" for a in ADAPTERS if not (folder / f"{a}-lora" / "adapter_config.json").exists()]
            if missing:
                raise CheckpointError(f"{folder}: transformers layout but {', '.join(missing)} "
                                      f"(adapter_config.json + adapter_model.safetensors) missing")
            layout = LAYOUT_NATIVE
        else:
            raise CheckpointError(f"{folder}: model_type {model_type!r} is not Phi-4-multimodal "
                                  f"(expected 'phi4mm' or 'phi4_multimodal')")
        return cls(folder, layout, config, weights)

    # -- names ----------------------------------------------------------------------------

    def _native_name(self, stored: str) -> str | None:
        """Stored name -> native name; None for tensors that are not base weights (LoRA)."""
        if "lora_" in stored:
            return None
        name = stored.replace(".base_layer.", ".")
        if self.layout == LAYOUT_REMOTE:
            for pattern, repl in _REMOTE_TO_NATIVE:
                name = re.sub(pattern, repl, name)
        return name

    def has(self, native: str) -> bool:
        return native in self._native_to_stored

    def shape(self, native: str) -> tuple[int, ...]:
        return self._weights.shape(self._require(native))

    def load(self, native: str) -> np.ndarray:
        return self._weights.load(self._require(native))

    def _require(self, native: str) -> str:
        if native not in self._native_to_stored:
            raise CheckpointError(f"tensor {native!r} is missing from {self.folder}")
        return self._native_to_stored[native]

    def names_with_prefix(self, prefix: str) -> list[str]:
        return [n for n in self._native_to_stored if n.startswith(prefix)]

    # -- adapters -------------------------------------------------------------------------

    def lora(self, name: str) -> LoraAdapter:
        if name not in ADAPTERS:
            raise CheckpointError(f"unknown adapter {name!r}; expected one of {ADAPTERS}")
        if self.layout == LAYOUT_REMOTE:
            cfg = self.config.get(f"{name}_lora") or {}
            if "r" not in cfg or "lora_alpha" not in cfg:
                raise CheckpointError(f"config.json lacks {name}_lora.r / {name}_lora.lora_alpha")
            rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
            weights, pattern = self._weights, re.compile(rf"^(.*)\.lora_([AB])\.{name}\.weight$")
        else:
            sub = self.folder / f"{name}-lora"
            cfg = _read_json(sub / "adapter_config.json")
            rank, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
            if cfg.get("use_rslora"):
                alpha = alpha * math.sqrt(rank)  # rsLoRA scales by alpha/sqrt(r); llama.cpp by alpha/r
            try:
                weights = SafetensorsFolder(sub)
            except FileNotFoundError:
                raise CheckpointError(f"{sub} has no adapter_model.safetensors") from None
            except SafetensorsError as e:
                raise CheckpointError(str(e)) from None
            pattern = re.compile(rf"^(?:base_model\.model\.)?(.*)\.lora_([AB])(?:\.{name})?\.weight$")
        adapter = LoraAdapter(name=name, rank=rank, alpha=alpha)
        found: dict[str, dict[str, str]] = {}
        for stored in weights.names():
            m = pattern.match(stored)
            if m is None:
                continue
            module, which = m.group(1), m.group(2)
            if not LM_LORA_TARGET.match(module):
                raise CheckpointError(f"{name} adapter targets {module!r}; only the decoder's qkv/o/gate_up/down "
                                      f"projections are supported")
            found.setdefault(module, {})[which] = stored
        if not found:
            raise CheckpointError(f"no LoRA tensors for the {name} adapter in {self.folder}")
        for module, ab in sorted(found.items()):
            if set(ab) != {"A", "B"}:
                raise CheckpointError(f"{name} adapter: {module} has lora_{''.join(ab)} but not both A and B")
            a_shape, b_shape = weights.shape(ab["A"]), weights.shape(ab["B"])
            base = self.shape(module + ".weight")
            if a_shape != (rank, base[1]) or b_shape != (base[0], rank):
                raise CheckpointError(f"{name} adapter: {module} has A {a_shape} and B {b_shape}; "
                                      f"expected A {(rank, base[1])} and B {(base[0], rank)} for r={rank}")
            adapter.pairs[module] = (lambda s=ab["A"]: weights.load(s), lambda s=ab["B"]: weights.load(s))
            adapter.shapes[module] = (a_shape, b_shape)
        return adapter

    # -- encoder configs ------------------------------------------------------------------

    def audio_config(self) -> dict:
        """The native `audio_config` dict (original configs are translated)."""
        if self.layout == LAYOUT_NATIVE:
            return dict(self.config.get("audio_config") or {})
        src = (self.config.get("audio_processor") or {}).get("config") or {}
        if not src:
            raise CheckpointError("config.json lacks audio_processor.config")
        bias = src.get("relative_attention_bias_args") or {}
        return {
            "hidden_size": src["attention_dim"], "num_attention_heads": src["attention_heads"],
            "num_blocks": src["num_blocks"], "intermediate_size": src["linear_units"],
            "input_size": src.get("input_size", 80), "time_reduction": src.get("time_reduction", 8),
            "kernel_size": src.get("kernel_size", 3), "ext_pw_out_channel": src.get("ext_pw_out_channel"),
            "depthwise_separable_out_channel": src.get("depthwise_seperable_out_channel"),
            "depthwise_multiplier": src.get("depthwise_multiplier", 1),
            "nemo_conv_channels": (src.get("nemo_conv_settings") or {}).get("conv_channels"),
            "bias_max_distance": bias.get("t5_bias_max_distance", 500),
            "bias_symmetric": bias.get("t5_bias_symmetric", False),
            "activation": src.get("activation", "swish"), "conv_activation": src.get("conv_activation", "swish"),
            "conv_glu_type": src.get("conv_glu_type", "swish"), "chunk_size": src.get("chunk_size", -1),
            "left_chunk": src.get("left_chunk", 18), "audio_token_id": None,
        }

    def vision_config(self) -> dict:
        """The native `vision_config` dict; original checkpoints hard-code SigLIP-so400m, so shapes are read."""
        if self.layout == LAYOUT_NATIVE:
            return dict(self.config.get("vision_config") or {})
        prefix = IMAGE_PREFIX + "img_processor."
        hidden = self.shape(prefix + "embeddings.patch_embedding.weight")[0]
        layers = {int(m.group(1)) for n in self.names_with_prefix(prefix + "encoder.layers.")
                  if (m := re.match(re.escape(prefix) + r"encoder\.layers\.(\d+)\.", n))}
        crop = ((self.config.get("embd_layer") or {}).get("image_embd_layer") or {}).get("crop_size", 448)
        # The original code builds SigLIP-so400m (16 heads) itself; a smaller tower must say its head count.
        heads = (self.config.get("vision_config") or {}).get("num_attention_heads") or (16 if hidden == 1152 else None)
        if heads is None:
            raise CheckpointError(f"vision tower of width {hidden} is not SigLIP-so400m; "
                                  f"config.json must give vision_config.num_attention_heads")
        return {
            "hidden_size": hidden, "intermediate_size": self.shape(prefix + "encoder.layers.0.mlp.fc1.weight")[0],
            "num_hidden_layers": len(layers), "num_attention_heads": int(heads),
            "patch_size": self.shape(prefix + "embeddings.patch_embedding.weight")[-1], "image_size": crop,
            "crop_size": crop, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "feature_layer": -2,
            "image_token_id": None,
        }
