"""What the report runs, declared once: the methods, and the settings with their command-line
options (derived from the fields) and the command that reproduces them."""

from __future__ import annotations

import argparse
import math
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from ...core import validation as check
from ...core.policy import DEFAULT_STEP_SIZE
from ...train.fit import FitSettings

METHODS = (
    "zero-shot",
    "FMA",
    "FMA adaptive",
    "linear probe",
    "linear probe on FMA",
    "CLIP-Adapter",
    "CLIP-Adapter + FMA",
    "Tip-Adapter",
    "Tip-Adapter on FMA",
    "Tip-Adapter-F",
)


PLOTTED = (
    "zero-shot",
    "FMA",
    "linear probe",
    "CLIP-Adapter",
    "CLIP-Adapter + FMA",
    "Tip-Adapter",
)


def _option(default, help: str, group: str):
    """A settings field with its command-line help and option group."""
    return field(default=default, metadata={"help": help, "group": group})


DATA, GRID, TRAINING = "data (synthetic unless --train/--val/--test are given)", "grid", "FMA"
_RELEASED = FitSettings()
_SMALL = ("(small fields fitted fast over a grid of synthetic tasks; fit, train and run use "
          "the released code's")


@dataclass
class ReportSettings:
    """What the report runs. FMA's epochs are raised for small K so that every fit gets at
    least ``min_updates`` optimizer steps (a 1-shot, 20-class split is one batch per epoch).
    Each field is also a command-line option (``--test-per-class`` for ``test_per_class``)."""

    shots: tuple[int, ...] = _option((1, 2, 4, 8, 16), "K shots per class", GRID)
    seeds: tuple[int, ...] = _option((1, 2, 3), "seeds: shot draws and initialisations", GRID)
    difficulties: tuple[float, ...] = _option((0.25, 0.6, 0.9), "synthetic difficulties in "
                                              "[0, 1]", DATA)
    classes: int = _option(20, "synthetic classes", DATA)
    dim: int = _option(256, "synthetic feature dim", DATA)
    test_per_class: int = _option(50, "synthetic test rows per class", DATA)
    data_seed: int = _option(0, "seed of the synthetic data sets", DATA)
    blocks: int = _option(2, f"residual blocks of FMA's field {_SMALL}: {_RELEASED.blocks})",
                          TRAINING)
    epochs: int = _option(240, "FMA epochs (raised to reach --min-updates) "
                               f"{_SMALL}: {_RELEASED.epochs})", TRAINING)
    min_updates: int = _option(600, "fewest optimizer steps of an FMA fit", TRAINING)
    batch_size: int = _option(64, f"FMA batch size {_SMALL}: {_RELEASED.batch_size})", TRAINING)
    lr: float = _option(2e-3, f"FMA learning rate {_SMALL}: {_RELEASED.lr})", TRAINING)
    gamma: float = _option(0.05, f"FMA noise strength {_SMALL}: {_RELEASED.gamma})", TRAINING)
    max_steps: int = _option(10, "largest M; M * step size <= 1", TRAINING)
    step_size: float = _option(DEFAULT_STEP_SIZE, "Euler step h", TRAINING)
    convergence_check: bool = True
    """Refit FMA with 2x epochs at the smallest and largest K (``--skip-convergence-check``)."""
    features: tuple[str, str, str] | None = None
    """Train, val and test feature files instead of synthetic tasks (``--train/--val/--test``)."""
    peft: tuple[tuple[str, str, str, str], ...] = ()
    """PEFT feature sources of the same images (``--peft-features NAME TRAIN VAL TEST``): each
    adds the rows NAME (the source's own prediction, FMA's M=0) and NAME + FMA."""

    def __post_init__(self) -> None:
        self.shots = _positive_ints("shots", self.shots, minimum=1)
        self.seeds = _positive_ints("seeds", self.seeds, minimum=0)
        self.peft = tuple(tuple(source) for source in self.peft)
        if self.peft and self.features is None:
            raise ValueError("--peft-features needs --train/--val/--test: the PEFT sources' "
                             "files must hold the same images as those")
        names = [source[0] for source in self.peft]
        clash = sorted(set(names) & set(METHODS)) or sorted(
            {n for n in names if names.count(n) > 1})
        if clash:
            raise ValueError(f"--peft-features names must be new and distinct, got {clash[0]!r}")
        if self.features is None:
            if not self.difficulties:
                raise ValueError("difficulties must name at least one difficulty in [0, 1]")
            for difficulty in self.difficulties:
                if not 0.0 <= difficulty <= 1.0:
                    raise ValueError(f"difficulties must lie in [0, 1], got {difficulty}")
        for name in ("classes", "dim", "test_per_class", "blocks", "epochs", "batch_size"):
            check.check_int(name, getattr(self, name), minimum=1)
        check.check_int("min_updates", self.min_updates, minimum=0)
        check.check_int("data_seed", self.data_seed, minimum=0)
        check.check_int("max_steps", self.max_steps, minimum=1)
        for name in ("lr", "step_size"):
            check.check_positive_float(name, getattr(self, name))
        check.check_positive_float("gamma", self.gamma, allow_zero=True)
        if self.max_steps * self.step_size > 1.0 + 1e-9:
            raise ValueError(
                f"max_steps * step_size must be <= 1 (FMA stops by t=1), "
                f"got {self.max_steps} * {self.step_size}"
            )

    def fma_epochs(self, rows: int) -> int:
        """Epochs for a train split of ``rows``: ``epochs``, raised to reach ``min_updates``."""
        per_epoch = math.ceil(rows / self.batch_size)
        return max(self.epochs, math.ceil(self.min_updates / per_epoch))

    def command(self, out: str, name: str) -> str:
        """The ``fma-fast report`` command line that reproduces these settings."""
        parts = ["fma-fast", "report", "--out", out, "--name", name]
        if self.features is not None:
            parts += ["--train", self.features[0], "--val", self.features[1]]
            parts += ["--test", self.features[2]]
        for source in self.peft:
            parts += ["--peft-features", *source]
        for spec in _option_fields():
            if self.features is not None and spec.metadata["group"] == DATA:
                continue
            value = getattr(self, spec.name)
            values = value if isinstance(value, tuple) else (value,)
            parts += [_flag(spec.name), *map(str, values)]
        if not self.convergence_check:
            parts.append("--skip-convergence-check")
        return shlex.join(parts)


def _option_fields():
    return [spec for spec in fields(ReportSettings) if "help" in spec.metadata]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The report's options, one per settings field, with its default shown."""
    defaults = ReportSettings()
    groups: dict[str, object] = {}
    data = parser.add_argument_group(DATA)
    groups[DATA] = data
    data.add_argument("--train", help="train pool feature file (with labels)")
    data.add_argument("--val", help="val pool feature file (with labels)")
    data.add_argument("--test", help="test feature file (with labels)")
    data.add_argument("--peft-features", nargs=4, action="append", default=[],
                      metavar=("NAME", "TRAIN", "VAL", "TEST"),
                      help="a PEFT source's feature files of the same images (from 'extract "
                           "--peft'): adds the rows NAME and NAME + FMA (repeatable)")
    for spec in _option_fields():
        group = groups.setdefault(spec.metadata["group"],
                                  parser.add_argument_group(spec.metadata["group"]))
        default = getattr(defaults, spec.name)
        many = isinstance(default, tuple)
        kind = type(default[0] if many else default)
        group.add_argument(_flag(spec.name), type=kind, nargs="+" if many else None,
                           default=list(default) if many else default,
                           help=f"{spec.metadata['help']} (default: %(default)s)")
    parser.add_argument("--skip-convergence-check", action="store_true",
                        help="do not refit FMA with 2x epochs to check the training budget")


def from_arguments(args: argparse.Namespace) -> ReportSettings:
    """The settings the parsed options describe (checked by :class:`ReportSettings`)."""
    files = (args.train, args.val, args.test)
    if any(files) and not all(files):
        raise ValueError("feature files need all three of --train, --val and --test")
    values = {}
    for spec in _option_fields():
        value = getattr(args, spec.name)
        values[spec.name] = tuple(value) if isinstance(value, list) else value
    return ReportSettings(**values, convergence_check=not args.skip_convergence_check,
                          features=files if all(files) else None,
                          peft=tuple(tuple(source) for source in args.peft_features))


def method_names(runs: list[dict]) -> list[str]:
    """The report's methods, then the PEFT rows the runs carry, in their order."""
    extra = [name for name in runs[0]["accuracy"] if name not in METHODS] if runs else []
    return [*METHODS, *extra]


def peft_pairs(runs: list[dict]) -> list[tuple[str, str]]:
    """(NAME + FMA, NAME) for every PEFT source of the runs."""
    return [(f"{name} + FMA", name) for name in method_names(runs)[len(METHODS):]
            if not name.endswith(" + FMA")]


def _positive_ints(name: str, values: Sequence[int], minimum: int) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{name} must be a non-empty list of ints, got {values!r}")
    return tuple(check.check_int(f"{name}[{i}]", v, minimum=minimum) for i, v in enumerate(values))
