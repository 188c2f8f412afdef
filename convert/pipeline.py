"""Checkpoint folder -> a model folder the app loads: GGUF files + manifest.json.

What the folder holds and every name in it are model/format.py's; this module decides what
goes into each file and in which storage type.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from convert.audio_encoder import write_audio_encoder
from convert.backbone import write_backbone
from convert.checkpoint import ADAPTERS, AUDIO_PREFIX, IMAGE_PREFIX, Checkpoint, CheckpointError
from convert.lora import write_lora
from convert.quantize import FTYPES, quantize
from convert.tokenizer import read_placeholders, read_vocab
from convert.vision_encoder import write_vision_encoder
from model.format import (AUDIO, AUDIO_ENCODER_FILE, BACKBONE_FILE, DEFAULT_OUTTYPE, MANIFEST_FILE, OUTTYPES,
                          VISION_ENCODER_FILE, lora_file, write_manifest)


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


def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, outtype: str = DEFAULT_OUTTYPE,
                       quiet: bool = False) -> dict:
    """Convert everything; return the manifest. Raises CheckpointError with a clear message on bad input."""
    if outtype not in OUTTYPES:
        raise CheckpointError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    ckpt = Checkpoint.open(src)
    _say(f"found a Phi-4-multimodal checkpoint in the {ckpt.layout} layout: {ckpt.folder}", quiet)
    vocab = read_vocab(ckpt.folder, ckpt.text.vocab_size)
    placeholders = read_placeholders(ckpt, vocab)
    adapters = {name: ckpt.lora(name) for name in ADAPTERS}  # validated before any writing

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_FILE).unlink(missing_ok=True)  # the folder is incomplete until the manifest is back

    # Storage per file: quantised decoders are made by llama.cpp from an f16 one; their LoRAs are q8_0.
    float_type = outtype if outtype in ("f32", "f16") else "f16"
    lora_type = outtype if outtype in ("f32", "f16") else "q8_0"
    if outtype in FTYPES:
        staged = out / (Path(BACKBONE_FILE).stem + ".f16.gguf.partial")
        try:
            _say(f"writing the decoder (f16, then {outtype} with llama.cpp's quantiser)", quiet)
            write_backbone(ckpt, vocab, staged, float_type, progress=not quiet)
            quantize(staged, out / BACKBONE_FILE, outtype)
        finally:
            staged.unlink(missing_ok=True)
    else:
        _say(f"writing the decoder ({outtype})", quiet)
        write_backbone(ckpt, vocab, out / BACKBONE_FILE, outtype, progress=not quiet)
    for name, adapter in adapters.items():
        _say(f"writing the {name} LoRA (r={adapter.rank}, alpha={adapter.alpha:g}, {lora_type})", quiet)
        write_lora(adapter, out / lora_file(name), lora_type, progress=not quiet)

    encoder_type = "f32" if outtype == "f32" else "f16"  # numpy runs encoders in f32 either way
    _say(f"writing the vision encoder ({encoder_type})", quiet)
    vision_tensors = _encoder_tensors(ckpt, IMAGE_PREFIX)
    write_vision_encoder({name: load for name, (shape, load) in vision_tensors.items()}, ckpt.vision_config(),
                         out / VISION_ENCODER_FILE, encoder_type,
                         shapes={name: shape for name, (shape, load) in vision_tensors.items()},
                         processor_config=_processor_config(ckpt.folder), progress=not quiet)
    _say(f"writing the speech encoder ({encoder_type})", quiet)
    audio_config = {**ckpt.audio_config(), "audio_token_id": placeholders[AUDIO].id}
    write_audio_encoder(_encoder_tensors(ckpt, AUDIO_PREFIX), audio_config, out / AUDIO_ENCODER_FILE,
                        encoder_type, progress=not quiet)

    manifest = write_manifest(
        out, source=str(ckpt.folder.resolve()), layout=ckpt.layout, outtype=outtype, placeholders=placeholders,
        lora_alpha={name: a.alpha for name, a in adapters.items()},
        lora_rank={name: a.rank for name, a in adapters.items()},
        original_context=ckpt.text.original_max_position_embeddings, max_context=ckpt.text.max_position_embeddings)
    _say(f"done: {out}", quiet)
    return manifest
