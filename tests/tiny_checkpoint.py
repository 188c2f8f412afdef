"""Build tiny random Phi-4-multimodal checkpoints with transformers + peft, in both layouts.

`build_reference(...)` returns the in-memory reference (a PEFT-wrapped
`Phi4MultimodalForCausalLM` with "vision" and "speech" adapters, and its tokenizer);
`save_native` / `save_remote_code` write it to disk the way the Hub ships each layout
(docs/model.md, "Checkpoint layouts"). Weights are scaled so that logits are far from uniform,
LoRA B is non-zero, rope factors are not all 1 and rotary is partial.
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from convert.safetensors_file import save_safetensors

O200K_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

PHI4_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] "
    "is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + "
    "'<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)

# In the real vocabulary these follow o200k's 199998 byte-level BPE tokens (docs/model.md, "Decoder").
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|endoftext10|>", "<|endoftext11|>", "<|endofprompt|>", "<|assistant|>", "<|end|>",
    "<|user|>", "<|system|>", "<|tool|>", "<|/tool|>", "<|tool_call|>", "<|/tool_call|>", "<|tool_response|>",
    "<|tag|>",
]

TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. What is the capital of France? Paris is the capital of France.
Describe the image. Transcribe the audio clip into text. Hello, how are you today? I am fine, thank you!
Numbers like 12345 and 3.14159 appear in text; so do symbols: + - * / = ( ) [ ] { } < > @ # $ % & _ ~.
A local assistant reads text, images and speech. It answers questions, calls tools and keeps notes.
The weather in London is rainy, while Madrid is sunny and warm. Tell me a story about a small robot.
"""

LORA_TARGETS = r"model\.layers\.\d+\.((self_attn\.(qkv|o)_proj)|(mlp\.(gate_up|down)_proj))"


@dataclass
class TinyShapes:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 96
    vocab: int = 512           # BPE tokens + specials, padded like the real 200064
    bpe_vocab: int = 400
    original_ctx: int = 256    # small (llama.cpp pads contexts to 256), so tests cross into the long factors
    max_ctx: int = 1024
    partial_rotary: float = 0.75
    vision_rank: int = 8
    vision_alpha: int = 16     # alpha / r = 2, as the real adapters
    speech_rank: int = 12
    speech_alpha: int = 24


@dataclass
class Reference:
    model: object        # peft.PeftModel wrapping Phi4MultimodalForCausalLM
    tokenizer: object    # transformers fast tokenizer
    shapes: TinyShapes


def build_tokenizer(shapes: TinyShapes):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(O200K_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=shapes.bpe_vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([TRAINING_TEXT] * 4, trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", chat_template=PHI4_CHAT_TEMPLATE)


def _config(shapes: TinyShapes, tokenizer, seed: int):
    from transformers import Phi4MultimodalConfig

    rng = np.random.default_rng(seed)
    head_dim = shapes.hidden // shapes.heads
    n_factors = int(head_dim * shapes.partial_rotary) // 2
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return Phi4MultimodalConfig(
        vocab_size=shapes.vocab, hidden_size=shapes.hidden, intermediate_size=shapes.intermediate,
        num_hidden_layers=shapes.layers, num_attention_heads=shapes.heads, num_key_value_heads=shapes.kv_heads,
        max_position_embeddings=shapes.max_ctx, original_max_position_embeddings=shapes.original_ctx,
        rope_parameters={
            "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": shapes.partial_rotary,
            "original_max_position_embeddings": shapes.original_ctx,
            "short_factor": [float(x) for x in rng.uniform(1.0, 1.5, n_factors)],
            "long_factor": [float(x) for x in np.sort(rng.uniform(1.0, 8.0, n_factors))],
        },
        tie_word_embeddings=True, sliding_window=None,
        bos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"],
        eos_token_id=[ids["<|endoftext|>"], ids["<|end|>"]],
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2,
                           image_token_id=ids["<|endoftext10|>"]),
        audio_config=dict(hidden_size=32, intermediate_size=48, num_blocks=2, num_attention_heads=2,
                          nemo_conv_channels=16, ext_pw_out_channel=32, depthwise_separable_out_channel=32,
                          bias_max_distance=20, audio_token_id=ids["<|endoftext11|>"]),
    )


def build_reference(shapes: TinyShapes | None = None, seed: int = 0) -> Reference:
    import peft
    from transformers import Phi4MultimodalForCausalLM

    shapes = shapes or TinyShapes()
    tokenizer = build_tokenizer(shapes)
    torch.manual_seed(seed)
    # Eager attention: with SDPA the vision tower silently turns causal on unpadded crops
    # (docs/model.md, "transformers as the reference").
    model = Phi4MultimodalForCausalLM._from_config(_config(shapes, tokenizer, seed), attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or "layer_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p)) if p.ndim == 1 else None
            elif p.ndim >= 2:
                fan_in = p.shape[1] if p.ndim == 2 else int(np.prod(p.shape[1:]))
                p.copy_(torch.randn_like(p) * (1.5 if "embed_tokens.weight" in name else 1.0) / np.sqrt(fan_in))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    for adapter, r, alpha in (("vision", shapes.vision_rank, shapes.vision_alpha),
                              ("speech", shapes.speech_rank, shapes.speech_alpha)):
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=LORA_TARGETS, lora_dropout=0.0)
        if isinstance(model, peft.PeftModel):
            model.add_adapter(adapter, cfg)
        else:
            model = peft.get_peft_model(model, cfg, adapter_name=adapter)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * (0.5 / np.sqrt(p.shape[1])))
    model.eval()
    return Reference(model=model, tokenizer=tokenizer, shapes=shapes)


def _base_state(ref: Reference) -> dict[str, np.ndarray]:
    """The base model's weights under transformers-native names (no LoRA)."""
    base = ref.model.get_base_model()
    out = {}
    for name, t in base.state_dict().items():
        if "lora_" in name:
            continue
        out[name.replace(".base_layer.", ".")] = t.detach().float().numpy()
    if base.config.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _lora_state(ref: Reference, adapter: str) -> dict[str, np.ndarray]:
    """PEFT adapter tensors as `save_pretrained` names them (adapter name removed)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(ref.model, adapter_name=adapter)
    return {k: v.detach().float().numpy() for k, v in state.items()}


def save_native(ref: Reference, folder: Path) -> Path:
    """transformers-native layout: base model + PEFT adapters in vision-lora/ and speech-lora/."""
    folder = Path(folder)
    base = ref.model.get_base_model()
    base.config.save_pretrained(folder)
    save_safetensors(folder / "model.safetensors", _base_state(ref))
    ref.tokenizer.save_pretrained(folder)
    for adapter in ("vision", "speech"):
        sub = folder / f"{adapter}-lora"
        sub.mkdir(parents=True, exist_ok=True)
        save_safetensors(sub / "adapter_model.safetensors", _lora_state(ref, adapter))
        cfg = ref.model.peft_config[adapter]
        (sub / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": 0.0,
            "target_modules": LORA_TARGETS, "use_rslora": False, "bias": "none", "task_type": "CAUSAL_LM",
        }, indent=2))
    return folder


# Native -> original names (docs/model.md, "Checkpoint layouts"; read right to left).
_TO_REMOTE = [
    (r"(audio_embed\.encoder\.encoders\.\d+\.feed_forward_(in|out))\.gate_up_proj", r"\1.net.0.linear"),
    (r"(audio_embed\.encoder\.encoders\.\d+\.feed_forward_(in|out))\.down_proj", r"\1.net.2"),
    (r"(audio_embed\.encoder\.encoders\.\d+\.self_attn)\.(q|k|v)_proj", r"\1.linear_\2"),
    (r"(audio_embed\.encoder\.encoders\.\d+\.self_attn)\.o_proj", r"\1.linear_out"),
    (r"image_embed\.img_projection_up", "image_embed.img_projection.0"),
    (r"image_embed\.img_projection_down", "image_embed.img_projection.2"),
    (r"image_embed\.global_img_feature_extensor", "image_embed.glb_GN"),
    (r"image_embed\.sub_img_feature_extensor", "image_embed.sub_GN"),
    (r"audio_embed\.up_proj_for_speech", "audio_embed.audio_projection.speech.0"),
    (r"audio_embed\.down_proj_for_speech", "audio_embed.audio_projection.speech.2"),
    (r"audio_embed\.up_proj_for_vision_speech", "audio_embed.audio_projection.vision.0"),
    (r"audio_embed\.down_proj_for_vision_speech", "audio_embed.audio_projection.vision.2"),
]


def save_remote_code(ref: Reference, folder: Path) -> Path:
    """Original remote-code layout: both LoRAs inside the sharded base safetensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base = ref.model.get_base_model()
    state = {}
    lm_linear = re.compile(LORA_TARGETS + r"\.weight$")
    for name, array in _base_state(ref).items():
        if lm_linear.match(name):
            name = name[: -len(".weight")] + ".base_layer.weight"
        for pattern, repl in _TO_REMOTE:
            name = re.sub(pattern, repl, name)
        state[name] = array
    for adapter in ("vision", "speech"):
        for name, array in _lora_state(ref, adapter).items():
            name = name.removeprefix("base_model.model.")
            name = re.sub(r"\.lora_(A|B)\.weight$", rf".lora_\1.{adapter}.weight", name)
            state[name] = array
    names = sorted(state)
    half = len(names) // 2
    index = {}
    for i, part in enumerate((names[:half], names[half:])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        save_safetensors(folder / shard, {n: state[n] for n in part})
        index.update({n: shard for n in part})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))

    cfg = base.config
    rope = cfg.rope_parameters
    audio, vision = cfg.audio_config, cfg.vision_config
    peft_cfg = ref.model.peft_config
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Phi4MMForCausalLM"], "model_type": "phi4mm",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_act": "silu", "rope_theta": rope["rope_theta"], "partial_rotary_factor": rope["partial_rotary_factor"],
        "rope_scaling": {"type": "longrope", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]},
        "max_position_embeddings": cfg.max_position_embeddings,
        "original_max_position_embeddings": cfg.original_max_position_embeddings,
        "tie_word_embeddings": True, "sliding_window": None, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.bos_token_id, "pad_token_id": cfg.pad_token_id, "torch_dtype": "float32",
        "vision_lora": {"r": peft_cfg["vision"].r, "lora_alpha": peft_cfg["vision"].lora_alpha, "dp": 0.0,
                        "layer": "layers.*((self_attn\\.(qkv_proj|o_proj))|(mlp\\.(gate_up|down)_proj))"},
        "speech_lora": {"r": peft_cfg["speech"].r, "lora_alpha": peft_cfg["speech"].lora_alpha, "dp": 0.01,
                        "layer": "((layers.*self_attn\\.(qkv|o)_proj)|(layers.*mlp\\.(gate_up|down)_proj))"},
        "audio_processor": {"name": "cascades", "config": {
            "attention_dim": audio.hidden_size, "attention_heads": audio.num_attention_heads,
            "num_blocks": audio.num_blocks, "linear_units": audio.intermediate_size, "input_size": audio.input_size,
            "time_reduction": audio.time_reduction, "kernel_size": audio.kernel_size,
            "ext_pw_out_channel": audio.ext_pw_out_channel,
            "depthwise_seperable_out_channel": audio.depthwise_separable_out_channel,
            "depthwise_multiplier": audio.depthwise_multiplier, "input_layer": "nemo_conv",
            "nemo_conv_settings": {"conv_channels": audio.nemo_conv_channels},
            "relative_attention_bias_args": {"type": "t5", "t5_bias_max_distance": audio.bias_max_distance},
            "activation": "swish", "conv_activation": "swish", "conv_glu_type": "swish", "causal": True,
            "chunk_size": -1, "left_chunk": 18, "dropout_rate": 0.0,
        }},
        "embd_layer": {"embedding_cls": "image_audio",
                       "image_embd_layer": {"crop_size": vision.crop_size, "use_hd_transform": True,
                                            "with_learnable_separator": True, "hd_transform_order": "sub_glb",
                                            "image_token_compression_cls": "avg_pool_2d", "projection_cls": "mlp"},
                       "audio_embd_layer": {"compression_rate": 8, "downsample_rate": 1, "projection_cls": "mlp"}},
        "img_processor": None,
        # Not in the real file (SigLIP-so400m's 16 heads are implied there); the tiny tower says its own.
        "vision_config": {"num_attention_heads": vision.num_attention_heads},
    }, indent=2))

    # Older tokenizer files: the chat template and added tokens inside tokenizer_config.json.
    tmp = folder / "_tok"
    ref.tokenizer.save_pretrained(tmp)
    shutil.copy(tmp / "tokenizer.json", folder / "tokenizer.json")
    added = {str(ref.tokenizer.convert_tokens_to_ids(t)): {"content": t, "special": True} for t in SPECIAL_TOKENS}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "added_tokens_decoder": added, "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "chat_template": PHI4_CHAT_TEMPLATE,
        "model_max_length": cfg.max_position_embeddings,
    }, indent=2))
    shutil.rmtree(tmp)
    return folder
