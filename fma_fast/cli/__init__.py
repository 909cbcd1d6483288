"""The ``fma-fast`` command line: one module per command, the options they share in
:mod:`fma_fast.cli.options`. Internal to the command: the library does not import it."""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
