"""The `repsim` command line: it parses arguments and calls the library, nothing else.

Errors a user can cause (`repsim.errors.UserError`, missing files, ...) print one line on stderr and exit
with status 2; anything else is a bug and keeps its traceback (exit 1).

Each subcommand is one `_add_<name>(subparsers)` function that registers its parser and sets
`func` to the handler; handlers import their library module lazily so `repsim --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from repsim import __version__
from repsim.errors import UserError

# ------------------------------------------------------------------------------------ compare


# ------------------------------------------------------------------------------------ plot


# ------------------------------------------------------------------------------------ extract


# ------------------------------------------------------------------------------------ cache


# ------------------------------------------------------------------------------------ counterexample


# ------------------------------------------------------------------------------------ check


# ------------------------------------------------------------------------------------ distill


# ------------------------------------------------------------------------------------ main

_SUBCOMMANDS: list[str] = ["compare", "plot", "extract", "cache", "counterexample", "check", "distill",
                           "finetune"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="repsim",
        description="Representational similarity for language models (Procrustes, Gram-Frobenius, CKA, "
        "projection residual), layer by layer, and geometry-aware distillation.",
    )
    parser.add_argument("--version", action="version", version=f"repsim {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMANDS:
        adder = globals().get(f"_add_{name}")
        if adder is not None:
            adder(sub)
    return parser



def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except UserError as exc:
        print(f"repsim: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"repsim: error: file not found: {exc.filename or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("repsim: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
