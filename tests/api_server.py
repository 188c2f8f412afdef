"""Start the HTTP API on a free loopback port, in this process, for a test.

    with serving(engine, model_name="tiny") as base_url:      # http://127.0.0.1:PORT/v1
        OpenAI(base_url=base_url, api_key="x").models.list()
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Iterator

import uvicorn

from app.api.server import Api, ApiConfig
from app.engine_api import Engine
from app.engine_queue import EngineQueue


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(engine: Engine, model_name: str = "test-model", max_waiting: int = 16,
            **config: object) -> Iterator[str]:
    """The API on `engine` (through an EngineQueue), serving until the block ends; yields the /v1 URL.
    `config` goes to ApiConfig (api_key, max_body_bytes, allow_remote_media)."""
    api = Api(EngineQueue(engine, max_waiting=max_waiting), ApiConfig(model_name=model_name, **config))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api.root_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="api-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the API server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
