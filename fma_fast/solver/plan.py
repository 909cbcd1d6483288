"""The folded solver plan: its algebra, its build and its cache (docs/method.md §3).

At inference every row shares the time t of a step, so the time embedding and every adaLN
output are per-step constants. They fold, with the LayerNorm affine, the gate and the step size
h, into per-step weights; one Euler step is then a chain of plain GEMMs with LayerNorm
statistics, SiLU and residual adds between them (52·D² instead of 128·D² FLOP per row). The
runtimes that run a plan are :mod:`fma_fast.solver.cpu` (the torch GEMM chain; its steps
compiled: :mod:`fma_fast.solver.compiled`) and :mod:`fma_fast.solver.fused` (Triton kernels).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as nn_module

from ..core import validation as check
from ..core.environment import device_memory
from ..core.model import (
    TIME_FREQUENCY_DIM,
    FinalLayer,
    ResBlock,
    TimestepEmbedder,
    VelocityNet,
    timestep_embedding,
)
from ..core.names import PRECISIONS, check_choice
from ..core.policy import DEFAULT_STEP_SIZE, PRECISION_DTYPES


@dataclass(frozen=True, eq=False)
class SolverPlan:
    """Folded weights for ``steps`` Euler steps of size ``step_size`` from t=0.

    Matrices are stored (in, out) so a product is ``rows @ weight``. Per step i and block b:
    ``w1[i, b]``/``b1[i, b]`` (LN affine, (1+scale) and shift folded in), ``w2[i, b]``/``b2[i, b]``
    (gate folded in), ``wf[i]``/``bf[i]`` (final (1+scale), shift and h folded in);
    ``input_weight``/``input_bias`` are step-independent and always fp32 (the GPU path feeds
    them fp32 features; the CPU bf16 path casts them once per solve); the rest is in the plan's
    dtype. A fp32 plan holds about 2·M·blocks·W² floats (250 MB at D=512, 12 blocks, M=10).
    ``times`` holds the fp32 t of each step, accumulated as the reference does.

    The hidden state is only ever read through a LayerNorm, which ignores its per-row mean, so
    the Linears that write it (input projection and ``w2``) are centred over their outputs: the
    hidden state stays mean-free and LayerNorm becomes one scaling by 1/rms, with no mean pass.

    For the final state alone (``solver.cpu.folded_final`` in fp32, the only user, so they
    are built only with ``final_only=True``) the final layer of step i and the input
    projection of step i+1 are one product: with u_i the normalised last hidden state,
    ``wf[i] = diag(final_scale[i])·final_weight``, so x_i·W_in advances by
    ``u_i @ feedback[i]`` (``feedback[i] = wf[i] @ input_weight``) and
    x_M = x_0 + (Σ u_i ⊙ final_scale[i]) @ final_weight + ``bias_sums[M-1]``; ``offsets[i]``
    is ``input_bias`` plus the projected biases of the steps before i.
    """

    steps: int
    step_size: float
    eps: float
    times: torch.Tensor
    input_weight: torch.Tensor
    input_bias: torch.Tensor
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    wf: torch.Tensor
    bf: torch.Tensor
    feedback: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    final_scale: torch.Tensor | None = None
    final_weight: torch.Tensor | None = None
    bias_sums: torch.Tensor | None = None
    full: SolverPlan | None = None
    """The plan this one is a :meth:`prefix` of (None for a full plan): what is kept per plan
    (``solver.compiled``) is kept by it, as a prefix is a new object at every lookup."""

    @property
    def final_only(self) -> bool:
        """Whether the fields of the final-state-only path (``feedback`` ...) were built."""
        return self.feedback is not None

    @property
    def dim(self) -> int:
        return self.input_weight.shape[0]

    @property
    def width(self) -> int:
        return self.input_weight.shape[1]

    @property
    def blocks(self) -> int:
        return self.w1.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.wf.dtype

    @property
    def device(self) -> torch.device:
        return self.wf.device

    def prefix(self, steps: int) -> SolverPlan:
        """The plan of the first ``steps`` steps (views, no copy): t does not depend on M."""
        if not 0 <= steps <= self.steps:
            raise ValueError(f"steps must lie in [0, {self.steps}] for this plan, got {steps}")
        if steps == self.steps:
            return self

        def first(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor[:steps]

        return SolverPlan(
            steps, self.step_size, self.eps, self.times[:steps], self.input_weight,
            self.input_bias, self.w1[:steps], self.b1[:steps], self.w2[:steps],
            self.b2[:steps], self.wf[:steps], self.bf[:steps], first(self.feedback),
            first(self.offsets), first(self.final_scale), self.final_weight,
            first(self.bias_sums), self.full or self,
        )


_CALL_NAMES = ("forward", "__call__", "_call_impl", "_wrapped_call_impl")
"""Attributes through which a module's call could differ from the class the fold reads."""

_FOLDED_CLASSES = (VelocityNet, TimestepEmbedder, ResBlock, FinalLayer, nn.Linear,
                   nn.LayerNorm, nn.SiLU, nn.Sequential, nn.ModuleList, nn.Module)
_CALLS_AT_IMPORT = {(cls, name): getattr(cls, name, None)
                    for cls in _FOLDED_CLASSES for name in _CALL_NAMES}
"""The call methods of the classes whose math the fold reproduces, as they were when fma_fast
was imported: a class patched later (``ResBlock.forward = ...``) computes something else."""


def _replaced_call() -> str | None:
    for (cls, name), method in _CALLS_AT_IMPORT.items():
        if getattr(cls, name, None) is not method:
            return f"{cls.__name__}.{name} was replaced after fma_fast was imported"
    return None


def _built_modules(dim: int, blocks: int, width: int) -> dict[str, tuple[type, tuple]]:
    """Every submodule of ``VelocityNet(dim, blocks, width)`` by name: its exact type and, for
    Linears and LayerNorms, the (in, out) / (width,) shape the fold reads."""
    def mlp(prefix: str, first: tuple, second: tuple) -> dict:
        return {prefix: (nn.Sequential, ()), f"{prefix}.0": (nn.Linear, first),
                f"{prefix}.1": (nn.SiLU, ()), f"{prefix}.2": (nn.Linear, second)}

    def modulation(prefix: str, chunks: int) -> dict:
        return {prefix: (nn.Sequential, ()), f"{prefix}.0": (nn.SiLU, ()),
                f"{prefix}.1": (nn.Linear, (width, chunks * width))}

    built = {"time_embed": (TimestepEmbedder, ()),
             **mlp("time_embed.mlp", (TIME_FREQUENCY_DIM, width), (width, width)),
             "input_proj": (nn.Linear, (dim, width)), "res_blocks": (nn.ModuleList, ())}
    for b in range(blocks):
        name = f"res_blocks.{b}"
        built |= {name: (ResBlock, ()), f"{name}.in_ln": (nn.LayerNorm, (width,)),
                  **mlp(f"{name}.mlp", (width, width), (width, width)),
                  **modulation(f"{name}.adaLN_modulation", 3)}
    return built | {"final_layer": (FinalLayer, ()),
                    "final_layer.norm_final": (nn.LayerNorm, (width,)),
                    "final_layer.linear": (nn.Linear, (width, dim)),
                    **modulation("final_layer.adaLN_modulation", 2)}


def _module_problem(name: str, module: nn.Module, kind: type, shape: tuple, eps: float
                    ) -> str | None:
    where = name or "the model"
    if kind is not VelocityNet and type(module) is not kind:
        return f"{where} is a {type(module).__name__}, not the {kind.__name__} it is built with"
    overridden = [n for n in _CALL_NAMES if n in vars(module)]
    if overridden:
        return f"{where} has its own {overridden[0]} set on the instance"
    if module._forward_hooks or module._forward_pre_hooks:
        return f"{where} has forward hooks"
    if kind is nn.Linear and (module.bias is None or tuple(module.weight.shape) != shape[::-1]
                              or tuple(module.bias.shape) != shape[1:]):
        return f"{where} is not a Linear {shape[0]} -> {shape[1]} with a bias"
    if kind is nn.LayerNorm:
        affine = name.endswith("in_ln")
        if (tuple(module.normalized_shape) != shape or module.eps != eps
                or module.elementwise_affine != affine
                or affine and (module.bias is None or module.weight.shape != shape
                               or module.bias.shape != shape)):
            return f"{where} is not the LayerNorm({shape[0]}, eps={eps}) it is built with"
    if kind is nn.SiLU and module.inplace:
        return f"{where} is an in-place SiLU"
    return None


def fold_problem(model: nn.Module) -> str | None:
    """Why folding ``model`` would not reproduce ``model(x, t)``, or None when it would.

    The fold reads the weights of the modules a :class:`VelocityNet` is built with and runs the
    math of their ``forward``; it cannot see anything else that changes a call. So it folds
    only a VelocityNet (or a subclass that overrides no call method) whose submodules are
    exactly the types and shapes it is built with, one LayerNorm eps throughout, no in-place
    SiLU, no method set on an instance or replaced on one of those classes since import, and
    no forward hooks (the global ones included).
    Anything else runs as given (``routing``) or is refused (``build_plan``).
    """
    if not isinstance(model, VelocityNet):
        return f"{type(model).__name__} is not a VelocityNet"
    for cls in type(model).__mro__[:type(model).__mro__.index(VelocityNet)]:
        overridden = [n for n in _CALL_NAMES if n in vars(cls)]
        if overridden:
            return f"{cls.__name__} overrides {overridden[0]}"
    if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
        return "global module forward hooks are registered"
    replaced = _replaced_call()
    if replaced:
        return replaced
    built = {"": (VelocityNet, ())} | _built_modules(model.dim, model.blocks, model.width)
    modules = dict(model.named_modules())
    if modules.keys() != built.keys():
        extra = sorted(modules.keys() - built.keys()) or sorted(built.keys() - modules.keys())
        return f"its submodules differ from those it is built with (first: {extra[0]})"
    eps = model.final_layer.norm_final.eps
    for name, module in modules.items():
        problem = _module_problem(name, module, *built[name], eps)
        if problem:
            return problem
    return None


def _check_foldable(model: nn.Module) -> None:
    if not isinstance(model, VelocityNet):
        raise TypeError(f"model must be a VelocityNet, got {type(model).__name__}")
    problem = fold_problem(model)
    if problem:
        raise ValueError(f"the model cannot be folded ({problem}): the fold would ignore "
                         "that; solve it with backend='auto' or 'reference' (runs it as given)")


def step_times(steps: int, step_size: float) -> torch.Tensor:
    """The fp32 t of each step exactly as ``reference.euler_solve`` accumulates it (t += h)."""
    t = torch.zeros((), dtype=torch.float32)
    times = []
    for _ in range(steps):
        times.append(t)
        t = t + step_size
    return torch.stack(times) if times else torch.zeros(0, dtype=torch.float32)


def check_plan_fits(model: VelocityNet, steps: int, dtype: torch.dtype, device) -> None:
    """Refuse, before any work, a plan larger than the memory of the device it is built on:
    M in the millions would otherwise fail to allocate, or loop for minutes first."""
    width, dim = model.width, model.dim
    per_step = 2 * model.blocks * width * (width + 1) + width * (width + dim) + dim
    need = steps * per_step * torch.empty(0, dtype=dtype).element_size()
    device = torch.device(device)
    total = device_memory(device)
    if total is not None and need > total:
        raise ValueError(f"steps={steps}: the folded plan of {steps} steps needs "
                         f"{need / 2**30:,.1f} GiB, more than the {total / 2**30:,.1f} GiB of "
                         f"{device}; use fewer steps")


def _centred(weight: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Subtract the mean over outputs (dim 0 of a Linear weight, the last dim of a bias)."""
    return weight - weight.mean(dim=dim, keepdim=True)


def _f64(tensor: torch.Tensor, source: torch.device) -> torch.Tensor:
    return tensor.detach().to(source, torch.float64)


def _modulation(layer: torch.nn.Linear, silu_y: torch.Tensor, chunks: int
                ) -> tuple[torch.Tensor, ...]:
    """An adaLN layer's outputs for every step at once, (M, W) each."""
    source = silu_y.device
    return F.linear(silu_y, _f64(layer.weight, source), _f64(layer.bias, source)).chunk(
        chunks, dim=-1)


def _time_inputs(model: VelocityNet, times: torch.Tensor) -> torch.Tensor:
    """SiLU of the time embedding of every step, (M, W) in float64: every adaLN layer's input."""
    source, t_mlp = times.device, model.time_embed.mlp
    y = F.linear(timestep_embedding(times).double(), _f64(t_mlp[0].weight, source),
                 _f64(t_mlp[0].bias, source))
    y = F.linear(F.silu(y), _f64(t_mlp[2].weight, source), _f64(t_mlp[2].bias, source))
    return F.silu(y)


def _fold_blocks(model: VelocityNet, silu_y: torch.Tensor, dtype: torch.dtype, device
                 ) -> dict[str, torch.Tensor]:
    """w1, b1, w2, b2 of every step and block: LayerNorm affine and (1 + scale) in W1's
    columns, shift in b1, the gate in W2 and b2, both centred over outputs."""
    steps, source = silu_y.shape[0], silu_y.device
    width, blocks = model.width, model.blocks
    fields = {name: torch.empty(steps, blocks, *shape, dtype=dtype, device=device)
              for name, shape in (("w1", (width, width)), ("b1", (width,)),
                                  ("w2", (width, width)), ("b2", (width,)))}
    w1, b1, w2, b2 = fields.values()
    for b, block in enumerate(model.res_blocks):
        shift, scale, gate = _modulation(block.adaLN_modulation[-1], silu_y, 3)
        col_scale = _f64(block.in_ln.weight, source) * (1 + scale)  # (M, W): W1·diag(γ(1+scale))
        col_shift = _f64(block.in_ln.bias, source) * (1 + scale) + shift
        lin1, lin2 = _f64(block.mlp[0].weight, source), _f64(block.mlp[2].weight, source)
        for i in range(steps):  # one step at a time bounds the float64 working set
            w1[i, b] = (lin1 * col_scale[i]).T
            w2[i, b] = _centred(lin2 * gate[i, :, None]).T
        b1[:, b] = _f64(block.mlp[0].bias, source) + col_shift @ lin1.T
        b2[:, b] = _centred(gate * _f64(block.mlp[2].bias, source), dim=-1)
    return fields


def _fold_ends(model: VelocityNet, silu_y: torch.Tensor, step_size: float, dtype: torch.dtype,
               device, final_only: bool) -> dict[str, torch.Tensor]:
    """The input projection (centred) and the final layer with h folded in (wf, bf); with
    ``final_only`` also the fields of the fp32 final-state path."""
    steps, source = silu_y.shape[0], silu_y.device
    shift_f, scale_f = _modulation(model.final_layer.adaLN_modulation[-1], silu_y, 2)
    final = _f64(model.final_layer.linear.weight, source)
    final_scale = step_size * (1 + scale_f)  # (M, W)
    proj = model.input_proj
    projection = _centred(_f64(proj.weight, source)).T  # (D, W)
    wf = torch.empty(steps, model.width, model.dim, dtype=dtype, device=device)
    for i in range(steps):
        wf[i] = (final * final_scale[i]).T
    bias_f = step_size * (_f64(model.final_layer.linear.bias, source) + shift_f @ final.T)
    input_bias = _centred(_f64(proj.bias, source))

    def fp32(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device, torch.float32).contiguous()

    fields = {"input_weight": fp32(projection), "input_bias": fp32(input_bias), "wf": wf,
              "bf": bias_f.to(device, dtype)}
    if final_only:
        feedback = torch.empty(steps, model.width, model.width, dtype=dtype, device=device)
        for i in range(steps):
            feedback[i] = (final * final_scale[i]).T @ projection
        projected = bias_f @ projection
        fields.update(
            feedback=feedback,
            offsets=fp32(input_bias + projected.cumsum(0) - projected),
            final_scale=fp32(final_scale),
            final_weight=final.T.to(device, dtype).contiguous(),
            bias_sums=fp32(bias_f.cumsum(0)),
        )
    return fields


@torch.no_grad()
def build_plan(
    model: VelocityNet,
    steps: int,
    step_size: float = DEFAULT_STEP_SIZE,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    final_only: bool = False,
) -> SolverPlan:
    """Fold ``model`` for ``steps`` steps of size ``step_size`` (uncached; see :func:`solver_plan`).

    The sinusoid is taken in fp32 exactly as the model takes it; everything after it is computed
    in float64 and rounded once to ``dtype``, so a fp32 plan is exact to fp32 rounding.
    ``final_only`` also builds the fields of the fp32 final-state path (``feedback`` ...).
    """
    _check_foldable(model)
    steps = check.check_int("steps", steps, minimum=0)
    step_size = check.check_positive_float("step_size", step_size)
    check_choice("dtype", dtype, PRECISION_DTYPES.values())
    source = next(model.parameters()).device
    device = source if device is None else torch.device(device)
    check_plan_fits(model, steps, dtype, device)
    times = step_times(steps, step_size).to(source)
    # Time embedding and every adaLN output for all steps at once: (M, W), (M, 3W), (M, 2W).
    silu_y = _time_inputs(model, times)
    return SolverPlan(
        steps=steps,
        step_size=step_size,
        eps=model.final_layer.norm_final.eps,
        times=times.to(device),
        **_fold_blocks(model, silu_y, dtype, device),
        **_fold_ends(model, silu_y, step_size, dtype, device, final_only),
    )


_PLAN_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _WeightsSnapshot:
    """A copy of the parameters a plan was folded from, compared element by element on use.

    Version counters miss fused and foreach optimizer steps and every write through
    ``param.data``; comparing contents catches any change, whatever made it, for one read of
    the weights per lookup (far less than one step of a solve) and one copy of them in memory.
    """

    def __init__(self, params: list[torch.Tensor]):
        self.copies = [p.detach().clone() for p in params]

    def matches(self, params: list[torch.Tensor]) -> bool:
        return len(params) == len(self.copies) and all(
            p.shape == c.shape and p.dtype == c.dtype and p.device == c.device
            and torch.equal(p.detach(), c)
            for p, c in zip(params, self.copies)
        )


def solver_plan(
    model: VelocityNet,
    steps: int,
    step_size: float = DEFAULT_STEP_SIZE,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    final_only: bool = False,
) -> SolverPlan:
    """The folded plan of ``model``, built once and cached per (steps, step_size, dtype, device).

    A cached plan with more steps for the same step size serves fewer steps as a prefix view,
    and one with the final-only fields serves calls that do not need them.
    Every lookup compares the weights with the copy the plans were folded from and drops them
    on any difference (optimizer steps of any kind, ``load_state_dict``, in-place and
    ``param.data`` writes).
    """
    _check_foldable(model)  # at every lookup: hooks may come after a plan was cached
    steps = check.check_int("steps", steps, minimum=0)
    step_size = check.check_positive_float("step_size", step_size)
    device = next(model.parameters()).device if device is None else torch.device(device)
    params = list(model.parameters())
    entry = _PLAN_CACHE.get(model)
    if entry is None or not entry[0].matches(params):
        check_finite_weights(model)
        entry = (_WeightsSnapshot(params), {})
        _PLAN_CACHE[model] = entry
    plans = entry[1]
    key = (step_size, dtype, device)
    plan = plans.get(key)
    if plan is None or plan.steps < steps or (final_only and not plan.final_only):
        plan = build_plan(model, max(steps, plan.steps if plan else 0), step_size, dtype=dtype,
                          device=device, final_only=final_only or bool(plan and plan.final_only))
        plans[key] = plan
    return plan.prefix(steps)


def check_finite_weights(model: torch.nn.Module) -> None:
    """Refuse a network with NaN/Inf weights: it would give the same prediction for every row."""
    for name, parameter in model.named_parameters():
        if not bool(torch.isfinite(parameter.detach()).all()):
            raise ValueError(
                f"the model's weights contain NaN or Inf (first in {name}); "
                "it cannot give meaningful predictions (was training unstable?)"
            )


def clear_plan_cache(model: VelocityNet) -> None:
    """Forget the cached plans of ``model`` (frees their memory; never needed for correctness)."""
    _PLAN_CACHE.pop(model, None)


def resolve_plan(
    model: VelocityNet | SolverPlan, steps: int, step_size: float, precision: str, device,
    *, final_only: bool = False,
) -> SolverPlan:
    """The plan a runtime runs: ``model``'s cached plan, or ``model`` itself when it is a
    plan, checked against the steps, step size, precision and device asked for."""
    dtype = PRECISION_DTYPES[check_choice("precision", precision, PRECISIONS)]
    if isinstance(model, VelocityNet):
        return solver_plan(model, steps, step_size, dtype=dtype, device=device,
                           final_only=final_only)
    if not isinstance(model, SolverPlan):
        raise TypeError(f"model must be a VelocityNet or SolverPlan, got {type(model).__name__}")
    steps = check.check_int("steps", steps, minimum=0)
    if float(step_size) != model.step_size or steps > model.steps or dtype != model.dtype:
        raise ValueError(
            f"the plan is for up to {model.steps} steps of size {model.step_size} in "
            f"{model.dtype}, asked for {steps} steps of size {step_size} in {precision}"
        )
    if model.device != device:
        raise ValueError(f"the plan is on {model.device} but the features are on {device}")
    return model.prefix(steps)
