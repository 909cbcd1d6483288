"""``fma-fast report``: the accuracy report (FMA vs few-shot baselines) over shots and seeds."""

from __future__ import annotations

from ..experiments.report import add_arguments, from_arguments, rerender, run_report
from ..io.files import check_output_folder
from . import options


def run(args) -> None:
    out = check_output_folder(options.require_out(args), "--out")
    if args.render_only:
        rerender(out, args.name, progress=not args.quiet)
        return
    run_report(from_arguments(args), out, name=args.name, progress=not args.quiet)


def register(commands) -> None:
    parser = commands.add_parser(
        "report", help="accuracy report: FMA vs baselines over shots, seeds and data sets",
        formatter_class=options.Formatter)
    options.add_out(parser, "output folder")
    parser.add_argument("--name", default="report", help="file stem of the report's files")
    add_arguments(parser)
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the markdown and plots from an existing OUT/NAME.json, "
                             "running nothing")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(run=run)
