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
A step is compiled and checked in the grad mode it is called in (inference mode or not: dynamo
guards on it); should a guard still fail on a call, dynamo's new graph is built under the same
settings and its answer on that call's rows is compared with the eager step's before it is
used. A compiled module must not be called from two threads at once (measured: concurrent
calls corrupted each other's results), so the runtime runs its chunks on one thread, with
torch's intra-op threads (inductor's CPU code keeps the thread count it was compiled with).
``solve(backend="compiled")`` asks for this path; measurements of when it pays are in
``benchmarks/results/notes/cpu-speed.md``.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..core.policy import TOLERANCES
from ..ops.dispatch import BackendUnavailableError
from .plan import SolverPlan


class CompileUnavailable(BackendUnavailableError):
    """The compiled solve cannot run here: ``torch.compile`` cannot build a step (no inductor,
    no C++ compiler), or a compiled step does not give its eager step's answer. A backend that
    cannot run, like the kernels where Triton cannot: the CLI says so in one line."""


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
_LOCK = threading.RLock()
_STEPS: dict[int, list[_Step]] = {}  # by id of a full plan, dropped with it


def _raise_recompile_limit(graphs: int) -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), graphs))


def compiled_graphs() -> int:
    """Graphs ``torch.compile`` has built in this process (dynamo's counter)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


@contextmanager
def _compile_settings() -> Iterator[None]:
    """The settings every compile of a step runs under (``torch.compile(options=...)`` did not
    apply them: no autotuning ran), the first and any after a guard failure alike."""
    from torch._inductor import config as inductor_config

    with (inductor_config.patch(_INDUCTOR_SETTINGS),
          torch._dynamo.config.patch(fail_on_recompile_limit_hit=True)):
        yield


def _step_tensors(plan: SolverPlan, i: int) -> tuple[torch.Tensor, ...]:
    return (plan.input_weight, plan.input_bias, plan.w1[i], plan.b1[i], plan.w2[i],
            plan.b2[i], plan.wf[i], plan.bf[i])


def _grad_mode() -> tuple[bool, bool]:
    """What dynamo guards a step's graph on besides the input's shape: a step compiled in one
    of these modes recompiles when called in another."""
    return torch.is_inference_mode_enabled(), torch.is_grad_enabled()


class _Step:
    """Step ``i`` of a plan: its eager module (the twin), its compiled module, where its
    weights live (a plan's prefix shares them) and the (chunk rows, grad mode) it was checked
    at. Calling it runs the compiled module, and checks any graph a guard failure built."""

    def __init__(self, plan: SolverPlan, i: int):
        self.index = i
        self.eager = FrozenStep(plan, i).eval()
        self.compiled = torch.compile(self.eager, dynamic=False)
        self.weights = [t.data_ptr() for t in _step_tensors(plan, i)]
        self.checked: set[tuple[int, tuple[bool, bool]]] = set()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with _LOCK:
            before = compiled_graphs()
            got = self._run(x)
            if compiled_graphs() != before:  # a guard failed: a graph nobody checked yet
                _compare(self.index, got, self.eager, x)
                self.checked.add((x.shape[0], _grad_mode()))
            return got

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        try:
            with _compile_settings():
                return self.compiled(x)
        except Exception as error:  # noqa: BLE001 - inductor raises many types; say it plainly
            raise CompileUnavailable(
                f"torch.compile could not build step {self.index} of the compiled CPU solve "
                f"({type(error).__name__}: {_first_line(error)}); use backend='folded'"
            ) from error


def _first_line(error: BaseException, limit: int = 300) -> str:
    """The gist of a compiler error (inductor's run to pages of IR; the cause keeps them)."""
    text = (str(error).strip().splitlines() or [""])[0]
    return text if len(text) <= limit else text[:limit] + " ..."


def _full_plan_steps(plan: SolverPlan) -> list[_Step]:
    """The steps kept for the full plan ``plan`` is a prefix of (``SolverPlan.prefix`` keeps
    it: a prefix is a new object at every lookup, and under inference mode its tensors are not
    even views), dropped when that plan is freed."""
    full = plan.full or plan
    if id(full) not in _STEPS:
        _STEPS[id(full)] = []
        weakref.finalize(full, _STEPS.pop, id(full), None)
    return _STEPS[id(full)]


def compiled_steps(plan: SolverPlan, chunk_rows: int) -> list[_Step]:
    """The compiled steps of a bf16 CPU ``plan`` for (``chunk_rows``, D) inputs, each compiled
    and checked against its eager step in the caller's grad mode on first use and kept while
    the plan lives. Raises :class:`CompileUnavailable` naming the step that cannot compile or
    gives another answer than its eager step."""
    if plan.dtype != torch.bfloat16 or plan.device.type != "cpu":
        raise ValueError(f"the compiled solve is for bf16 plans on the CPU, got {plan.dtype} "
                         f"on {plan.device}")
    with _LOCK, torch.no_grad():  # one compile at a time, in the mode the steps run in
        steps = _full_plan_steps(plan)
        for i in range(plan.steps):
            weights = [t.data_ptr() for t in _step_tensors(plan, i)]
            if i == len(steps) or steps[i].weights != weights:
                _raise_recompile_limit(8 * plan.steps + 8)
                steps[i:i + 1] = [_Step(plan, i)]
            if (chunk_rows, _grad_mode()) not in steps[i].checked:
                _compile_and_check(steps[i], chunk_rows, plan.dim)
        return steps[:plan.steps]


def _compile_and_check(step: _Step, rows: int, dim: int) -> None:
    """Compile ``step`` for (rows, dim) inputs on this thread, in the grad mode it runs in,
    and compare it with its eager module on a probe batch of unit rows."""
    probe = F.normalize(
        torch.randn(rows, dim, generator=torch.Generator().manual_seed(step.index)), dim=-1)
    _compare(step.index, step._run(probe), step.eager, probe)
    step.checked.add((rows, _grad_mode()))


def _compare(i: int, got: torch.Tensor, eager: FrozenStep, x: torch.Tensor) -> None:
    """Refuse compiled step ``i``'s answer ``got`` on ``x`` (a probe, or the rows of the call
    a guard failure recompiled on) unless its largest error is within
    bf16's relative tolerance of the eager step's largest displacement."""
    with torch.no_grad():
        expected = eager(x)
    moved = float((expected - x).abs().max())
    error = float((got - expected).abs().max()) if got.shape == expected.shape else math.inf
    rtol = TOLERANCES[torch.bfloat16].rtol
    if not error <= rtol * moved:  # (NaN fails too)
        raise CompileUnavailable(
            f"compiled step {i} does not give its eager step's answer on a batch of "
            f"{x.shape[0]} rows: max error {error:.3g} against a displacement of {moved:.3g} "
            f"(tolerance {rtol:g} of it); use backend='folded'"
        )
