"""The README's code examples run as written."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # the example loads SmolLM2 through llama.cpp

ROOT = Path(__file__).resolve().parents[1]


def readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(re.escape(marker) + r".*?```python\n(.*?)```", text, re.S)
    assert match, f"no python block after {marker!r} in README.md"
    return match.group(1)


def test_agent_example_runs_as_written():
    code = readme_block("<!-- agent-example")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    assert lines and lines[0].startswith(("calculate(", "convert_units(")), run.stdout
    assert "26.097" in run.stdout  # 42 km in miles, computed by the unit tool


def test_api_example_runs_as_written():
    """The README's client snippet, against `python -m app.api` on SmolLM2 started here (on a free
    port: the snippet's 8000 is replaced, nothing else)."""
    import socket
    import time
    import urllib.request

    from app.model_store import fallback_model_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "app.api", "--model", str(fallback_model_path()),
                               "--port", str(port), "--ctx", "2048"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
                time.sleep(0.5)
        code = readme_block("<!-- api-example").replace(":8000/", f":{port}/")
        run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.stdout.strip(), "the snippet printed no answer"
    finally:
        server.terminate()
        server.wait(30)
