"""The ``repsim`` command line: argument parsing, printing and exit codes."""

from repsim.cli.app import POOL_CHOICES, build_parser, main

__all__ = ["POOL_CHOICES", "build_parser", "main"]
