"""The ``fma-fast`` command: the commands, and one line with exit status 2 for bad input."""

from __future__ import annotations

import argparse
import sys

import torch

from ..io.checkpoint import CheckpointError
from ..io.features import FeatureFileError
from ..io.files import describe_os_error
from ..ops.dispatch import BackendUnavailableError
from . import demo, doctor, evaluate, extract, predict, report, run, score, synth, train

COMMANDS = (demo, synth, train, evaluate, score, extract, run, predict, report, doctor)
INPUT_ERRORS = (
    CheckpointError,
    FeatureFileError,
    ValueError,
    TypeError,
    OSError,
    FloatingPointError,
    BackendUnavailableError,
    torch.cuda.OutOfMemoryError,
)
"""Bad input, files, devices or disks: one line and exit status 2 (anything else is a bug and
keeps its traceback)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fma-fast",
        description="Fast, dependable Flow Matching Alignment (FMA) for few-shot CLIP "
                    "classification.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.register(commands)
    return parser


def _one_line(error: BaseException) -> str:
    text = describe_os_error(error) if isinstance(error, OSError) and error.errno else str(error)
    return " ".join(text.split()) or type(error).__name__


def _out_of_memory(error: BaseException) -> bool:
    """A failed CPU allocation (torch's allocator raises a RuntimeError; numpy MemoryError)."""
    return isinstance(error, MemoryError) or (
        isinstance(error, RuntimeError) and "DefaultCPUAllocator" in str(error))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = args.run(args)
    except INPUT_ERRORS as error:
        print(f"fma-fast {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as error:
        if not _out_of_memory(error):
            raise
        found = str(error).partition("DefaultCPUAllocator: ")[2] or "out of memory"
        print(f"fma-fast {args.command}: error: out of CPU memory ({_one_line(found)}); use "
              "fewer rows, classes, top-k or steps at once", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fma-fast: interrupted", file=sys.stderr)
        return 130
    return code or 0
