"""The model store: default folder, download + convert through an injected hub, offline fallback.

Nothing here reaches the network: the hub is a fake, or the real client pointed at a closed
local port, or in offline mode.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.model_store import (
    DOWNLOAD_PATTERNS,
    FULL_MODEL_COMMAND,
    REPO_ID,
    HubUnreachable,
    HuggingFaceHub,
    ModelStore,
    ModelUnavailable,
    default_model_dir,
    fallback_model_path,
    human_size,
)


class FakeHub:
    def __init__(self, tmp: Path, size: int = 11_900_000_000, reachable: bool = True):
        self.tmp, self.size, self.reachable = tmp, size, reachable
        self.calls: list[str] = []

    def download_size(self, repo_id, patterns):
        self.calls.append("size")
        if not self.reachable:
            raise HubUnreachable("[Errno -3] Temporary failure in name resolution")
        assert repo_id == REPO_ID and patterns == DOWNLOAD_PATTERNS
        return self.size

    def download(self, repo_id, patterns):
        self.calls.append("download")
        folder = self.tmp / "hub-snapshot"
        folder.mkdir(exist_ok=True)
        return folder


def fake_convert(calls):
    def convert(src, out, outtype):
        calls.append(("convert", Path(src).name, outtype))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "manifest.json").write_text(json.dumps({"files": {}}))
    return convert


def test_default_folder_is_under_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_model_dir() == tmp_path / "phi4mm" / "models" / "phi-4-multimodal-instruct-q4_k_m"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/path")  # ignored, as the XDG spec says
    assert default_model_dir() == Path.home() / ".cache" / "phi4mm" / "models" / "phi-4-multimodal-instruct-q4_k_m"


def test_a_converted_folder_is_used_without_asking_the_hub(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "manifest.json").write_text("{}")
    hub = FakeHub(tmp_path, reachable=False)
    choice = ModelStore(tmp_path / "model", hub=hub, say=lambda m: None).resolve()
    assert choice.full and choice.path == tmp_path / "model" and choice.notice is None
    assert hub.calls == []


def test_missing_model_is_downloaded_size_first_then_converted(tmp_path):
    said, calls = [], []
    hub = FakeHub(tmp_path)
    store = ModelStore(tmp_path / "model", hub=hub, say=said.append, convert=fake_convert(calls))
    choice = store.resolve()
    assert choice.full and choice.path == tmp_path / "model" and store.is_ready()
    assert hub.calls == ["size", "download"]
    assert calls == [("convert", "hub-snapshot", "q4_k_m")]
    size_line = next(i for i, m in enumerate(said) if "11.9 GB" in m)
    assert size_line < len(said) - 1  # the size is told before the download and conversion
    assert store.resolve().path == tmp_path / "model" and hub.calls == ["size", "download"]  # ready now


def test_unreachable_hub_falls_back_to_the_small_model_with_one_clear_notice(tmp_path):
    said = []
    hub = FakeHub(tmp_path, reachable=False)
    choice = ModelStore(tmp_path / "model", hub=hub, say=said.append).resolve()
    assert not choice.full and choice.path == fallback_model_path() and choice.path.suffix == ".gguf"
    assert "cannot be reached" in choice.notice and FULL_MODEL_COMMAND in choice.notice
    assert "Temporary failure in name resolution" in choice.notice
    assert sum("cannot be reached" in m for m in said) == 1


def test_no_fallback_when_the_full_model_is_asked_for(tmp_path):
    store = ModelStore(tmp_path / "model", hub=FakeHub(tmp_path, reachable=False), say=lambda m: None)
    with pytest.raises(HubUnreachable):
        store.resolve(fallback=False)
    with pytest.raises(ModelUnavailable, match="launch.py --download"):
        store.resolve(download=False, fallback=False)


def test_download_false_never_touches_the_hub(tmp_path):
    hub = FakeHub(tmp_path)
    choice = ModelStore(tmp_path / "model", hub=hub, say=lambda m: None).resolve(download=False)
    assert not choice.full and hub.calls == []


@pytest.mark.parametrize("what", ["download_size", "download"])
def test_the_real_client_reports_a_closed_hub_as_unreachable(what):
    hub = HuggingFaceHub(endpoint="http://127.0.0.1:9")  # a closed local port: refused at once
    with pytest.raises(HubUnreachable):
        getattr(hub, what)(REPO_ID, DOWNLOAD_PATTERNS)


def test_the_real_client_in_offline_mode_is_unreachable(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnreachable, match="HF_HUB_OFFLINE"):
        HuggingFaceHub(endpoint="http://127.0.0.1:9").download_size(REPO_ID, DOWNLOAD_PATTERNS)


def test_human_size():
    assert [human_size(n) for n in (512, 1_234, 5_600_000, 11_940_000_000)] == ["512 B", "1.2 KB", "5.6 MB", "11.9 GB"]
