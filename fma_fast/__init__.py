"""fma_fast: fast, dependable Flow Matching Alignment for few-shot CLIP classification."""

from . import _checkout  # noqa: F401  (_checkout first: kernels/)
from ._version import __version__  # noqa: F401  (fma_fast.__version__)
from .batch.job import ScoreSummary, score
from .core import reference
from .core.model import VelocityNet
from .core.validation import NotUnitNormWarning
from .experiments import synthetic
from .io.checkpoint import CheckpointError, load, load_config, load_official, save
from .ops.class_tables import PerRowClasses
from .ops.losses import cosine_cross_entropy
from .solver.api import SolveResult, StepSelection, accuracy_by_steps, select_steps, solve
from .train.fit import FitResult, fit
from .train.refine import refine

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
    "cosine_cross_entropy",
    "fit",
    "load",
    "load_config",
    "load_official",
    "reference",
    "refine",
    "save",
    "score",
    "select_steps",
    "solve",
    "synthetic",
]
