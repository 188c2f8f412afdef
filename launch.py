"""Start the app: `python launch.py [--model DIR] [--host H] [--port P] [--threads N] [--ctx N]
[--share] [--auth user:pass] [--api-key KEY] [--queue N] [--download]`, then open the URL it prints.
The OpenAI-compatible API is served beside the page, under /v1.

Without --model it uses the converted Phi-4-multimodal in the default model folder
(app.model_store), downloading and converting it first when it is missing; without network
access it starts text-only on the small SmolLM2 model, with a banner saying how to get the
full one. Nothing reaches the network at run time unless the model has to be downloaded.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Gradio would otherwise check for updates and send telemetry.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python launch.py", description="Phi-4-multimodal, local: the web app.")
    parser.add_argument("--model", help="a converted model folder (manifest.json) or a text-only .gguf file "
                                        "(default: the folder in ~/.cache/phi4mm/models, made on first run)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this computer only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860, or the next free one)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for the model (default: all cores)")
    parser.add_argument("--ctx", type=int, default=8192, help="context size in tokens (default 8192)")
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    parser.add_argument("--auth", metavar="USER:PASS", help="require this user name and password on the page")
    parser.add_argument("--api-key", default=os.environ.get("PHI4MM_API_KEY"),
                        help="require `Authorization: Bearer KEY` on the API under /v1 (default: $PHI4MM_API_KEY)")
    parser.add_argument("--queue", type=int, default=16,
                        help="API requests that may wait for the model (default 16; more get 429)")
    parser.add_argument("--backend", metavar="URL",
                        help="run on an OpenAI-compatible server (a vLLM cluster, or python -m app.api elsewhere) "
                             "instead of the embedded engine, e.g. http://gpu-box:8000/v1 (docs/scale-out.md)")
    parser.add_argument("--backend-key", default=os.environ.get("PHI4MM_BACKEND_KEY"),
                        help="the backend's API key (default: $PHI4MM_BACKEND_KEY)")
    parser.add_argument("--remote-models", metavar="text=NAME,vision=NAME,speech=NAME",
                        help="the backend's model name for each LoRA (vLLM serves each LoRA as a model)")
    parser.add_argument("--download", action="store_true",
                        help="download and convert the full model if it is missing; fail instead of falling back")
    args = parser.parse_args(argv)
    if args.auth and ":" not in args.auth:
        parser.error("--auth takes USER:PASS")
    if args.queue < 0:
        parser.error("--queue must be >= 0")
    if args.backend and args.model:
        parser.error("--backend and --model exclude each other: the model is the backend's")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.backend:
        return run_on_backend(args)
    from app.model_store import HubUnreachable, ModelChoice, ModelStore, ModelUnavailable

    if args.model:
        path = Path(args.model).expanduser()
        if not path.exists():
            print(f"error: no model at {path}", file=sys.stderr)
            return 2
        choice = ModelChoice(path, full=path.is_dir())  # a single .gguf is a text-only model
    else:
        try:
            choice = ModelStore().resolve(download=True, fallback=not args.download)
        except (ModelUnavailable, HubUnreachable) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    from app.ui.server import serve

    print(f"Loading {choice.path} ...", flush=True)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    from app.api.server import is_loopback

    if not is_loopback(args.host) and not args.api_key:
        print(f"warning: the API under /v1 on {args.host} has no --api-key: anyone who can reach this address "
              f"can use the model", file=sys.stderr)
    from app.engine_api import EngineError

    try:
        serve(choice, host=args.host, port=args.port, n_ctx=args.ctx, n_threads=args.threads, share=args.share,
              auth=auth, block=True, api_key=args.api_key, queue=args.queue)
    except (EngineError, RuntimeError, OSError, ValueError) as e:  # a model folder that cannot be loaded
        print(f"error: cannot load {choice.path}: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


def run_on_backend(args: argparse.Namespace) -> int:
    """The page on a remote engine: the model runs on the server at --backend."""
    from app.engine_api import EngineError
    from app.remote_engine import RemoteModels, connect
    from app.ui.server import serve_engine

    try:
        models = RemoteModels.parse(args.remote_models) if args.remote_models else None
        engine = connect(args.backend, args.backend_key, models)
    except (EngineError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Using the model {engine.models.text} at {engine.url}", flush=True)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    serve_engine(engine, engine.models.text, details=f"backend {engine.url} · context {engine.n_ctx:,}",
                 unsupported_reason=f"the backend {engine.url} serves no adapter for it", host=args.host,
                 port=args.port, share=args.share, auth=auth, block=True, api_key=args.api_key, queue=args.queue)
    return 0


if __name__ == "__main__":
    sys.exit(main())
