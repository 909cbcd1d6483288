"""fma_fast: fast, dependable Flow Matching Alignment for few-shot CLIP classification."""

from . import _checkout, reference, synthetic  # noqa: F401  (_checkout first: kernels/)
from ._validation import NotUnitNormWarning
from ._version import __version__  # noqa: F401  (fma_fast.__version__)
from .batch import ScoreSummary, score
from .checkpoint import CheckpointError, load, load_config, load_official, save
from .class_tables import PerRowClasses
from .model import VelocityNet
from .solver import SolveResult, StepSelection, accuracy_by_steps, select_steps, solve
from .training import FitResult, fit

__all__ = [
    "CheckpointError",
    "FitResult",
    "NotUnitNormWarning",
    "PerRowClasses",
    "ScoreSummary",
    "SolveResult",
    "StepSelection",
    "VelocityNet",
    "accuracy_by_steps",
    "fit",
    "load",
    "load_config",
    "load_official",
    "reference",
    "save",
    "score",
    "select_steps",
    "solve",
    "synthetic",
]
