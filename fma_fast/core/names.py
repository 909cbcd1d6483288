"""The vocabulary, defined once: the names a caller passes to choose a backend, a precision, an
autocast, a schedule or a noise form (each a ``Literal`` for type hints and the tuple of its
values), the names of the paths that ran, and :func:`check_choice`, the one check of a choice.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, get_args

Backend = Literal["auto", "reference", "folded", "triton", "compiled"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
"""``solve`` / ``select_steps`` / ``score``: "auto" the fastest exact path, "reference" the
plain PyTorch loop, "folded" the torch GEMM chain of the folded plan, "triton" the fused
kernels, "compiled" the folded plan's steps as ``torch.compile``d modules (bf16 on the CPU;
minutes of compiling per plan, so only asked for, never chosen by "auto")."""

OpBackend = Literal["auto", "triton", "reference"]
OP_BACKENDS: tuple[OpBackend, ...] = get_args(OpBackend)
"""One op of :mod:`fma_fast.ops.dispatch` (and ``fit``'s training pair and loss): "auto" the
kernel where it runs, "triton" the kernel or an error, "reference" the PyTorch twin."""

Precision = Literal["fp32", "bf16", "fp16"]
PRECISIONS: tuple[Precision, ...] = get_args(Precision)
"""Solve precisions: the dtype of the folded weights and GEMM inputs (accumulation, residual
stream and LayerNorm statistics stay fp32; :data:`~fma_fast.core.policy.PRECISION_DTYPES`).
fp16 is for CUDA: CPUs have no fast fp16 GEMM."""

Amp = Literal["auto", "fp32", "fp16", "bf16"]
AMPS: tuple[Amp, ...] = get_args(Amp)
"""Autocast of ``fit`` and of the CLIP encoder: "auto" (fp16 on CUDA, none on the CPU),
"fp32" (no autocast), "fp16" or "bf16"."""

AMP_ALIASES = {"off": "fp32"}
"""``fit``'s earlier name of no autocast, still accepted (``fit(amp="off")``, ``--amp off``)
so that existing scripts keep running; it is read as "fp32" and recorded so."""

Schedule = Literal["released", "warmup-cosine"]
SCHEDULES: tuple[Schedule, ...] = get_args(Schedule)
"""``fit``'s learning-rate schedules (docs/method.md §8): "released" replays the released
training loop step for step, "warmup-cosine" is a linear warm-up then a per-step cosine."""

NoiseForm = Literal["bridge", "endpoint"]
NOISE_FORMS: tuple[NoiseForm, ...] = get_args(NoiseForm)
"""The noise of the training pair: the released code's Brownian bridge, or the paper's
endpoint noise (docs/method.md §1)."""

# What ran: the parts of ``SolveResult.path`` and ``FitResult.config["path"]``.
NETWORK_REFERENCE = "reference"
NETWORK_GENERIC = "generic"
NETWORK_FOLDED = "folded"
NETWORK_FUSED = "fused-triton"
NETWORK_COMPILED = "folded-compiled"
"""The folded plan's steps as torch.compile'd modules on the CPU (``fma_fast.solver.compiled``)."""
NETWORK_FALLBACK = "folded-fallback"
"""The fused kernels cannot run on this GPU, so the folded plan's torch GEMM chain runs."""
SCORING_TILED = "torch-tiled"
"""Scoring in torch class tiles (:mod:`fma_fast.ops.scoring`)."""
PER_ROW_SCORING = "per-row-tables"
"""Scoring against a class table per row (:class:`~fma_fast.PerRowClasses`)."""

PATH_TRITON = "triton"
PATH_INTERPRETER = "triton-interpreter"
PATH_REFERENCE = "reference"
PATH_FALLBACK = "torch-fallback"
"""The paths of one dispatched op: its kernel (natively or in Triton's interpreter), its
PyTorch twin, or the twin after the kernel failed to launch."""


def check_choice(argument: str, value, choices: Iterable, *,
                 error: type[Exception] = ValueError):
    """``value`` when it is one of ``choices``; else ``error`` naming ``argument``, the choices
    and the value given."""
    choices = tuple(choices)
    if value not in choices:
        raise error(f"{argument} must be one of {choices}, got {value!r}")
    return value


def check_amp(argument: str, value) -> Amp:
    """An autocast name of :data:`AMPS` (an alias of :data:`AMP_ALIASES` read as its name)."""
    if isinstance(value, str):
        value = AMP_ALIASES.get(value, value)
    return check_choice(argument, value, AMPS)
