"""The torch runtime of the folded plan (docs/method.md §3): a chain of GEMMs on preallocated
buffers. On the CPU the rows are split into chunks that worker threads advance with
single-threaded ops; on a GPU whose fused kernels cannot run it is the fallback (cuBLAS GEMMs).

Two entry points, like the Triton runtime's: :func:`folded_states` (every state x_0..x_M, for
scoring each M) and :func:`folded_final` (x_M alone, with one GEMM less per step in fp32).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from ..core import validation as check
from ..core.model import VelocityNet
from ..core.policy import CPU_CHUNK_ROWS, DEFAULT_STEP_SIZE, MIN_WORKER_ROWS
from . import compiled as compiled_runtime
from . import cpu_ops
from .cpu_ops import inverse_rms
from .plan import SolverPlan, resolve_plan


def folded_states(
    model: VelocityNet | SolverPlan,
    x: torch.Tensor,
    steps: int,
    step_size: float = DEFAULT_STEP_SIZE,
    *,
    precision: str = "fp32",
    chunk_rows: int | None = None,
    workers: int | None = None,
    compiled: bool = False,
) -> Iterator[torch.Tensor]:
    """Iterate over the fp32 states x_0, x_1, ..., x_M of the folded Euler solve.

    Every yielded tensor is the same (N, D) working buffer, advanced in place by the next step:
    score or clone it before advancing. One pass thus scores every M (``select_steps``).
    ``model`` is a :class:`VelocityNet` (its cached plan is used) or a :class:`SolverPlan`.
    On the CPU, ``workers`` threads (default: ``torch.get_num_threads()``) each run whole row
    chunks with single-threaded ops; see :data:`fma_fast.core.policy.CPU_CHUNK_ROWS`.
    ``compiled`` (bf16 plans on the CPU): every step runs as a ``torch.compile``d module
    (:mod:`fma_fast.solver.compiled`), compiled here on first use for this plan: minutes. Its
    chunks run on the calling thread, one after another (``workers`` is ignored): two threads
    calling one compiled module at once corrupted each other's results.
    Arguments are checked here, before the first state.
    """
    plan, state, chunk, workers = _prepare(model, x, steps, step_size, precision, chunk_rows,
                                           workers, True)
    return _iterate(plan, state, chunk, 1 if compiled else workers,
                    _compiled_steps(plan, chunk, compiled))


def _prepare(
    model, x, steps, step_size, precision, chunk_rows, workers, trajectory: bool
) -> tuple[SolverPlan, torch.Tensor, int, int]:
    """Checked plan (with the final-only fields when the fp32 final state alone is wanted),
    fp32 working copy of ``x``, chunk rows and worker count."""
    x = check.check_matrix("x", x, allow_empty=True)
    final_only = not trajectory and precision == "fp32"
    plan = resolve_plan(model, steps, step_size, precision, x.device, final_only=final_only)
    if x.shape[1] != plan.dim:
        raise ValueError(f"x has dim {x.shape[1]} but the model expects {plan.dim}")
    if chunk_rows is None:  # GPUs want every row in one GEMM
        chunk_rows = CPU_CHUNK_ROWS if x.device.type == "cpu" else max(x.shape[0], 1)
    chunk = check.check_int("chunk_rows", chunk_rows, minimum=1)
    if workers is None:
        workers = torch.get_num_threads() if x.device.type == "cpu" else 1
    workers = check.check_int("workers", workers, minimum=1)
    if workers > 1 and x.device.type != "cpu":
        raise ValueError(f"workers > 1 is for CPU tensors, got x on {x.device}")
    return plan, x.to(torch.float32, copy=True).contiguous(), chunk, workers


def _compiled_steps(plan: SolverPlan, chunk: int, compiled: bool) -> list | None:
    """The plan's compiled steps, compiled and checked for ``chunk`` rows (every chunk is
    padded to it, so one shape serves a whole solve), or None for the eager chain. They run on
    one thread with torch's intra-op threads, which inductor's CPU kernels bake in when they
    compile."""
    return compiled_runtime.compiled_steps(plan, chunk) if compiled else None


def compile_steps(model: VelocityNet, steps: int, step_size: float, device: torch.device
                  ) -> None:
    """Compile and check now the steps a ``compiled=True`` solve of CPU_CHUNK_ROWS chunks will
    run (call it in the grad mode the solve runs in): raises
    :class:`~fma_fast.solver.compiled.CompileUnavailable` before any work depends on it."""
    plan = resolve_plan(model, steps, step_size, "bf16", device)
    compiled_runtime.compiled_steps(plan, CPU_CHUNK_ROWS)


def _row_chunks(rows: int, chunk: int, workers: int) -> list[slice]:
    """Row slices of at most ``chunk`` rows, at least one per worker when rows allow it."""
    if workers > 1:
        chunk = min(chunk, max(MIN_WORKER_ROWS, -(-rows // workers)))
    return [slice(start, min(start + chunk, rows)) for start in range(0, rows, chunk)]


@torch.no_grad()
def _iterate(
    plan: SolverPlan, state: torch.Tensor, chunk: int, workers: int, compiled: list | None = None
) -> Iterator[torch.Tensor]:
    yield state
    step = _step if compiled is None else _compiled_step(compiled, chunk)
    for _ in _advance(plan, state.shape[0], chunk, workers, step, state):
        yield state


def _compiled_step(steps: list, chunk: int) -> Callable:
    """A runtime step running the compiled module of step i on a chunk padded to ``chunk``
    rows (zero rows: finite through LayerNorm, discarded)."""

    def step(plan: SolverPlan, i: int, x: torch.Tensor, buffers: _Buffers) -> None:
        rows = x.shape[0]
        if rows == chunk:
            x.copy_(steps[i](x))
            return
        if buffers.padded is None:
            buffers.padded = torch.zeros(chunk, plan.dim, device=plan.device)
        buffers.padded[:rows] = x
        x.copy_(steps[i](buffers.padded)[:rows])

    return step


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

    Row-parallel workers need no OpenMP barrier per op, and a busy neighbour core slows only
    its own chunks (the measurements are in benchmarks/results/).
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
        if plan.dtype == torch.float32:
            self.inner = empty(torch.float32, plan.width)
            self.velocity = empty(torch.float32, plan.dim)
        else:  # half copies of the fp32 input projection, and the GEMM operands
            self.input_weight = plan.input_weight.to(plan.dtype)
            self.input_bias = plan.input_bias.to(plan.dtype)
            self.features = empty(plan.dtype, plan.dim)
            self.operand = empty(plan.dtype, plan.width)
        self.padded: torch.Tensor | None = None  # a compiled step's padded last chunk


def _normed_gemm(
    plan: SolverPlan, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    out: torch.Tensor, buffers: _Buffers,
) -> None:
    """out = LayerNorm(hidden) @ weight + bias for the mean-free fp32 hidden state, as
    (hidden @ weight)·rstd + bias: the GEMM reads the hidden state directly and the scaling
    rides on the bias add."""
    scale = inverse_rms(hidden, buffers.rstd[: hidden.shape[0]], plan.eps)
    torch.addcmul(bias, torch.mm(hidden, weight, out=out), scale, out=out)


def _blocks(plan: SolverPlan, i: int, hidden: torch.Tensor, buffers: _Buffers) -> None:
    """The residual blocks of step ``i`` on the fp32 hidden rows of a fp32 plan, in place."""
    inner = buffers.inner[: hidden.shape[0]]
    for b in range(plan.blocks):
        _normed_gemm(plan, hidden, plan.w1[i, b], plan.b1[i, b], inner, buffers)
        F.silu(inner, inplace=True)
        hidden.addmm_(inner, plan.w2[i, b]).add_(plan.b2[i, b])


def _step(plan: SolverPlan, i: int, x: torch.Tensor, buffers: _Buffers) -> None:
    """One folded Euler step on the rows ``x`` in place."""
    if plan.dtype != torch.float32:
        _low_precision_step(plan, i, x, buffers)
        return
    rows = x.shape[0]
    hidden, velocity = buffers.hidden[:rows], buffers.velocity[:rows]
    torch.addmm(plan.input_bias, x, plan.input_weight, out=hidden)
    _blocks(plan, i, hidden, buffers)
    _normed_gemm(plan, hidden, plan.wf[i], plan.bf[i], velocity, buffers)
    x.add_(velocity)


def _low_precision_step(plan: SolverPlan, i: int, x: torch.Tensor, buffers: _Buffers) -> None:
    """One step of a bf16/fp16 plan: GEMMs on half operands with the bias in their epilogue
    (``cpu_ops.linear``); the residual stream and LayerNorm statistics stay fp32, and each
    LayerNorm scales while casting the next GEMM's operand (mixed-dtype passes are slow on the
    CPU, so each block makes three besides its GEMMs: residual add, norm, scale-and-cast)."""
    rows = x.shape[0]
    hidden, rstd, operand = buffers.hidden[:rows], buffers.rstd[:rows], buffers.operand[:rows]
    features = buffers.features[:rows].copy_(x)
    hidden.copy_(cpu_ops.linear(features, buffers.input_weight, buffers.input_bias))
    cpu_ops.normed(hidden, rstd, plan.eps, operand)
    for b in range(plan.blocks):
        inner = F.silu(cpu_ops.linear(operand, plan.w1[i, b], plan.b1[i, b]), inplace=True)
        update = cpu_ops.linear(inner, plan.w2[i, b], plan.b2[i, b])
        cpu_ops.residual_normed(hidden, update, rstd, plan.eps, operand)
    x.add_(cpu_ops.linear(operand, plan.wf[i], plan.bf[i]))


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
    torch.mul(hidden, inverse_rms(hidden, buffers.rstd[:rows], plan.eps), out=normed)
    if i + 1 < plan.steps:
        lifted.addmm_(normed, plan.feedback[i])
    displacement.addcmul_(normed, plan.final_scale[i])
    if i + 1 == plan.steps:
        x.addmm_(displacement, plan.final_weight).add_(plan.bias_sums[i])


def folded_final(
    model: VelocityNet | SolverPlan,
    x: torch.Tensor,
    steps: int,
    step_size: float = DEFAULT_STEP_SIZE,
    *,
    precision: str = "fp32",
    chunk_rows: int | None = None,
    workers: int | None = None,
    compiled: bool = False,
) -> torch.Tensor:
    """x_M alone, with one GEMM less per step than :func:`folded_states` in fp32.

    The final layer of each step and the input projection of the next are merged (see
    :class:`SolverPlan`): 25 instead of 26 GEMMs per step. bf16/fp16 take the states path,
    whose cost is elementwise work rather than GEMMs. Same arguments as :func:`folded_states`.
    """
    plan, state, chunk, workers = _prepare(
        model, x, steps, step_size, precision, chunk_rows, workers, False
    )
    steps = _compiled_steps(plan, chunk, compiled)  # (refuses fp32 plans)
    if plan.dtype != torch.float32 or not plan.final_only:  # (a plan built without them)
        workers = 1 if compiled else workers  # see folded_states
        return deque(_iterate(plan, state, chunk, workers, steps), maxlen=1)[0]
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
    step_size: float = DEFAULT_STEP_SIZE,
    *,
    precision: str = "fp32",
    return_trajectory: bool = False,
    chunk_rows: int | None = None,
    workers: int | None = None,
    compiled: bool = False,
) -> torch.Tensor | list[torch.Tensor]:
    """Folded equivalent of ``reference.euler_solve``: M steps of size h from t=0.

    Returns the fp32 features (N, D) after ``steps`` steps, or every state [x_0, ..., x_M] with
    ``return_trajectory``. ``precision="bf16"`` runs the GEMMs on bf16 weights and inputs
    (fp32 accumulation; residual streams and LayerNorm statistics stay fp32); ``compiled``
    as in :func:`folded_states`.
    """
    options = {"precision": precision, "chunk_rows": chunk_rows, "workers": workers,
               "compiled": compiled}
    if not return_trajectory:
        return folded_final(model, x, steps, step_size, **options)
    return [state.clone() for state in folded_states(model, x, steps, step_size, **options)]
