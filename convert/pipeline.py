"""Checkpoint folder -> a model folder the app loads: GGUF files + manifest.json.

    backbone.gguf         Phi-4-mini decoder (llama.cpp `phi3`)
    lora-vision.gguf      vision LoRA (llama.cpp adapter)
    lora-speech.gguf      speech LoRA
    vision-encoder.gguf   SigLIP tower + projector (numpy, model/)
    audio-encoder.gguf    conformer + projectors (numpy, model/)
    manifest.json         what is here; written last, so its presence means "complete"
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from convert.audio_encoder import write_audio_encoder
from convert.backbone import write_backbone
from convert.checkpoint import IMAGE_PREFIX, AUDIO_PREFIX, Checkpoint, CheckpointError
from convert.lora import write_lora
from convert.quantize import FTYPES, quantize
from convert.tokenizer import AUDIO_TOKEN, IMAGE_TOKEN, read_vocab
from convert.vision_encoder import write_vision_encoder

OUTTYPES = ("f32", "f16", "q8_0", "q4_k_m")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def _say(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, flush=True)


def _encoder_tensors(ckpt: Checkpoint, prefix: str) -> dict:
    """Native names under `prefix`, prefix stripped -> (shape, loader): loaded one at a time while writing."""
    return {name[len(prefix):]: (ckpt.shape(name), lambda name=name: ckpt.load(name))
            for name in ckpt.names_with_prefix(prefix)}


def _processor_config(folder: Path) -> dict | None:
    """Image preprocessing settings (dynamic_hd, mean, std): preprocessor_config.json in the original
    repository, processor_config.json from transformers 5; None means the model's defaults."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        if (folder / name).exists():
            return json.loads((folder / name).read_text())
    return None


def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, outtype: str = "q4_k_m",
                       quiet: bool = False) -> dict:
    """Convert everything; return the manifest. Raises CheckpointError with a clear message on bad input."""
    if outtype not in OUTTYPES:
        raise CheckpointError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    ckpt = Checkpoint.open(src)
    _say(f"found a Phi-4-multimodal checkpoint in the {ckpt.layout} layout: {ckpt.folder}", quiet)
    vocab = read_vocab(ckpt.folder, ckpt.text.vocab_size)
    token_ids = {}
    for kind, token in (("image", IMAGE_TOKEN), ("audio", AUDIO_TOKEN)):
        if token not in vocab.ids:
            raise CheckpointError(f"the tokenizer has no {token} token ({kind} placeholder)")
        token_ids[kind] = {"token": token, "id": vocab.ids[token]}
    adapters = {name: ckpt.lora(name) for name in ("vision", "speech")}  # validated before any writing

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # the folder is incomplete until the manifest is back

    float_type = outtype if outtype in ("f32", "f16") else "f16"
    lora_type = outtype if outtype in ("f32", "f16") else "q8_0"
    files: dict[str, object] = {"backbone": "backbone.gguf", "lora": {}}
    if outtype in FTYPES:
        staged = out / "backbone.f16.gguf.partial"
        try:
            _say(f"writing the decoder (f16, then {outtype} with llama.cpp's quantiser)", quiet)
            write_backbone(ckpt, vocab, staged, float_type, progress=not quiet)
            quantize(staged, out / "backbone.gguf", outtype)
        finally:
            staged.unlink(missing_ok=True)
    else:
        _say(f"writing the decoder ({outtype})", quiet)
        write_backbone(ckpt, vocab, out / "backbone.gguf", outtype, progress=not quiet)
    for name, adapter in adapters.items():
        _say(f"writing the {name} LoRA (r={adapter.rank}, alpha={adapter.alpha:g}, {lora_type})", quiet)
        files["lora"][name] = f"lora-{name}.gguf"
        write_lora(adapter, out / f"lora-{name}.gguf", lora_type, progress=not quiet)

    encoder_type = "f32" if outtype == "f32" else "f16"  # numpy runs encoders in f32 either way
    _say(f"writing the vision encoder ({encoder_type})", quiet)
    vision_config = {**ckpt.vision_config(), "image_token_id": token_ids["image"]["id"]}
    vision_tensors = _encoder_tensors(ckpt, IMAGE_PREFIX)
    write_vision_encoder({name: load for name, (shape, load) in vision_tensors.items()}, vision_config,
                         out / "vision-encoder.gguf", encoder_type,
                         shapes={name: shape for name, (shape, load) in vision_tensors.items()},
                         processor_config=_processor_config(ckpt.folder), progress=not quiet)
    files["vision_encoder"] = "vision-encoder.gguf"
    _say(f"writing the speech encoder ({encoder_type})", quiet)
    audio_config = {**ckpt.audio_config(), "audio_token_id": token_ids["audio"]["id"]}
    write_audio_encoder(_encoder_tensors(ckpt, AUDIO_PREFIX), audio_config, out / "audio-encoder.gguf",
                        encoder_type, progress=not quiet)
    files["audio_encoder"] = "audio-encoder.gguf"

    manifest = {
        "format": "phi4mm-local", "version": MANIFEST_VERSION, "source": str(ckpt.folder.resolve()),
        "layout": ckpt.layout, "outtype": outtype, "files": files, "placeholders": token_ids,
        "lora_alpha": {name: a.alpha for name, a in adapters.items()},
        "lora_rank": {name: a.rank for name, a in adapters.items()},
        "context": {"original": ckpt.text.original_max_position_embeddings,
                    "max": ckpt.text.max_position_embeddings},
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / MANIFEST)
    _say(f"done: {out}", quiet)
    return manifest
