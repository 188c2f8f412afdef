"""Load a model and serve the page, with the OpenAI-compatible API under /v1 beside it: what
`launch.py` does once it knows the model, and what the tests use to start the real app
in-process on a free port. The page and the API share one engine through one queue
(app/engine_queue.py), so a page user and an API client never interleave in one generation.

    app = serve(ModelChoice(path, full=True), port=0, block=False)
    app.url ... app.close()
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.routing import Mount

from app.api.server import Api, ApiConfig
from app.conversation_store import conversations_dir
from app.engine import LocalEngine
from app.engine_api import Engine
from app.engine_queue import EngineQueue
from app.model_store import FULL_MODEL_COMMAND, ModelChoice
from app.ui.handlers import Handlers, PageInfo
from app.ui.page import build_page, launch_page
from tools import builtin_tools


@dataclass
class RunningApp:
    url: str
    engine: Engine
    demo: Any  # gr.Blocks

    def close(self) -> None:
        self.demo.close()
        self.engine.close()


def free_port(host: str = "127.0.0.1", start: int = 7860) -> int:
    """`start` or the next free port (Gradio stops with an error when its port is taken); 0 = any."""
    for port in ([0] if start == 0 else range(start, start + 100)):
        with socket.socket() as s:
            try:
                s.bind((host, port))
                return s.getsockname()[1]
            except OSError:
                continue
    raise OSError(f"no free port from {start} to {start + 99} on {host}")


def serve(choice: ModelChoice, host: str = "127.0.0.1", port: int = 7860, n_ctx: int = 8192,
          n_threads: int | None = None, share: bool = False, auth: tuple[str, str] | None = None,
          notes_path: str | os.PathLike | None = None, conversations_root: str | os.PathLike | None = None,
          block: bool = True, quiet: bool = True, api_key: str | None = None, queue: int = 16) -> RunningApp:
    """Load `choice`, build the page around it and start serving (blocking unless block=False).
    The API under /v1 wants `Authorization: Bearer api_key` when one is given."""
    engine = LocalEngine.load(choice.path, n_ctx=n_ctx, n_threads=n_threads)
    name = choice.path.stem if choice.path.is_file() else choice.path.name
    if choice.full:
        reason = f"{name} has no encoder for it"
    else:
        reason = f"the text-only fallback model is running; get Phi-4-multimodal with: {FULL_MODEL_COMMAND}"
    return serve_engine(engine, name, details=f"{engine.n_threads} threads · context {engine.n_ctx:,}",
                        notice=choice.notice, unsupported_reason=reason, host=host, port=port, share=share,
                        auth=auth, notes_path=notes_path, conversations_root=conversations_root, block=block,
                        quiet=quiet, api_key=api_key, queue=queue)


def serve_engine(engine: Engine, name: str, details: str = "", notice: str | None = None,
                 unsupported_reason: str = "", host: str = "127.0.0.1", port: int = 7860, share: bool = False,
                 auth: tuple[str, str] | None = None, notes_path: str | os.PathLike | None = None,
                 conversations_root: str | os.PathLike | None = None, block: bool = True, quiet: bool = True,
                 api_key: str | None = None, queue: int = 16) -> RunningApp:
    """The page (and the API under /v1) on any engine: the local one, or a server's (app/remote_engine.py)."""
    queued = EngineQueue(engine, max_waiting=queue)
    root = Path(conversations_root) if conversations_root else conversations_dir()
    info = PageInfo(model_name=name, notice=notice, conversations_root=root, details=details)
    demo = build_page(Handlers(queued, builtin_tools(notes_path=notes_path), info,
                               unsupported_reason=unsupported_reason))
    url = launch_page(demo, host=host, port=free_port(host, port), share=share, auth=auth,
                      allowed_paths=[str(root)], block=False, quiet=quiet)
    api = Api(queued, ApiConfig(model_name=name, api_key=api_key))
    # Before Gradio's own routes, so that its catch-all paths do not take /v1.
    demo.app.router.routes.insert(0, Mount("/v1", app=api.v1_app()))
    app = RunningApp(url, engine, demo)
    if block:
        print(f"Running on {url}  (the OpenAI-compatible API: {url.rstrip('/')}/v1; Ctrl+C to stop)", flush=True)
        try:
            demo.block_thread()
        finally:
            engine.close()
    return app
