"""`python -m convert SRC OUT [--outtype f32|f16|q8_0|q4_k_m]`: Hugging Face checkpoint -> GGUF folder."""
from __future__ import annotations

import argparse
import signal
import sys

from convert.checkpoint import CheckpointError
from convert.pipeline import convert_checkpoint
from convert.safetensors_file import SafetensorsError
from model.format import DEFAULT_OUTTYPE, MANIFEST_FILE, OUTTYPES, ManifestError


class Terminated(BaseException):
    """SIGTERM, raised where the conversion is, so that it cleans up as for Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("src", help="checkpoint folder (either the remote-code or the transformers layout)")
    parser.add_argument("out", help=f"output folder for the GGUF files and {MANIFEST_FILE}")
    parser.add_argument("--outtype", choices=OUTTYPES, default=DEFAULT_OUTTYPE,
                        help=f"decoder storage (default {DEFAULT_OUTTYPE}; LoRAs become q8_0 for quantised decoders)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        convert_checkpoint(args.src, args.out, args.outtype, quiet=args.quiet)
    except (CheckpointError, SafetensorsError, ManifestError, OSError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)   # one line
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: no half-written model was left in {args.out}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"terminated: no half-written model was left in {args.out}", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
