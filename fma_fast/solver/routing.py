"""Which implementation runs, decided in one place.

:func:`resolve` turns the options of a solve into a :class:`Route`: the network path (the
reference loop, any other velocity module as given (a VelocityNet too when the fold would
not reproduce its call: :func:`fma_fast.solver.plan.fold_problem`), the folded plan's torch GEMM
chain, or its fused Triton kernels) and how the states are scored. The rule shared by the
solve's Euler update and scoring ops, ``fit``'s training pair and loss and
``cosine_cross_entropy`` is :func:`~fma_fast.ops.dispatch.op_backend` (imported here): the
kernels on CUDA, the torch twins on the CPU, unless a backend is forced.

Internal module: the public functions take ``backend`` and ``precision`` strings.
"""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass

import torch
from torch import nn

from ..core import environment
from ..core import validation as check
from ..core.names import (
    BACKENDS,
    NETWORK_COMPILED,
    NETWORK_FALLBACK,
    NETWORK_FOLDED,
    NETWORK_FUSED,
    NETWORK_GENERIC,
    NETWORK_REFERENCE,
    PATH_REFERENCE,
    PRECISIONS,
    Backend,
    OpBackend,
    Precision,
    check_choice,
)
from ..core.policy import DEFAULT_STEP_SIZE, PRECISION_DTYPES, SOLVE_BATCH_ROWS
from ..kernels._common import HAS_TRITON
from ..ops import dispatch
from ..ops.dispatch import op_backend
from .fused import kernels_run
from .plan import fold_problem, solver_plan

BF16_CPU_REFUSAL = ("needs a CPU with BF16 units (AVX512_BF16 or AMX) or a CUDA device: without "
                    "them bf16 GEMMs are emulated, slower than fp32 (30x with AVX2 alone)")
EMULATED_BF16_ISAS = ("AVX512_CORE", "AVX512_CORE_VNNI")
"""``ONEDNN_MAX_CPU_ISA`` values that leave oneDNN a bf16 path without BF16 units (AVX-512 of
Skylake/Cascade Lake: emulated, slower than fp32); below them oneDNN has no bf16 path at all."""


@functools.cache
def cpu_bf16_units() -> bool:
    """Whether bf16 GEMMs run on BF16 units here: the CPU has them (AVX512_BF16 or AMX; on x86,
    where torch can tell) and the ISA oneDNN may use includes them (``ONEDNN_MAX_CPU_ISA``:
    masked to AVX2 oneDNN has no bf16 path, to ``AVX512_CORE`` an emulated one). The one rule
    for ``solve``'s bf16 and compiled paths on the CPU and for ``fit(amp="bf16")``; the
    measurements behind it are in ``benchmarks/results/notes/cpu-bf16-by-isa.md``."""
    if not environment.onednn_bf16():
        return False
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in EMULATED_BF16_ISAS:
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return True  # oneDNN's check is the units' check there (e.g. Arm's BF16 extension)
    units = environment.cpu_units()
    return bool(units["avx512_bf16"] or units["amx"])


@dataclass(frozen=True)
class SolveOptions:
    """How to solve, checked once: Euler step size, GEMM precision, backend, rows per batch
    (None: :data:`~fma_fast.core.policy.SOLVE_BATCH_ROWS` of the device) and compute device (None:
    the model's, else the features')."""

    step_size: float = DEFAULT_STEP_SIZE
    precision: Precision = "fp32"
    backend: Backend = "auto"
    batch_size: int | None = None
    device: str | torch.device | None = None

    def __post_init__(self) -> None:
        check.check_positive_float("step_size", self.step_size)
        check_choice("backend", self.backend, BACKENDS)
        check_choice("precision", self.precision, PRECISIONS)
        if self.backend == "reference" and self.precision != "fp32":
            raise ValueError(f"the reference runs in fp32 only, got precision={self.precision!r}")
        if self.batch_size is not None:
            check.check_int("batch_size", self.batch_size, minimum=1)


@dataclass(frozen=True)
class Route:
    """A resolved solve: the network path, the dispatch backend of the Euler update and the
    scoring ops, whether scoring runs in torch class tiles, and the numbers it runs with."""

    network: str
    op_backend: OpBackend
    tiled_scoring: bool
    precision: Precision
    step_size: float
    device: torch.device
    batch_size: int

    @property
    def dtype(self) -> torch.dtype:
        return PRECISION_DTYPES[self.precision]

    def path(self, scoring: str | None = None) -> str:
        """What ran, e.g. ``folded-fp32+torch-tiled-topk`` or ``fused-triton-bf16+triton-topk``
        (``reference`` alone for the plain loop scored by the plain twin)."""
        if self.network == NETWORK_REFERENCE and scoring in (None, PATH_REFERENCE):
            return NETWORK_REFERENCE
        network = self.network if self.network == NETWORK_REFERENCE else (
            f"{self.network}-{self.precision}")
        return network if scoring is None else f"{network}+{scoring}-topk"


def _model_device(model) -> torch.device | None:
    if isinstance(model, nn.Module):
        for parameter in model.parameters():
            return parameter.device
    return None


def _network(model, device: torch.device, precision: str, backend: str) -> str:
    """auto: a VelocityNet runs folded (docs/method.md §3), through the fused Triton kernels on
    CUDA and as a torch GEMM chain elsewhere; any other velocity module, and a VelocityNet whose
    call the fold would not reproduce (an overridden forward, hooks, replaced submodules),
    runs as given. Half precision on the CPU is refused where it would run slower than fp32
    (fp16 everywhere, bf16 without BF16 units: :func:`cpu_bf16_units`)."""
    if backend == "reference":
        return NETWORK_REFERENCE
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(
            "precision='fp16' needs a CUDA device (CPUs have no fast fp16 GEMM); "
            "use 'bf16' or 'fp32'"
        )
    if precision == "bf16" and device.type == "cpu" and not cpu_bf16_units():
        raise ValueError(f"precision='bf16' (and backend='compiled') {BF16_CPU_REFUSAL}; "
                         f"none in effect here (ISA {environment.cpu_isa()}); use precision='fp32'")
    problem = fold_problem(model)
    if problem:
        if backend in ("folded", "triton", "compiled"):
            raise ValueError(f"backend={backend!r} needs a VelocityNet the fold reproduces; "
                             f"this model cannot be folded: {problem}")
        return NETWORK_GENERIC
    if backend == "folded":
        return NETWORK_FOLDED
    if backend == "compiled":
        if device.type != "cpu" or precision != "bf16":
            raise ValueError(f"backend='compiled' is for precision='bf16' on the CPU, got "
                             f"precision={precision!r} on {device}")
        return NETWORK_COMPILED
    if backend == "triton":
        dispatch.select_path("triton", torch.empty(0, device=device))  # raises with the reason
        return NETWORK_FUSED
    return NETWORK_FUSED if device.type == "cuda" and HAS_TRITON else NETWORK_FOLDED


def resolve(
    model, options: SolveOptions, steps: int, features_device: torch.device,
    *, probe: bool = True,
) -> Route:
    """The route of a solve of ``steps`` steps; on CUDA the fused kernels are launched once
    here (one step, one row) and, where they cannot run, the torch chain is taken instead.
    ``probe=False`` leaves that launch to the caller (a differentiable solve makes it on its
    own folded weights, without the plan cache)."""
    device = check.resolve_device(options.device, default=_model_device(model) or features_device)
    network = _network(model, device, options.precision, options.backend)
    if network == NETWORK_FUSED and options.backend != "triton" and probe:
        plan = solver_plan(model, steps, options.step_size,
                           dtype=PRECISION_DTYPES[options.precision], device=device)
        network = NETWORK_FUSED if kernels_run(plan) else NETWORK_FALLBACK
    backend = op_backend(options.backend, device)
    return Route(
        network=network,
        op_backend=backend,
        tiled_scoring=backend == "reference" and options.backend != "reference",
        precision=options.precision,
        step_size=options.step_size,
        device=device,
        batch_size=options.batch_size or SOLVE_BATCH_ROWS.get(device.type, 4096),
    )
