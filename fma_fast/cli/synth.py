"""``fma-fast synth``: a synthetic task written as train/val/test feature files."""

from __future__ import annotations

from ..experiments.synthetic import save_task
from ..io.files import check_output_folder
from . import options
from .demo import add_task_options, make_task


def run(args) -> None:
    out = check_output_folder(options.require_out(args), "--out")
    paths = {name: out / f"{name}.safetensors" for name in ("train", "val", "test")}
    if out.is_dir():
        for path in paths.values():
            options.check_feature_output(path, "--out")
    task = make_task(args)
    source = {
        "kind": "synthetic",
        **{key: getattr(args, key) for key in ("classes", "dim", "shots", "difficulty", "seed")},
    }
    save_task(task, paths, source)
    print(f"wrote {out}/train.safetensors, val.safetensors, test.safetensors")


def register(commands) -> None:
    parser = commands.add_parser(
        "synth", help="write a synthetic task as train/val/test feature files",
        formatter_class=options.Formatter)
    options.add_out(parser, "output folder")
    add_task_options(parser, seed=True)
    parser.set_defaults(run=run)
