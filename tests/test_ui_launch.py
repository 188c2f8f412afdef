"""`python launch.py` on a machine with no network: one clear message, the text-only fallback, a URL."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def offline_env(tmp_path) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", XDG_CACHE_HOME=str(tmp_path / "cache"),
               XDG_DATA_HOME=str(tmp_path / "data"), PYTHONUNBUFFERED="1")
    env.pop("HF_ENDPOINT", None)
    return env


@pytest.mark.slow
def test_offline_launch_falls_back_to_the_small_model_and_serves(tmp_path):
    from app.ui.server import free_port

    port = free_port("127.0.0.1", 7900)
    proc = subprocess.Popen([sys.executable, "launch.py", "--port", str(port), "--ctx", "2048", "--threads", "1"],
                            cwd=ROOT, env=offline_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: list[str] = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip())
            if line.startswith("Running on "):
                break
        output = "\n".join(lines)
        assert lines and lines[-1].startswith(f"Running on http://127.0.0.1:{port}"), output
        notices = [l for l in lines if "cannot be reached" in l]
        assert len(notices) == 1 and "python launch.py --download" in notices[0], output
        assert "SmolLM2" in notices[0] and "HF_HUB_OFFLINE" in notices[0]

        from gradio_client import Client

        answer = Client(f"http://127.0.0.1:{port}/", verbose=False).predict("What is the capital of France?",
                                                                          api_name="/chat")
        assert "Paris" in answer
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_asking_for_the_full_model_offline_fails_with_the_reason(tmp_path):
    run = subprocess.run([sys.executable, "launch.py", "--download"], cwd=ROOT, env=offline_env(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "HF_HUB_OFFLINE" in run.stderr


def test_bad_options_are_refused(tmp_path):
    run = subprocess.run([sys.executable, "launch.py", "--model", str(tmp_path / "nowhere")], cwd=ROOT,
                         env=offline_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "no model at" in run.stderr
    run = subprocess.run([sys.executable, "launch.py", "--auth", "nocolon"], cwd=ROOT, env=offline_env(tmp_path),
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "USER:PASS" in run.stderr
