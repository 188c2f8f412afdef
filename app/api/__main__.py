"""Serve the OpenAI-compatible API: `python -m app.api --model PATH` (also `phi4mm-serve`).

    python -m app.api --model ~/.cache/phi4mm/models/phi-4-multimodal-instruct-q4_k_m
    -> http://127.0.0.1:8000/v1   (any OpenAI client: base_url=that, api_key=anything or --api-key)

PATH is a converted folder or a single text-only .gguf. Without --model: the app's default model
folder, and the same offline fallback as launch.py (SmolLM2, text only).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

PROG = "phi4mm-serve"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Serve Phi-4-multimodal through the OpenAI API "
                                "(chat completions with images, audio and tools; completions; transcriptions).")
    p.add_argument("--model", help="a converted model folder or a text-only .gguf (default: the app's model "
                                   "folder, made on first run; text-only SmolLM2 without network)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this computer only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("PHI4MM_API_KEY"),
                   help="require `Authorization: Bearer KEY` on every route (default: $PHI4MM_API_KEY, else none)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: all cores)")
    p.add_argument("--ctx", type=int, default=8192, help="context size in tokens (default 8192)")
    p.add_argument("--queue", type=int, default=16, help="requests that may wait for the model (default 16; "
                                                          "more get 429 with Retry-After)")
    p.add_argument("--max-body-mb", type=int, default=50, help="largest request body in MB (default 50)")
    p.add_argument("--allow-remote-media", action="store_true",
                   help="fetch http(s) image and audio URLs (default: only data: URLs are read)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.queue < 0 or args.max_body_mb < 1 or args.ctx < 16:
        print(f"{PROG}: --queue must be >= 0, --max-body-mb >= 1 and --ctx >= 16", file=sys.stderr)
        return 2
    from app.model_store import HubUnreachable, ModelChoice, ModelStore, ModelUnavailable

    if args.model:
        path = Path(args.model).expanduser()
        if not path.exists():
            print(f"{PROG}: no model at {path}", file=sys.stderr)
            return 2
        choice = ModelChoice(path, full=path.is_dir())
    else:
        try:
            choice = ModelStore().resolve(download=True, fallback=True)
        except (ModelUnavailable, HubUnreachable) as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return 2

    import threading

    import uvicorn

    from app.api.server import Api, ApiConfig, is_loopback
    from app.engine import LocalEngine
    from app.engine_queue import EngineQueue

    name = choice.path.stem if choice.path.is_file() else choice.path.name
    config = ApiConfig(model_name=name, api_key=args.api_key, max_body_bytes=args.max_body_mb * 2**20,
                       allow_remote_media=args.allow_remote_media)
    api = Api(None, config)  # serving at once: /health says "loading" until the model is in
    server = uvicorn.Server(uvicorn.Config(api.root_app(), host=args.host, port=args.port, log_level="warning"))
    failed: list[str] = []

    def load() -> None:
        try:
            engine = LocalEngine.load(choice.path, n_ctx=args.ctx, n_threads=args.threads)
        except Exception as e:  # any failure to load: one line, and the server stops
            failed.append(" ".join(str(e).split()) or type(e).__name__)
            server.should_exit = True
            return
        api.loaded = EngineQueue(engine, max_waiting=args.queue)
        print(f"Model loaded: {name}", flush=True)

    if not is_loopback(args.host) and not args.api_key:
        print(f"warning: listening on {args.host} without --api-key: anyone who can reach this address can use "
              f"the model", file=sys.stderr)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"Loading {choice.path} ...", flush=True)
    print(f"Serving {name} at http://{host}:{args.port}/v1  (Ctrl+C to stop)", flush=True)
    loader = threading.Thread(target=load, name="model-loader", daemon=True)
    loader.start()
    try:
        server.run()
    finally:
        loader.join()
        if api.loaded is not None:
            api.loaded.close()
    if failed:
        print(f"{PROG}: cannot load the model: {failed[0]}", file=sys.stderr)
        return 2
    if not server.started:
        print(f"{PROG}: could not listen on {args.host}:{args.port} (in use, or not an address of this computer)",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
