"""Test-wide setup.

torchvision (a test-only need of the reference image processor) ships compiled ops that do
not load with the local CPU torch; importing it works once its op registrations are
skipped (docs/model.md, "transformers as the reference"). transformers imports torchvision
whenever it is installed, so this must happen before anything imports transformers.
"""
import importlib
import os
import sys
import types

import pytest

sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))


def in_ci() -> bool:
    """True when the CI environment variable is set (.ci/run runs with CI=true)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require(module_name: str, why: str):
    """Import and return `module_name`, for the tests that cannot run without it.

    Missing locally, the calling test or module is skipped with `why`. Missing in CI (the
    CI environment variable is set), it is an error: CI installs the whole test extra, so a
    missing reference there is a broken environment, not a reason to pass. Use it where
    `pytest.importorskip` would go, at module level or inside a fixture or test.
    """
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:  # a module that is there but fails to import is an error anywhere
        if in_ci():
            raise ImportError(f"{module_name} is required in CI ({why}): {exc}") from exc
        pytest.skip(f"{module_name} is not installed: {why}", allow_module_level=True)


def unavailable(reason: str) -> None:
    """A system package a test needs is missing: skip locally, fail in CI (which installs them)."""
    if in_ci():
        pytest.fail(f"{reason}; CI installs it (.ci/run)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A converted tiny Phi-4-multimodal (random weights; both encoders and LoRAs; f32; 4,096
    positions), made once for every suite that only needs a real model folder to run."""
    from convert.pipeline import convert_checkpoint
    from tests.tiny_checkpoint import TinyShapes, build_reference, save_native

    src, out = tmp_path_factory.mktemp("tiny-ckpt"), tmp_path_factory.mktemp("tiny-model")
    save_native(build_reference(TinyShapes(max_ctx=4096), seed=2), src)
    convert_checkpoint(src, out, "f32", quiet=True)
    return out
