"""The `mixer` command line. Each subcommand lives in `mlpmixer/commands/<name>.py` and exposes
`register(subparsers)`, which adds its parser and sets `func` to the function that runs it."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

# Module names under mlpmixer.commands, in the order `mixer --help` lists them.
COMMANDS = ["train", "finetune", "eval", "predict", "recipes", "info", "convert", "resize", "fewshot", "linear_probe", "show_weights", "bench", "export"]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="mixer",
        description="MLP-Mixer image classifiers: train, fine-tune, evaluate, convert and inspect.",
    )
    parser.add_argument("--version", action="version", version=f"mlpmixer {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show full tracebacks (also MLPMIXER_DEBUG=1)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f".commands.{name}", __package__).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse leaves the positionals after an option unparsed (`mixer predict CKPT --top 3 A.png`):
    # a command that takes a list of inputs gets them too.
    if extra and isinstance(getattr(args, "inputs", None), list) and not any(e.startswith("-") for e in extra):
        args.inputs += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = args.debug or os.environ.get("MLPMIXER_DEBUG") == "1"
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("mixer: interrupted.", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`mixer info | head -3`): stop quietly, as other command-line tools do.
        # Python flushes stdout again at exit, so point it at devnull first (Python's signal docs).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, the shell's status for a tool stopped by a closed pipe
    except (ValueError, OSError) as e:
        # User errors (bad paths, files, sizes) are one sentence; other exceptions are bugs and
        # keep their traceback.
        if debug:
            raise
        if not getattr(e, "reported_elsewhere", False):  # a rank of several whose error another one prints
            print(f"mixer {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
