"""The evaluation report: FMA against few-shot baselines over shots, seeds and feature sets.

For each feature set (synthetic tasks at several difficulties, or train/val/test feature files
from the CLIP pipeline), each K and each seed: sample K shots per class from the train pool and
min(K, 4) from the val pool (:mod:`fma_fast.core.protocol`), fit every method, choose its
hyper-parameters on val, and score the full test split. Writes a markdown summary, the raw
numbers as JSON and (with matplotlib, the ``plot`` extra) two PNG plots, all atomically.

An experiment, not the library: nothing in :mod:`fma_fast`'s core imports it.
"""

from .aggregate import PAIRS, aggregate, mean_std
from .plots import write_plots
from .render import render_markdown
from .runner import draw, file_pools, rerender, run_one, run_report, synthetic_pools, write_report
from .settings import METHODS, PLOTTED, ReportSettings, add_arguments, from_arguments

__all__ = [
    "METHODS",
    "PAIRS",
    "PLOTTED",
    "ReportSettings",
    "add_arguments",
    "aggregate",
    "draw",
    "file_pools",
    "from_arguments",
    "mean_std",
    "render_markdown",
    "rerender",
    "run_one",
    "run_report",
    "synthetic_pools",
    "write_plots",
    "write_report",
]
