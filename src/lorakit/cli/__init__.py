"""The `lorakit` command line, one module per command group: train.py (train, data, inspect), recipes.py (recipes
list / show / copy), evaluate.py (eval, compare, sweep), generate.py (generate, serve), adapters.py (merge, export,
combine), and what they share (common.py). User mistakes print one clear line and exit 2; never a traceback.

The top layer: it may import every layer below; nothing imports it.
"""
from __future__ import annotations

import argparse
import re
import sys
import warnings

from ..errors import LorakitWarning, TrainingStopped, UserError
from ..version import __version__
from . import adapters, evaluate, generate, recipes, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA and QLoRA fine-tuning you can read.")
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (train.add_parsers, evaluate.add_parsers, generate.add_parsers, adapters.add_parsers,
                train.add_inspect_parser, recipes.add_parsers):  # the order `lorakit --help` lists them in
        add(sub)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """lorakit's own warnings as one line; everything else as Python shows it."""
    if issubclass(category, LorakitWarning):
        print(f"lorakit: warning: {message}", file=sys.stderr)
    else:
        _python_show_warning(message, category, filename, lineno, file, line)


_python_show_warning = warnings.showwarning


NEGATIVE_VALUE = re.compile(r"^-(\d|\.\d|inf|nan)", re.IGNORECASE)


def joined_negative_values(argv: list[str]) -> list[str]:
    """`--flag -1,2` as `--flag=-1,2`: argparse reads a value that starts with '-' and is not one plain number
    (a list like -1,2, or 1e-3 written -1e-3) as an unknown option; negative weights are legitimate."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and NEGATIVE_VALUE.match(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(joined_negative_values(argv))
    args.argv = argv
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
