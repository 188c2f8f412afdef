"""The checkpoint's tokenizer -> GGUF vocabulary keys (byte-level BPE, "gpt2" model in llama.cpp).

Follows llama.cpp's `_set_vocab_gpt2`: the vocabulary is padded to the model's row count
with unused `[PAD{id}]` tokens; added tokens are CONTROL when special, USER_DEFINED
otherwise. The pre-tokenizer is recognised from tokenizer.json's split regex.

Also the image and audio placeholder tokens (`read_placeholders`): their ids come from the
checkpoint's config and tokenizer, never from a fixed spelling.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf

from convert.checkpoint import Checkpoint, CheckpointError
from model.format import AUDIO, IMAGE, Placeholder

# o200k's split regex (Xenova/gpt-4o tokenizer.json; llama.cpp LLAMA_VOCAB_PRE_TYPE_GPT4O).
GPT4O_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KNOWN_PRE_TOKENIZERS = {GPT4O_PATTERN: "gpt-4o"}

# The remote-code checkpoint's processor code spells the placeholders so, and its config holds no
# token ids. (They are also the tokens at transformers' default ids, 200010 and 200011.)
REMOTE_CODE_PLACEHOLDERS = {IMAGE: "<|endoftext10|>", AUDIO: "<|endoftext11|>"}


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    ids: dict[str, int]          # token text -> id, for the special tokens the app needs
    chat_template: str | None


def _split_patterns(pre_tokenizer: dict | None) -> list[str]:
    if not pre_tokenizer:
        return []
    if pre_tokenizer.get("type") == "Sequence":
        return [p for sub in pre_tokenizer["pretokenizers"] for p in _split_patterns(sub)]
    if pre_tokenizer.get("type") == "Split":
        pattern = pre_tokenizer.get("pattern") or {}
        return [pattern.get("Regex") or pattern.get("String") or ""]
    return []


def read_chat_template(folder: Path) -> str | None:
    """transformers 5 writes chat_template.jinja; older checkpoints keep it in tokenizer_config.json."""
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").exists():
        return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.exists():
        template = json.loads(cfg_path.read_text()).get("chat_template")
        if isinstance(template, list):  # named templates: take the default
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template
    return None


def read_vocab(folder: Path, vocab_size: int) -> Vocab:
    path = folder / "tokenizer.json"
    if not path.exists():
        raise CheckpointError(f"no tokenizer.json in {folder}")
    tok = json.loads(path.read_text())
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise CheckpointError(f"tokenizer.json model is {model.get('type')!r}; expected byte-level BPE")
    patterns = _split_patterns(tok.get("pre_tokenizer"))
    pre = next((KNOWN_PRE_TOKENIZERS[p] for p in patterns if p in KNOWN_PRE_TOKENIZERS), None)
    if pre is None:
        raise CheckpointError("unknown pre-tokenizer in tokenizer.json (expected o200k / gpt-4o, as Phi-4 uses)")

    by_id: dict[int, str] = {int(i): t for t, i in model["vocab"].items()}
    special: set[int] = set()
    added_ids: set[int] = set()
    for added in tok.get("added_tokens", []):
        by_id[int(added["id"])] = added["content"]
        added_ids.add(int(added["id"]))
        if added.get("special"):
            special.add(int(added["id"]))
    if max(by_id) >= vocab_size:
        raise CheckpointError(f"tokenizer has token id {max(by_id)} but the model has only {vocab_size} rows")

    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in special:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL)
        elif i in added_ids:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)

    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {t: i for i, t in enumerate(tokens) if types[i] == gguf.TokenType.CONTROL}
    return Vocab(tokens=tokens, types=types, merges=merges, pre=pre, ids=ids, chat_template=read_chat_template(folder))


def add_vocab(writer: gguf.GGUFWriter, vocab: Vocab, bos: int, eos: int, pad: int | None) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    if pad is not None:
        writer.add_pad_token_id(pad)
    if "<|end|>" in vocab.ids:
        writer.add_eot_token_id(vocab.ids["<|end|>"])
    # Phi-4's template starts with a role tag, never a BOS.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def declared_special_tokens(folder: Path) -> dict[str, str]:
    """The named special tokens tokenizer_config.json declares, e.g. `image_token` -> `<|image|>`.

    transformers 5 writes them as top-level keys; 4.x under `extra_special_tokens` when that is a
    mapping (in 5 it is a plain list) or `model_specific_special_tokens`.
    """
    path = folder / "tokenizer_config.json"
    if not path.exists():
        return {}
    cfg = json.loads(path.read_text())
    named = dict(cfg)
    for group in ("extra_special_tokens", "model_specific_special_tokens"):
        if isinstance(cfg.get(group), dict):
            named.update(cfg[group])
    # A token is written either as its text or as an AddedToken object.
    texts = {key: value.get("content") if isinstance(value, dict) else value for key, value in named.items()}
    return {key: text for key, text in texts.items() if key.endswith("_token") and isinstance(text, str)}


def read_placeholders(ckpt: Checkpoint, vocab: Vocab) -> dict[str, Placeholder]:
    """The image and audio placeholder tokens, id and spelling, where transformers finds them.

    The id is the config's `vision_config.image_token_id` / `audio_config.audio_token_id` (what the
    model reads); the spelling is the tokenizer's declared `image_token` / `audio_token` (what the
    processor writes). Either one gives the other through the vocabulary, and when both are given
    they must agree. A checkpoint that gives neither (the remote-code layout) uses the spellings
    of its processor code.
    """
    declared = declared_special_tokens(ckpt.folder)
    sub_configs = {IMAGE: ckpt.vision_config(), AUDIO: ckpt.audio_config()}
    placeholders = {}
    for kind in (IMAGE, AUDIO):
        id_key, token_key = f"{kind}_token_id", f"{kind}_token"
        token_id, spelling = sub_configs[kind].get(id_key), declared.get(token_key)
        if token_id is None:
            spelling = spelling or REMOTE_CODE_PLACEHOLDERS[kind]
            # A placeholder is an added token (one piece, never split by BPE), and added tokens are unique.
            added = (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)
            token_id = next((i for i, (text, type_) in enumerate(zip(vocab.tokens, vocab.types))
                             if text == spelling and type_ in added), None)
            if token_id is None:
                raise CheckpointError(f"the tokenizer has no {spelling} token ({kind} placeholder)")
        token_id = int(token_id)
        if not 0 <= token_id < len(vocab.tokens) or vocab.types[token_id] == gguf.TokenType.UNUSED:
            raise CheckpointError(f"{id_key} {token_id} ({kind} placeholder) is not a token of the tokenizer")
        if spelling is not None and vocab.tokens[token_id] != spelling:
            raise CheckpointError(f"{id_key} is {token_id}, which the tokenizer spells {vocab.tokens[token_id]}, "
                                  f"but tokenizer_config.json declares {token_key} {spelling}")
        placeholders[kind] = Placeholder(token=vocab.tokens[token_id], id=token_id)
    return placeholders
