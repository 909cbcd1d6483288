"""``fma-fast doctor``: versions, devices, the path each op takes here, and a check of every
Triton kernel against its reference; exit status 1 when a check fails."""

from __future__ import annotations

import json
from pathlib import Path

from ..doctor import render, report
from ..io.files import check_output_file, write_text
from . import options


def run(args) -> int:
    out = getattr(args, "out", None)
    if out is not None:
        check_output_file(Path(out), "--out", kind="a doctor report",
                          is_kind=lambda path: path.suffix == ".json")
    result = report(args.device, kernels=not args.no_kernels)
    print(render(result))
    if out is not None:
        write_text(out, json.dumps(result, indent=1) + "\n")
    return 1 if result["failed"] else 0


def register(commands) -> None:
    parser = commands.add_parser(
        "doctor", help="versions, devices, the path each op takes here, and a check of every "
                       "Triton kernel against its reference", formatter_class=options.Formatter)
    options.add_device(parser)
    parser.add_argument("--no-kernels", action="store_true", help="skip the kernel checks")
    parser.add_argument("--out", "--json", dest="out", default=None,
                        help="also write the report as JSON here")
    parser.set_defaults(run=run)
