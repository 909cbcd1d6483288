"""Folded solver plan and the fast CPU solve path (FMA_FACTS §3).

At inference every row shares the time t of a step, so the time embedding and every adaLN
output are per-step constants. They fold, with the LayerNorm affine, the gate and the step size
h, into per-step weights; one Euler step is then a chain of plain GEMMs with LayerNorm
statistics, SiLU and residual adds between them (52·D² instead of 128·D² FLOP per row).
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import _validation as check
from .model import VelocityNet, timestep_embedding

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Compute precisions of :func:`folded_solve`: the dtype of the folded weights and GEMM inputs
(bf16 GEMMs accumulate in fp32). The features, the hidden residual stream and the LayerNorm
statistics stay fp32 in all; in bf16/fp16 each GEMM output is rounded before it is added.
fp16 is for CUDA (the fused Triton path); CPUs have no fast fp16 GEMM."""

DEFAULT_CHUNK_ROWS = 1024
"""Most rows one CPU worker advances through a step at a time (bounds the work buffers).

On the CPU the rows are split into chunks of at most this many rows (and at least one per
worker); each of ``workers`` threads takes the next chunk with torch's intra-op threads at 1.
Measured on the 2-core AVX-512/AMX CPU at D=512, 12 blocks, N=4096, 2 workers
(``FMA_BENCH_SWEEP=1 python benchmarks/run.py -k "sweep and full"``, two sweeps, the last in
benchmarks/results/): 1024-4096 rows are equal within noise in fp32 and bf16 (2048 and 4096
give the same two chunks here, and differed by up to 8%); 512 rows is 2-7% (fp32) and 3-20%
(bf16) slower, 256 rows 8-11% and 17-26%. More chunks than workers lets a worker on a
free core take over the rows of one whose core is busy."""

MIN_WORKER_ROWS = 128
"""Smallest chunk the rows are split into for workers: smaller GEMMs run too inefficiently."""


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

    For the final state alone (:func:`folded_final`) the final layer of step i and the input
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
    feedback: torch.Tensor
    offsets: torch.Tensor
    final_scale: torch.Tensor
    final_weight: torch.Tensor
    bias_sums: torch.Tensor

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
        return SolverPlan(
            steps, self.step_size, self.eps, self.times[:steps], self.input_weight,
            self.input_bias, self.w1[:steps], self.b1[:steps], self.w2[:steps],
            self.b2[:steps], self.wf[:steps], self.bf[:steps], self.feedback[:steps],
            self.offsets[:steps], self.final_scale[:steps], self.final_weight,
            self.bias_sums[:steps],
        )


def step_times(steps: int, step_size: float) -> torch.Tensor:
    """The fp32 t of each step exactly as ``reference.euler_solve`` accumulates it (t += h)."""
    t = torch.zeros((), dtype=torch.float32)
    times = []
    for _ in range(steps):
        times.append(t)
        t = t + step_size
    return torch.stack(times) if times else torch.zeros(0, dtype=torch.float32)


def _centred(weight: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Subtract the mean over outputs (dim 0 of a Linear weight, the last dim of a bias)."""
    return weight - weight.mean(dim=dim, keepdim=True)


@torch.no_grad()
def build_plan(
    model: VelocityNet,
    steps: int,
    step_size: float = 0.1,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> SolverPlan:
    """Fold ``model`` for ``steps`` steps of size ``step_size`` (uncached; see :func:`solver_plan`).

    The sinusoid is taken in fp32 exactly as the model takes it; everything after it is computed
    in float64 and rounded once to ``dtype``, so a fp32 plan is exact to fp32 rounding.
    """
    if not isinstance(model, VelocityNet):
        raise TypeError(f"model must be a VelocityNet, got {type(model).__name__}")
    steps = check.check_int("steps", steps, minimum=0)
    step_size = check.check_positive_float("step_size", step_size)
    if dtype not in PRECISIONS.values():
        raise ValueError(f"dtype must be one of {list(PRECISIONS.values())}, got {dtype}")
    source = next(model.parameters()).device
    device = source if device is None else torch.device(device)

    def f64(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to(source, torch.float64)

    width, blocks, dim = model.width, model.blocks, model.dim
    times = step_times(steps, step_size).to(source)
    # Time embedding and every adaLN output for all steps at once: (M, W), (M, 3W), (M, 2W).
    t_mlp = model.time_embed.mlp
    y = F.linear(timestep_embedding(times).double(), f64(t_mlp[0].weight), f64(t_mlp[0].bias))
    y = F.linear(F.silu(y), f64(t_mlp[2].weight), f64(t_mlp[2].bias))
    silu_y = F.silu(y)

    def modulation(layer: torch.nn.Linear, chunks: int) -> tuple[torch.Tensor, ...]:
        return F.linear(silu_y, f64(layer.weight), f64(layer.bias)).chunk(chunks, dim=-1)

    def empty(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, dtype=dtype, device=device)

    w1, b1 = empty(steps, blocks, width, width), empty(steps, blocks, width)
    w2, b2 = empty(steps, blocks, width, width), empty(steps, blocks, width)
    for b, block in enumerate(model.res_blocks):
        shift, scale, gate = modulation(block.adaLN_modulation[-1], 3)
        col_scale = f64(block.in_ln.weight) * (1 + scale)  # (M, W): W1·diag(γ(1+scale))
        col_shift = f64(block.in_ln.bias) * (1 + scale) + shift
        lin1, lin2 = f64(block.mlp[0].weight), f64(block.mlp[2].weight)
        for i in range(steps):  # one step at a time bounds the float64 working set
            w1[i, b] = (lin1 * col_scale[i]).T
            w2[i, b] = _centred(lin2 * gate[i, :, None]).T
        b1[:, b] = f64(block.mlp[0].bias) + col_shift @ lin1.T
        b2[:, b] = _centred(gate * f64(block.mlp[2].bias), dim=-1)
    shift_f, scale_f = modulation(model.final_layer.adaLN_modulation[-1], 2)
    final = f64(model.final_layer.linear.weight)
    final_scale = step_size * (1 + scale_f)  # (M, W)
    proj = model.input_proj
    projection = _centred(f64(proj.weight)).T  # (D, W)
    wf, feedback = empty(steps, width, dim), empty(steps, width, width)
    for i in range(steps):
        step_final = (final * final_scale[i]).T
        wf[i] = step_final
        feedback[i] = step_final @ projection
    bias_f = step_size * (f64(model.final_layer.linear.bias) + shift_f @ final.T)  # (M, D)
    input_bias = _centred(f64(proj.bias))
    projected = bias_f @ projection
    offsets = input_bias + projected.cumsum(0) - projected

    def fp32(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device, torch.float32).contiguous()

    return SolverPlan(
        steps=steps,
        step_size=step_size,
        eps=model.final_layer.norm_final.eps,
        times=times.to(device),
        input_weight=fp32(projection),
        input_bias=fp32(input_bias),
        w1=w1, b1=b1, w2=w2, b2=b2, wf=wf, bf=bias_f.to(device, dtype),
        feedback=feedback,
        offsets=fp32(offsets),
        final_scale=fp32(final_scale),
        final_weight=final.T.to(device, dtype).contiguous(),
        bias_sums=fp32(bias_f.cumsum(0)),
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
    step_size: float = 0.1,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> SolverPlan:
    """The folded plan of ``model``, built once and cached per (steps, step_size, dtype, device).

    A cached plan with more steps for the same step size serves fewer steps as a prefix view.
    Every lookup compares the weights with the copy the plans were folded from and drops them
    on any difference (optimizer steps of any kind, ``load_state_dict``, in-place and
    ``param.data`` writes).
    """
    if not isinstance(model, VelocityNet):
        raise TypeError(f"model must be a VelocityNet, got {type(model).__name__}")
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
    if plan is None or plan.steps < steps:
        plan = build_plan(model, steps, step_size, dtype=dtype, device=device)
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


def _resolve_plan(
    model: VelocityNet | SolverPlan, steps: int, step_size: float, precision: str, device
) -> SolverPlan:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision]
    if isinstance(model, VelocityNet):
        return solver_plan(model, steps, step_size, dtype=dtype, device=device)
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


def folded_states(
    model: VelocityNet | SolverPlan,
    x: torch.Tensor,
    steps: int,
    step_size: float = 0.1,
    *,
    precision: str = "fp32",
    chunk_rows: int | None = None,
    workers: int | None = None,
) -> Iterator[torch.Tensor]:
    """Iterate over the fp32 states x_0, x_1, ..., x_M of the folded Euler solve.

    Every yielded tensor is the same (N, D) working buffer, advanced in place by the next step:
    score or clone it before advancing. One pass thus scores every M (``select_steps``).
    ``model`` is a :class:`VelocityNet` (its cached plan is used) or a :class:`SolverPlan`.
    On the CPU, ``workers`` threads (default: ``torch.get_num_threads()``) each run whole row
    chunks with single-threaded ops; see :data:`DEFAULT_CHUNK_ROWS`. Arguments are checked
    here, before the first state.
    """
    return _iterate(*_prepare(model, x, steps, step_size, precision, chunk_rows, workers))


def _prepare(
    model, x, steps, step_size, precision, chunk_rows, workers
) -> tuple[SolverPlan, torch.Tensor, int, int]:
    """Checked plan, fp32 working copy of ``x``, chunk rows and worker count."""
    x = check.check_matrix("x", x, allow_empty=True)
    plan = _resolve_plan(model, steps, step_size, precision, x.device)
    if x.shape[1] != plan.dim:
        raise ValueError(f"x has dim {x.shape[1]} but the model expects {plan.dim}")
    if chunk_rows is None:  # GPUs want every row in one GEMM
        chunk_rows = DEFAULT_CHUNK_ROWS if x.device.type == "cpu" else max(x.shape[0], 1)
    chunk = check.check_int("chunk_rows", chunk_rows, minimum=1)
    if workers is None:
        workers = torch.get_num_threads() if x.device.type == "cpu" else 1
    workers = check.check_int("workers", workers, minimum=1)
    if workers > 1 and x.device.type != "cpu":
        raise ValueError(f"workers > 1 is for CPU tensors, got x on {x.device}")
    return plan, x.to(torch.float32, copy=True).contiguous(), chunk, workers


def _row_chunks(rows: int, chunk: int, workers: int) -> list[slice]:
    """Row slices of at most ``chunk`` rows, at least one per worker when rows allow it."""
    if workers > 1:
        chunk = min(chunk, max(MIN_WORKER_ROWS, -(-rows // workers)))
    return [slice(start, min(start + chunk, rows)) for start in range(0, rows, chunk)]


@torch.no_grad()
def _iterate(
    plan: SolverPlan, state: torch.Tensor, chunk: int, workers: int
) -> Iterator[torch.Tensor]:
    yield state
    for _ in _advance(plan, state.shape[0], chunk, workers, _step, state):
        yield state


def _advance(
    plan: SolverPlan, rows: int, chunk: int, workers: int, step: Callable, *tensors: torch.Tensor
) -> Iterator[None]:
    """Run ``step(plan, i, *row_views, worker_buffers)`` on every row chunk of the (N, ·)
    ``tensors`` for i = 0..M-1, yielding after each step."""
    if plan.steps == 0 or rows == 0:
        return
    chunks = _row_chunks(rows, chunk, workers)
    longest = chunks[0].stop - chunks[0].start
    buffers = [_Buffers(longest, plan) for _ in range(min(workers, len(chunks)))]
    for i in range(plan.steps):
        def run(rows_slice: slice, worker_buffers: _Buffers, i: int = i) -> None:
            step(plan, i, *(tensor[rows_slice] for tensor in tensors), worker_buffers)

        _run_chunks(chunks, buffers, run)
        yield


_POOL_LOCK = threading.Lock()
_POOL: tuple[ThreadPoolExecutor, int] | None = None
_THREADS_LOCK = threading.Lock()
_SINGLE_THREADED = {"depth": 0, "saved": 1}


def _pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool, grown when more workers are asked for (threads are reused)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[1] < workers:
            if _POOL is not None:
                _POOL[0].shutdown(wait=False)
            _POOL = (ThreadPoolExecutor(workers, thread_name_prefix="fma_fast-solve"), workers)
        return _POOL[0]


@contextmanager
def _single_threaded_ops() -> Iterator[None]:
    """torch intra-op threads = 1 while workers run, restored by the last one to leave.

    Row-parallel workers need no OpenMP barrier per op. On the 2-core host the folded solve ran
    as fast as with intra-op threads under default OpenMP settings and 25-35% faster under
    OMP_WAIT_POLICY=PASSIVE, and a busy neighbour core now slows only its own chunks.
    """
    with _THREADS_LOCK:
        if _SINGLE_THREADED["depth"] == 0:
            _SINGLE_THREADED["saved"] = torch.get_num_threads()
            torch.set_num_threads(1)
        _SINGLE_THREADED["depth"] += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _SINGLE_THREADED["depth"] -= 1
            if _SINGLE_THREADED["depth"] == 0:
                torch.set_num_threads(_SINGLE_THREADED["saved"])


def _run_chunks(
    chunks: list[slice], buffers: list[_Buffers], run: Callable[[slice, _Buffers], None]
) -> None:
    """``run(rows, worker_buffers)`` on every chunk: inline for one worker, else each worker
    thread takes the next chunk when it is free."""
    if len(buffers) == 1:
        for rows_slice in chunks:
            run(rows_slice, buffers[0])
        return
    queue = iter(chunks)
    lock = threading.Lock()
    inference = torch.is_inference_mode_enabled()  # grad modes are per thread: pass it on

    def work(worker_buffers: _Buffers) -> None:
        while True:
            with lock:
                rows_slice = next(queue, None)
            if rows_slice is None:
                return
            with torch.inference_mode(inference), torch.no_grad():
                run(rows_slice, worker_buffers)

    with _single_threaded_ops():
        futures = [_pool(len(buffers)).submit(work, b) for b in buffers]
        for future in futures:
            future.result()


class _Buffers:
    """Work buffers of one chunk, allocated once per solve and reused by every step and chunk."""

    def __init__(self, rows: int, plan: SolverPlan):
        def empty(dtype: torch.dtype, cols: int) -> torch.Tensor:
            return torch.empty(rows, cols, dtype=dtype, device=plan.device)

        self.hidden = empty(torch.float32, plan.width)
        self.rstd = empty(torch.float32, 1)
        self.inner = empty(plan.dtype, plan.width)
        self.velocity = empty(plan.dtype, plan.dim)
        if plan.dtype != torch.float32:  # bf16 copies of the fp32 GEMM operands
            self.input_weight = plan.input_weight.to(plan.dtype)
            self.input_bias = plan.input_bias.to(plan.dtype)
            self.features = empty(plan.dtype, plan.dim)
            self.hidden_low = empty(plan.dtype, plan.width)
            self.update = empty(plan.dtype, plan.width)


def _inverse_rms(hidden: torch.Tensor, out: torch.Tensor, eps: float) -> torch.Tensor:
    """1/sqrt(mean(h²) + eps) per row: the LayerNorm scale of the mean-free hidden state."""
    torch.linalg.vector_norm(hidden, dim=1, keepdim=True, out=out)
    return out.square_().div_(hidden.shape[1]).add_(eps).rsqrt_()


def _normed_gemm(
    plan: SolverPlan, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    out: torch.Tensor, buffers: _Buffers,
) -> None:
    """out = LayerNorm(hidden) @ weight + bias for the mean-free hidden state.

    fp32 computes (hidden @ weight)·rstd + bias: the GEMM reads the hidden state directly and
    the scaling rides on the bias add. bf16 scales while casting the GEMM operand instead (one
    pass either way; mixed-dtype elementwise ops are slow on the CPU).
    """
    rows = hidden.shape[0]
    scale = _inverse_rms(hidden, buffers.rstd[:rows], plan.eps)
    if plan.dtype == torch.float32:
        torch.addcmul(bias, torch.mm(hidden, weight, out=out), scale, out=out)
    else:
        torch.addmm(bias, torch.mul(hidden, scale, out=buffers.hidden_low[:rows]), weight,
                    out=out)


def _blocks(plan: SolverPlan, i: int, hidden: torch.Tensor, buffers: _Buffers) -> None:
    """The residual blocks of step ``i`` on the fp32 hidden rows, in place."""
    rows = hidden.shape[0]
    inner = buffers.inner[:rows]
    for b in range(plan.blocks):
        _normed_gemm(plan, hidden, plan.w1[i, b], plan.b1[i, b], inner, buffers)
        F.silu(inner, inplace=True)
        if plan.dtype != torch.float32:
            update = buffers.update[:rows]
            hidden.add_(torch.addmm(plan.b2[i, b], inner, plan.w2[i, b], out=update))
        else:
            hidden.addmm_(inner, plan.w2[i, b]).add_(plan.b2[i, b])


def _step(plan: SolverPlan, i: int, x: torch.Tensor, buffers: _Buffers) -> None:
    """One folded Euler step on the rows ``x`` in place."""
    rows = x.shape[0]
    hidden, velocity = buffers.hidden[:rows], buffers.velocity[:rows]
    if plan.dtype != torch.float32:
        features = buffers.features[:rows].copy_(x)
        inner = buffers.inner[:rows]
        hidden.copy_(torch.addmm(buffers.input_bias, features, buffers.input_weight, out=inner))
    else:
        torch.addmm(plan.input_bias, x, plan.input_weight, out=hidden)
    _blocks(plan, i, hidden, buffers)
    _normed_gemm(plan, hidden, plan.wf[i], plan.bf[i], velocity, buffers)
    x.add_(velocity)


def _final_step(
    plan: SolverPlan, i: int, x: torch.Tensor, lifted: torch.Tensor,
    displacement: torch.Tensor, buffers: _Buffers,
) -> None:
    """Step ``i`` of :func:`folded_final` on a row chunk (fp32 plans).

    ``lifted`` carries x_i @ input_weight less the bias terms (``offsets``), advanced by one
    ``feedback`` GEMM; ``displacement`` sums u_i ⊙ final_scale[i]; x is written at the end.
    """
    rows = x.shape[0]
    hidden, normed = buffers.hidden[:rows], buffers.inner[:rows]  # inner is free after blocks
    if i == 0:
        torch.mm(x, plan.input_weight, out=lifted)
        displacement.zero_()
    torch.add(lifted, plan.offsets[i], out=hidden)
    _blocks(plan, i, hidden, buffers)
    torch.mul(hidden, _inverse_rms(hidden, buffers.rstd[:rows], plan.eps), out=normed)
    if i + 1 < plan.steps:
        lifted.addmm_(normed, plan.feedback[i])
    displacement.addcmul_(normed, plan.final_scale[i])
    if i + 1 == plan.steps:
        x.addmm_(displacement, plan.final_weight).add_(plan.bias_sums[i])


def folded_final(
    model: VelocityNet | SolverPlan,
    x: torch.Tensor,
    steps: int,
    step_size: float = 0.1,
    *,
    precision: str = "fp32",
    chunk_rows: int | None = None,
    workers: int | None = None,
) -> torch.Tensor:
    """x_M alone, with one GEMM less per step than :func:`folded_states` in fp32.

    The final layer of each step and the input projection of the next are merged (see
    :class:`SolverPlan`): 25 instead of 26 GEMMs per step. bf16/fp16 take the states path,
    whose cost is elementwise work rather than GEMMs. Same arguments as :func:`folded_states`.
    """
    plan, state, chunk, workers = _prepare(
        model, x, steps, step_size, precision, chunk_rows, workers
    )
    if plan.dtype != torch.float32:
        return deque(_iterate(plan, state, chunk, workers), maxlen=1)[0]
    lifted = torch.empty(state.shape[0], plan.width, device=state.device)
    displacement = torch.empty_like(lifted)
    with torch.no_grad():
        for _ in _advance(plan, state.shape[0], chunk, workers, _final_step, state, lifted,
                          displacement):
            pass
    return state


def folded_solve(
    model: VelocityNet | SolverPlan,
    x: torch.Tensor,
    steps: int,
    step_size: float = 0.1,
    *,
    precision: str = "fp32",
    return_trajectory: bool = False,
    chunk_rows: int | None = None,
    workers: int | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """Folded equivalent of ``reference.euler_solve``: M steps of size h from t=0.

    Returns the fp32 features (N, D) after ``steps`` steps, or every state [x_0, ..., x_M] with
    ``return_trajectory``. ``precision="bf16"`` runs the GEMMs on bf16 weights and inputs
    (fp32 accumulation; residual streams and LayerNorm statistics stay fp32).
    """
    options = {"precision": precision, "chunk_rows": chunk_rows, "workers": workers}
    if not return_trajectory:
        return folded_final(model, x, steps, step_size, **options)
    return [state.clone() for state in folded_states(model, x, steps, step_size, **options)]
