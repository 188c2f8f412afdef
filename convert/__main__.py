"""`python -m convert SRC OUT [--outtype f32|f16|q8_0|q4_k_m]`: Hugging Face checkpoint -> GGUF folder."""
from __future__ import annotations

import argparse
import sys

from convert.checkpoint import CheckpointError
from convert.pipeline import convert_checkpoint
from model.format import DEFAULT_OUTTYPE, MANIFEST_FILE, OUTTYPES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__.split(":", 1)[1].strip())
    parser.add_argument("src", help="checkpoint folder (either the remote-code or the transformers layout)")
    parser.add_argument("out", help=f"output folder for the GGUF files and {MANIFEST_FILE}")
    parser.add_argument("--outtype", choices=OUTTYPES, default=DEFAULT_OUTTYPE,
                        help=f"decoder storage (default {DEFAULT_OUTTYPE}; LoRAs become q8_0 for quantised decoders)")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    args = parser.parse_args(argv)
    try:
        convert_checkpoint(args.src, args.out, args.outtype, quiet=args.quiet)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no partial file was left looking complete", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
