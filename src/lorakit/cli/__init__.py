"""The `lorakit` command line, one module per command group: train.py (train, data, inspect, recipes), evaluate.py
(eval, compare, sweep), generate.py (generate, serve), adapters.py (merge, export, combine), and what they share
(common.py). User mistakes print one clear line and exit 2; they never show a traceback.

The top layer: it may import every layer below; nothing imports it.
"""
from __future__ import annotations

import argparse
import sys
import warnings

from ..errors import LorakitWarning, TrainingStopped, UserError
from . import adapters, evaluate, generate, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA and QLoRA fine-tuning you can read.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (train, evaluate, generate, adapters):
        group.add_parsers(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """lorakit's own warnings as one line; everything else as Python shows it."""
    if issubclass(category, LorakitWarning):
        print(f"lorakit: warning: {message}", file=sys.stderr)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    warnings.showwarning = _show_warning
    try:
        return args.func(args)
    except TrainingStopped as e:
        print(f"lorakit: {e}", file=sys.stderr)
        return e.exit_code
    except UserError as e:
        print(f"lorakit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorakit: interrupted", file=sys.stderr)
        return 130
