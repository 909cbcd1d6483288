"""The compiled bf16 CPU solve: each step of a folded plan as a ``torch.compile``d module.

Inductor settings and why:

- ``freezing``: the step's folded weights become graph constants, so oneDNN gets them
  prepacked once instead of repacking a weight per GEMM call.
- ``max_autotune`` with the ``CPP`` and ``ATEN`` GEMM backends: per GEMM shape inductor times
  its AMX micro-kernel templates (whose epilogues can take the bias, SiLU, casts and residual
  add) against oneDNN's linear and keeps the faster.
- static shapes (every chunk has the runtime's chunk rows; a shorter last chunk compiles once
  more) and dynamo's recompile limit raised to one graph per step and chunk size.

Each step is its own graph (its weights are its constants), so the compile cost grows with M
and is paid once per plan and process; autotuning results and compiled kernels go to
inductor's on-disk cache (``TORCHINDUCTOR_CACHE_DIR``). A compiled module must not be called
from two threads at once (measured: concurrent calls corrupted each other's results), so the
runtime runs its chunks on one thread, with torch's intra-op threads (inductor's CPU code keeps
the thread count it was compiled with). ``solve(backend="compiled")`` asks for this path;
measurements of when it pays are in ``benchmarks/results/cpu-speed.md``.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .plan import SolverPlan


class CompileUnavailable(RuntimeError):
    """``torch.compile`` cannot build the compiled solve here (no inductor or no C++ compiler)."""


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
                      "max_autotune_gemm_backends": "CPP,ATEN"}
_LOCK = threading.Lock()
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _raise_recompile_limit(graphs: int) -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed across torch versions
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), graphs))


def compiled_steps(plan: SolverPlan) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """The compiled step modules of a bf16 CPU ``plan``, built on first use and kept while
    the plan lives. Compiling happens at a step's first call (see :func:`warm`)."""
    if plan.dtype != torch.bfloat16 or plan.device.type != "cpu":
        raise ValueError(f"the compiled solve is for bf16 plans on the CPU, got {plan.dtype} "
                         f"on {plan.device}")
    with _LOCK:
        steps = _STEPS.get(plan)
        if steps is None:
            _raise_recompile_limit(4 * plan.steps + 8)
            steps = [torch.compile(FrozenStep(plan, i).eval(), dynamic=False)
                     for i in range(plan.steps)]
            _STEPS[plan] = steps
    return steps


def warm(steps: list[Callable], chunk: torch.Tensor) -> None:
    """Compile every step for ``chunk``'s shape on this thread, under the inductor settings above
    (``torch.compile(options=...)`` did not apply them: no autotuning ran). Raises
    :class:`CompileUnavailable`."""
    from torch._inductor import config as inductor_config

    try:
        with torch.no_grad(), inductor_config.patch(_INDUCTOR_SETTINGS):
            for step in steps:
                step(chunk)
    except Exception as error:  # noqa: BLE001 - inductor raises many types; say it plainly
        raise CompileUnavailable(
            f"torch.compile could not build the compiled CPU solve ({type(error).__name__}: "
            f"{error}); use backend='folded'"
        ) from error
