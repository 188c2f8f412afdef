"""Checkpoint folder -> a model folder the app loads: GGUF files + manifest.json.

What the folder holds and every name in it are model/format.py's; this module decides what
goes into each file and in which storage type.

Converting over a folder that already holds a model never disables it. At every moment OUT is
the old complete model or the new complete one:

1. everything is written into a staging subfolder, OUT/.converting-<pid>, and checked there;
   the old files and manifest are not touched (a failure removes the staging folder);
2. manifest.json is replaced by one listing the staged files: OUT is now the new model;
3. each staged file is hard-linked (copied where links are not supported) over its final
   name, while the manifest still lists the staged names, which stay valid;
4. manifest.json is replaced by the final one, and the staging folder is removed.

A conversion killed at any point (SIGKILL included) leaves either the old model or the new one,
plus leftovers: staging folders of processes that are gone, `*.tmp` and `*.partial` files. The
next conversion into OUT removes them, except a staging folder the manifest still lists (killed
between 2 and 4), which goes once the new manifest no longer does.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from convert.audio_encoder import write_audio_encoder
from convert.backbone import write_backbone
from convert.checkpoint import ADAPTERS, AUDIO_PREFIX, IMAGE_PREFIX, Checkpoint, CheckpointError
from convert.lora import write_lora
from convert.quantize import FTYPES, quantize
from convert.tokenizer import read_placeholders, read_vocab
from convert.vision_encoder import write_vision_encoder
from model.format import (AUDIO, AUDIO_ENCODER_FILE, BACKBONE_FILE, DEFAULT_OUTTYPE, MANIFEST_FILE, OUTTYPES,
                          VISION_ENCODER_FILE, Arch, ManifestKey, check_gguf, lora_file, write_manifest)

STAGING_PREFIX = ".converting-"   # + the pid of the conversion writing into it


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


def encoder_storage(outtype: str) -> str:
    """How the encoders of an `outtype` conversion are stored (one of ENCODER_STORAGE_TYPES). numpy
    runs them in float32 either way; bf16 is the checkpoint's own type (exact), kept in memory and
    widened a matrix at a time: half the memory of float32."""
    return "f32" if outtype == "f32" else "bf16"


def convert_checkpoint(src: str | os.PathLike, out: str | os.PathLike, outtype: str = DEFAULT_OUTTYPE,
                       quiet: bool = False) -> dict:
    """Convert everything; return the manifest. Raises CheckpointError with a clear message on bad input.

    Over an existing model, the old one stays in place until the new one is complete (module docstring).
    """
    if outtype not in OUTTYPES:
        raise CheckpointError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} exists and is not a folder: give the folder to write the model into")
    ckpt = Checkpoint.open(src)
    _say(f"found a Phi-4-multimodal checkpoint in the {ckpt.layout} layout: {ckpt.folder}", quiet)
    vocab = read_vocab(ckpt.folder, ckpt.text.vocab_size)
    placeholders = read_placeholders(ckpt, vocab)
    adapters = {name: ckpt.lora(name) for name in ADAPTERS}  # validated before any writing

    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise CheckpointError(f"cannot create the folder {out}: a file is in the way") from None
    with _locked(out):
        _remove_leftovers(out)
        stage = out / f"{STAGING_PREFIX}{os.getpid()}"
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir()
        try:
            _write_files(ckpt, vocab, placeholders, adapters, stage, outtype, quiet)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            if created:
                with contextlib.suppress(OSError):
                    out.rmdir()   # only if still empty
            raise
        manifest = _swap_in(stage, out, dict(
            source=str(ckpt.folder.resolve()), layout=ckpt.layout, outtype=outtype, placeholders=placeholders,
            lora_alpha={name: a.alpha for name, a in adapters.items()},
            lora_rank={name: a.rank for name, a in adapters.items()},
            original_context=ckpt.text.original_max_position_embeddings,
            max_context=ckpt.text.max_position_embeddings))
        _remove_leftovers(out)
    _say(f"done: {out}", quiet)
    return manifest


def _write_files(ckpt: Checkpoint, vocab, placeholders: dict, adapters: dict, folder: Path, outtype: str,
                 quiet: bool) -> None:
    """Write every GGUF of the conversion into `folder` and check each one's header."""
    # Storage per file: quantised decoders are made by llama.cpp from an f16 one; their LoRAs are q8_0.
    float_type = outtype if outtype in ("f32", "f16") else "f16"
    lora_type = outtype if outtype in ("f32", "f16") else "q8_0"
    if outtype in FTYPES:
        staged = folder / (Path(BACKBONE_FILE).stem + ".f16.gguf.partial")
        try:
            _say(f"writing the decoder (f16, then {outtype} with llama.cpp's quantiser)", quiet)
            write_backbone(ckpt, vocab, staged, float_type, progress=not quiet)
            quantize(staged, folder / BACKBONE_FILE, outtype)
        finally:
            staged.unlink(missing_ok=True)
    else:
        _say(f"writing the decoder ({outtype})", quiet)
        write_backbone(ckpt, vocab, folder / BACKBONE_FILE, outtype, progress=not quiet)
    for name, adapter in adapters.items():
        _say(f"writing the {name} LoRA (r={adapter.rank}, alpha={adapter.alpha:g}, {lora_type})", quiet)
        write_lora(adapter, folder / lora_file(name), lora_type, progress=not quiet)

    encoder_type = encoder_storage(outtype)
    _say(f"writing the vision encoder ({encoder_type})", quiet)
    vision_tensors = _encoder_tensors(ckpt, IMAGE_PREFIX)
    write_vision_encoder({name: load for name, (shape, load) in vision_tensors.items()}, ckpt.vision_config(),
                         folder / VISION_ENCODER_FILE, encoder_type,
                         shapes={name: shape for name, (shape, load) in vision_tensors.items()},
                         processor_config=_processor_config(ckpt.folder), progress=not quiet)
    _say(f"writing the speech encoder ({encoder_type})", quiet)
    audio_config = {**ckpt.audio_config(), "audio_token_id": placeholders[AUDIO].id}
    write_audio_encoder(_encoder_tensors(ckpt, AUDIO_PREFIX), audio_config, folder / AUDIO_ENCODER_FILE,
                        encoder_type, progress=not quiet)

    # What the app will check before loading, checked before the old model is replaced.
    check_gguf(folder / BACKBONE_FILE, Arch.DECODER)
    for name in adapters:
        check_gguf(folder / lora_file(name), Arch.DECODER, adapter=True)
    check_gguf(folder / VISION_ENCODER_FILE, Arch.VISION)
    check_gguf(folder / AUDIO_ENCODER_FILE, Arch.AUDIO)


def _swap_in(stage: Path, out: Path, manifest_fields: dict) -> dict:
    """Steps 2-4 of the module docstring: make the complete files in `stage` the model in `out`."""
    names = [BACKBONE_FILE, *(lora_file(name) for name in manifest_fields["lora_rank"]), VISION_ENCODER_FILE,
             AUDIO_ENCODER_FILE]
    write_manifest(out, **manifest_fields, under=stage.name)
    for name in names:
        _place(stage / name, out / name)
    manifest = write_manifest(out, **manifest_fields)
    shutil.rmtree(stage, ignore_errors=True)
    return manifest


def _place(src: Path, dst: Path) -> None:
    """`dst` becomes `src`'s content in one rename; `src` stays."""
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:   # a file system without hard links
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _alive(pid: int) -> bool:
    """Whether process `pid` may still be running (so its staging folder is left alone)."""
    if pid == os.getpid() or os.name != "posix":   # Windows' os.kill(pid, 0) would stop the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _listed_folders(out: Path) -> set[str]:
    """The subfolders that `out`'s manifest lists files in (a staging folder, when step 3 was cut short)."""
    try:
        files = json.loads((out / MANIFEST_FILE).read_text(encoding="utf-8")).get(ManifestKey.FILES) or {}
    except (OSError, ValueError, AttributeError):
        return set()
    names, folders = list(files.values()) if isinstance(files, dict) else [], set()
    while names:
        name = names.pop()
        if isinstance(name, dict):
            names.extend(name.values())
        elif isinstance(name, str) and "/" in name:
            folders.add(name.split("/", 1)[0])
    return folders


def _remove_leftovers(out: Path) -> None:
    """Remove what conversions cut short left in `out` (module docstring); never a live conversion's
    staging folder nor one the manifest lists."""
    listed = _listed_folders(out)
    for entry in out.iterdir():
        name = entry.name
        if name.startswith(STAGING_PREFIX) and entry.is_dir() and not entry.is_symlink():
            pid = name[len(STAGING_PREFIX):]
            if name not in listed and not (pid.isdigit() and _alive(int(pid))):
                shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_file() and (name == MANIFEST_FILE + ".tmp" or name.endswith((".gguf.tmp", ".gguf.partial"))):
            entry.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(out: Path):
    """One conversion at a time into `out` (an flock on the folder itself, so no lock file is left)."""
    try:
        import fcntl
    except ImportError:   # not POSIX: no lock
        yield
        return
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CheckpointError(f"another conversion is writing into {out}; wait for it to finish") from None
        yield
    finally:
        os.close(fd)
