"""Reference outputs from transformers for the tiny checkpoints (the ground truth of the tests)."""
from __future__ import annotations

import numpy as np
import torch


def _select(model, adapter: str | None):
    """PEFT: run with one adapter, or with all adapters disabled."""
    if adapter is None:
        return model.disable_adapter()
    model.set_adapter(adapter)
    return torch.no_grad()


def reference_logits(ref, input_ids: list[int], adapter: str | None, **inputs) -> np.ndarray:
    with torch.no_grad(), _select(ref.model, adapter):
        out = ref.model(input_ids=torch.tensor([input_ids]), **inputs)
    return out.logits[0, -1].float().numpy()


def reference_greedy(ref, input_ids: list[int], adapter: str | None, n: int, stop_ids=()) -> list[int]:
    """Greedy decoding with a full forward per step: each step sees the whole sequence, so the
    rope factors follow its length exactly as the reference's cache recomputation does."""
    ids, out = list(input_ids), []
    for _ in range(n):
        token = int(np.argmax(reference_logits(ref, ids, adapter)))
        if token in stop_ids:
            break
        out.append(token)
        ids.append(token)
    return out


def rel_err(ours: np.ndarray, theirs: np.ndarray) -> float:
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def chat_ids(ref, messages: list[dict]) -> list[int]:
    return list(ref.tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
