"""`gguflab` subcommands, with llama.cpp's flag names where they exist."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from .errors import UserError


def cmd_inspect(args: argparse.Namespace) -> int:
    from .catalog import embedded_model
    from .gguf import GGUFReader
    from .inspect import dumps, render_text

    r = GGUFReader(args.file or embedded_model())
    print(dumps(r, args.full) if args.json else render_text(r))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="gguflab",
        description=(
            "Convert, quantize, test and chat with GGUF models. With no command, "
            "shows the embedded default model (SmolLM2-135M-Instruct)."
        ),
    )
    p.add_argument("--version", action="version", version=f"gguflab {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("inspect", help="show a GGUF file's metadata and tensors (like gguf-dump)")
    s.add_argument("file", nargs="?", help="GGUF file (default: the embedded SmolLM2 model)")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.add_argument("--full", action="store_true", help="with --json: every array item")
    s.set_defaults(func=cmd_inspect)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):
        try:  # metadata may hold bytes that are not UTF-8: show them, never crash on them
            stream.reconfigure(errors="backslashreplace")
        except AttributeError:
            pass
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["inspect", *(argv or [])])
    try:
        return args.func(args)
    except UserError as e:
        print(f"gguflab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("gguflab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `gguflab inspect | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
