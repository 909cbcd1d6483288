"""The compiled bf16 CPU solve: each step of a folded plan as a ``torch.compile``d module.

Inductor settings and why:

- ``freezing``: the step's folded weights become graph constants, so oneDNN gets them
  prepacked once instead of repacking a weight per GEMM call.
- ``max_autotune`` with the ``CPP`` and ``ATEN`` GEMM backends: per GEMM shape inductor times
  its AMX micro-kernel templates (whose epilogues can take the bias, SiLU, casts and residual
  add) against oneDNN's linear and keeps the faster.
- ``fx_graph_cache`` off: inductor's FX graph cache keys a frozen graph by its frozen weights'
  shapes and dtypes only, yet stores with the compiled graph the constants it derived from
  their values while compiling (the CPP GEMM template's packed weights). Every step of a plan
  (and every model of the same shapes, in any later process) then hits the first step's entry
  and runs with its packed weights: wrong numbers from the second step on. Where freezing packs
  the weights for oneDNN (mkldnn tensors, which the cache cannot pickle: CPUs with bf16 GEMMs)
  the cache skips these graphs, which hid the defect; without AVX-512 it was hit. Every
  process thus compiles its steps afresh; the C++ builds and the autotuning choices, which do
  not depend on the weights' values, still come from inductor's on-disk caches.
- static shapes (every chunk is padded to the chunk rows compiled for) and dynamo's recompile
  limit raised to one graph per step and chunk size; hitting it raises instead of quietly
  running the step eagerly.

Each step is its own graph (its weights are its constants), so the compile cost grows with M
and is paid once per plan, chunk size and process; a solve of fewer steps reuses the first
steps of the plan it is a prefix of. Whatever the torch version and CPU, each compiled step is
compared with its eager module on a probe batch of the compiled shape before its first use,
and :class:`CompileUnavailable` is raised, naming the step, rather than wrong numbers returned.
A compiled module must not be called from two threads at once (measured: concurrent calls
corrupted each other's results), so the runtime runs its chunks on one thread, with torch's
intra-op threads (inductor's CPU code keeps the thread count it was compiled with).
``solve(backend="compiled")`` asks for this path; measurements of when it pays are in
``benchmarks/results/notes/cpu-speed.md``.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..core.policy import TOLERANCES
from .plan import SolverPlan


class CompileUnavailable(RuntimeError):
    """The compiled solve cannot run here: ``torch.compile`` cannot build a step (no inductor,
    no C++ compiler), or a compiled step does not give its eager step's answer."""


class FrozenStep(nn.Module):
    """Step ``i`` of a bf16 plan: x -> x + u_i(x), the folded chain with the weights held as
    (frozen) parameters in ``nn.Linear`` layout."""

    def __init__(self, plan: SolverPlan, i: int):
        super().__init__()

        def constant(tensor: torch.Tensor) -> nn.Parameter:
            return nn.Parameter(tensor.detach().contiguous(), requires_grad=False)

        self.eps = plan.eps
        self.input_weight = constant(plan.input_weight.t().to(plan.dtype))
        self.input_bias = constant(plan.input_bias.to(plan.dtype))
        self.w1 = nn.ParameterList(constant(w.t()) for w in plan.w1[i])
        self.b1 = nn.ParameterList(constant(b) for b in plan.b1[i])
        self.w2 = nn.ParameterList(constant(w.t()) for w in plan.w2[i])
        self.b2 = nn.ParameterList(constant(b) for b in plan.b2[i])
        self.wf, self.bf = constant(plan.wf[i].t()), constant(plan.bf[i])

    def _normed(self, hidden: torch.Tensor) -> torch.Tensor:
        scale = torch.rsqrt(hidden.square().mean(dim=1, keepdim=True) + self.eps)
        return (hidden * scale).to(self.wf.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.linear(x.to(self.wf.dtype), self.input_weight, self.input_bias).float()
        for w1, b1, w2, b2 in zip(self.w1, self.b1, self.w2, self.b2):
            inner = F.silu(F.linear(self._normed(hidden), w1, b1))
            hidden = hidden + F.linear(inner, w2, b2).float()
        return x + F.linear(self._normed(hidden), self.wf, self.bf).float()


_INDUCTOR_SETTINGS = {"freezing": True, "max_autotune": True,
                      "max_autotune_gemm_backends": "CPP,ATEN", "fx_graph_cache": False}
_LOCK = threading.Lock()
_STEPS: dict[int, list[_Step]] = {}  # by id of a full plan's tensor, dropped with it


def _raise_recompile_limit(graphs: int) -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), graphs))


def _step_tensors(plan: SolverPlan, i: int) -> tuple[torch.Tensor, ...]:
    return (plan.input_weight, plan.input_bias, plan.w1[i], plan.b1[i], plan.w2[i],
            plan.b2[i], plan.wf[i], plan.bf[i])


class _Step:
    """Step ``i`` of a plan: its eager module (the twin), its compiled module, where its
    weights live (a plan's prefix shares them) and the chunk rows it was checked at."""

    def __init__(self, plan: SolverPlan, i: int):
        self.eager = FrozenStep(plan, i).eval()
        self.compiled = torch.compile(self.eager, dynamic=False)
        self.weights = [t.data_ptr() for t in _step_tensors(plan, i)]
        self.checked: set[int] = set()


def _full_plan_steps(plan: SolverPlan) -> list[_Step]:
    """The steps kept for the plan whose first steps ``plan`` is: a prefix
    (``SolverPlan.prefix``) holds views of its full plan's tensors, so they are kept by the
    base tensor of its weights and dropped when that is freed."""
    base = plan.wf if plan.wf._base is None else plan.wf._base
    if id(base) not in _STEPS:
        _STEPS[id(base)] = []
        weakref.finalize(base, _STEPS.pop, id(base), None)
    return _STEPS[id(base)]


def compiled_steps(plan: SolverPlan, chunk_rows: int
                   ) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The compiled step modules of a bf16 CPU ``plan`` for (``chunk_rows``, D) inputs, each
    compiled and checked against its eager step on first use and kept while the plan lives.
    Raises :class:`CompileUnavailable` naming the step that cannot compile or gives another
    answer than its eager step."""
    if plan.dtype != torch.bfloat16 or plan.device.type != "cpu":
        raise ValueError(f"the compiled solve is for bf16 plans on the CPU, got {plan.dtype} "
                         f"on {plan.device}")
    with _LOCK:  # one compile at a time: a step's first call compiles it
        steps = _full_plan_steps(plan)
        for i in range(plan.steps):
            weights = [t.data_ptr() for t in _step_tensors(plan, i)]
            if i == len(steps) or steps[i].weights != weights:
                _raise_recompile_limit(4 * plan.steps + 8)
                steps[i:i + 1] = [_Step(plan, i)]
            if chunk_rows not in steps[i].checked:
                _compile_and_check(i, steps[i], chunk_rows, plan.dim)
        return [step.compiled for step in steps[:plan.steps]]


def _compile_and_check(i: int, step: _Step, rows: int, dim: int) -> None:
    """Compile step ``i`` for (rows, dim) inputs on this thread, under the inductor settings
    above (``torch.compile(options=...)`` did not apply them: no autotuning ran), and compare
    it with its eager module on a probe batch of unit rows: the largest error must be within
    bf16's relative tolerance of the step's largest displacement."""
    from torch._inductor import config as inductor_config

    probe = F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(i)),
                        dim=-1)
    try:
        with (torch.no_grad(), inductor_config.patch(_INDUCTOR_SETTINGS),
              torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)):
            got = step.compiled(probe)
    except Exception as error:  # noqa: BLE001 - inductor raises many types; say it plainly
        raise CompileUnavailable(
            f"torch.compile could not build step {i} of the compiled CPU solve "
            f"({type(error).__name__}: {error}); use backend='folded'"
        ) from error
    with torch.no_grad():
        expected = step.eager(probe)
    moved = float((expected - probe).abs().max())
    error = float((got - expected).abs().max()) if got.shape == expected.shape else math.inf
    rtol = TOLERANCES[torch.bfloat16].rtol
    if not error <= rtol * moved:  # (NaN fails too)
        raise CompileUnavailable(
            f"compiled step {i} does not give its eager step's answer on a probe batch of "
            f"{rows} rows: max error {error:.3g} against a displacement of {moved:.3g} "
            f"(tolerance {rtol:g} of it); use backend='folded'"
        )
    step.checked.add(rows)
