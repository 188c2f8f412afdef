"""`python -m app.api` (phi4mm-serve): starts at once, says "loading" until the model is in, and
fails with one clear line on a bad model or address."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import app.api.__main__ as cli

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(port: int, key: str | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/health",
                                     headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_missing_model_is_one_clear_line(capsys):
    assert cli.main(["--model", "/nowhere/model.gguf"]) == 2
    assert capsys.readouterr().err.strip() == "phi4mm-serve: no model at /nowhere/model.gguf"


def test_bad_options_are_refused(capsys):
    assert cli.main(["--model", ".", "--queue", "-1"]) == 2
    assert "--queue must be >= 0" in capsys.readouterr().err


def test_a_file_that_is_not_a_model_fails_after_starting_with_a_clear_line(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    run = subprocess.run([sys.executable, "-m", "app.api", "--model", str(bad), "--port", str(free_port())],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "phi4mm-serve: cannot load the model:" in run.stderr and "Traceback" not in run.stderr


@pytest.mark.slow
def test_it_serves_at_once_says_loading_then_ok_and_warns_off_loopback(monkeypatch):
    from app.model_store import fallback_model_path

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "app.api", "--model", str(fallback_model_path()),
                               "--port", str(port), "--host", "0.0.0.0", "--ctx", "1024"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**__import__("os").environ, "PHI4MM_API_KEY": "sesame"})
    try:
        statuses = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                statuses.append(health(port, "sesame"))
            except OSError:
                time.sleep(0.05)  # not listening yet
                continue
            if statuses[-1][0] == 200:
                break
            time.sleep(0.05)
        assert statuses and statuses[-1] == (200, {"status": "ok", "model": "SmolLM2-135M-Instruct.Q4_1"})
        assert all(s in ((503, {"status": "loading", "model": "SmolLM2-135M-Instruct.Q4_1"}), statuses[-1])
                   for s in statuses)
        assert health(port)[0] == 401  # the key from PHI4MM_API_KEY is wanted
    finally:
        server.terminate()
        out, err = server.communicate(timeout=30)
    assert f"Serving SmolLM2-135M-Instruct.Q4_1 at http://0.0.0.0:{port}/v1" in out
    assert "without --api-key" not in err  # it has one
