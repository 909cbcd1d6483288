"""Shared plumbing of the Triton kernels: availability, interpreter detection, block sizes.

Conventions every kernel follows (Liger-Kernel / FlagGems house style):

* row offsets are computed in int64 (``rows.to(tl.int64) * stride``) so N·D may exceed 2**31;
* all math is fp32 whatever the I/O dtype, with explicit casts on load and store;
* every load and store is masked, so D, N and C need not be powers of two or tile multiples;
* block sizes come from :func:`pick_blocks` only, or, for the hot ops with
  ``FMA_FAST_AUTOTUNE=1`` on CUDA, from :func:`tuned_blocks`, which times the
  :func:`candidate_blocks` of an input shape once and keeps the fastest.

Importing this module never fails: without triton, ``HAS_TRITON`` is False and the kernel modules
are simply not imported by :mod:`fma_fast.ops.dispatch`.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TypeVar

import torch

from ..core.names import check_choice

try:  # triton is an optional dependency; a broken install must not break ``import fma_fast``
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources, PTXASError

    HAS_TRITON = True
    _BUILD_ERRORS: tuple[type[BaseException], ...] = (CompilationError, OutOfResources, PTXASError)
except Exception:  # pragma: no cover - depends on the environment
    HAS_TRITON = False
    _BUILD_ERRORS = ()


class KernelFallbackWarning(RuntimeWarning):
    """A Triton kernel could not be built or launched on this GPU; its op now runs in torch."""


FALLBACKS: dict[tuple[str, str, str], str] = {}
"""(op, device, dtype) -> why that op's kernel could not run there. Those calls take the torch
path for the rest of the process (``fma-fast doctor`` lists them)."""


CUDA_FAULTS = (
    "cuda error",  # torch's wording of any CUDA runtime error
    "illegal memory access",
    "illegal address",
    "illegal instruction",
    "misaligned address",
    "device-side assert",
    "unspecified launch failure",
    "invalid program counter",
    "hardware stack error",
    "timed out and was terminated",
    "uncorrectable ecc",
    "not supported on global/shared address space",
    "cublas_status",
    "out of memory",
)
"""Words (lower case) of the errors that say the GPU faulted or ran out of memory, in CUDA's
own wording (cuGetErrorString, which Triton's launcher reports as "Triton Error [CUDA]: ...")
and torch's ("CUDA error: ..."). Most of these faults are sticky: the context is broken, and
every later launch or torch op fails with the same error, so none of them says anything about
whether one kernel can run here."""


def cuda_fault(error: BaseException) -> bool:
    """Whether ``error`` is a CUDA runtime fault or a lack of memory rather than a kernel that
    cannot be built or launched (see :data:`CUDA_FAULTS`)."""
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
    if accelerator_error is not None and isinstance(error, accelerator_error):
        return True
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    text = str(error).lower()
    return any(words in text for words in CUDA_FAULTS)


def kernel_failure(error: BaseException) -> bool:
    """Whether ``error`` says a kernel cannot be built or launched on this device (compile
    errors, out of shared memory or registers, an arch without a dtype, a launch the driver
    refuses), as opposed to bad arguments (ValueError/TypeError from the launchers), a CUDA
    runtime fault (an illegal address, a device-side assert: :func:`cuda_fault`), a lack of
    memory, or a bug the interpreter found. Only the first falls back to torch; the rest are
    raised, never hidden behind a fallback."""
    if isinstance(error, _BUILD_ERRORS):
        return True
    if cuda_fault(error):
        return False
    return isinstance(error, (RuntimeError, AssertionError, NotImplementedError)) and not (
        type(error).__module__.startswith(("triton.runtime.interpreter", "fma_fast"))
    )


def _fallback_key(op: str, like: torch.Tensor) -> tuple[str, str, str]:
    return op, str(like.device), str(like.dtype).removeprefix("torch.")


def fallen_back(op: str, like: torch.Tensor) -> bool:
    """Whether ``op`` on tensors like ``like`` already fell back to torch in this process."""
    return _fallback_key(op, like) in FALLBACKS


def record_fallback(op: str, like: torch.Tensor, error: BaseException) -> None:
    """Remember that ``op`` cannot run as a kernel here and warn once. On a GPU the device is
    synchronised first: a pending fault is raised rather than recorded."""
    if like.device.type == "cuda":
        # A fault of an earlier launch surfaces here (and is raised) instead of being taken
        # for this kernel's failure.
        torch.cuda.synchronize(like.device)
    key = _fallback_key(op, like)
    lines = str(error).strip().splitlines() or [""]
    reason = f"{type(error).__name__}: {lines[-1][:200]}"
    FALLBACKS[key] = reason
    where = key[1]
    if like.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(like.device)
        where = f"{torch.cuda.get_device_name(like.device)} (sm_{major}{minor})"
    warnings.warn(
        f"fma_fast: the Triton kernel of {op} cannot run on {where} for {key[2]} ({reason}); "
        f"{op} takes the PyTorch path from now on in this process (fma-fast doctor lists "
        "fallbacks)",
        KernelFallbackWarning,
        stacklevel=3,
    )


def with_fallback(op: str, like: torch.Tensor, kernel: Callable[[], object],
                  torch_path: Callable[[], object]) -> tuple[object, bool]:
    """``kernel()``, or ``torch_path()`` when this op's kernel cannot run here (remembered per
    op, device and dtype, with one warning). Returns the result and whether it fell back."""
    if fallen_back(op, like):
        return torch_path(), True
    try:
        return kernel(), False
    except Exception as error:
        if not kernel_failure(error):
            raise
        record_fallback(op, like, error)
        return torch_path(), True


Launcher = TypeVar("Launcher", bound=Callable)


def launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """The context a kernel launch for tensors on ``device`` runs in. Triton launches on torch's
    *current* CUDA device and that device's current stream (``torch.cuda.current_device()``,
    ``torch.cuda.current_stream()``), not on its arguments' device: without this guard a
    launch for ``cuda:1`` tensors runs on GPU 0 against another GPU's memory, unordered with
    the torch ops on cuda:1's stream. Nothing to switch elsewhere."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def on_tensor_device(launcher: Launcher) -> Launcher:
    """Decorates every kernel launcher: it runs under :func:`launch_device` of the one device
    of its tensor arguments (a ValueError when they are on several: a kernel reads all of them
    from one GPU)."""

    @functools.wraps(launcher)
    def guarded(*args, **kwargs):
        devices = {arg.device for arg in (*args, *kwargs.values())
                   if isinstance(arg, torch.Tensor)}
        if len(devices) > 1:
            raise ValueError(f"{launcher.__qualname__}: the tensors are on several devices "
                             f"{sorted(map(str, devices))}; move them to one")
        if not devices:
            return launcher(*args, **kwargs)
        with launch_device(devices.pop()):
            return launcher(*args, **kwargs)

    return guarded


DOT_PRECISIONS = ("ieee", "tf32x3", "tf32")
"""How tl.dot treats fp32 operands on CUDA. 'tf32' (Triton's default) has a 10-bit mantissa:
cosines off by ~1e-3, which scale 100 turns into 10% probability errors, so we default to
'tf32x3' (three TF32 products, ~fp32 accuracy). The interpreter multiplies exactly, unless
FMA_FAST_INTERPRET_TF32=1 rounds as a GPU does (:mod:`.tf32_emulation`)."""

DEFAULT_DOT_PRECISION = "tf32x3"


def interpreter_active() -> bool:
    """True when Triton runs its numpy interpreter (``TRITON_INTERPRET=1``, set before import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _mend_old_interpreter() -> None:
    """Triton 3.6's interpreter turns a loop bound passed into a nested @triton.jit helper into
    an int with ``int(ndarray)``, which NumPy 2 refuses for its one-element arrays; 3.8 squeezes
    first. Only the interpreter, a test tool, is affected: its ``__index__`` is given 3.8's
    behaviour there, and compiled kernels are untouched."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor
    if getattr(patch_tensor, "mended", False):
        return

    def mended(tensor, scope) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    mended.mended = True
    interpreter._patch_lang_tensor = mended


if HAS_TRITON and interpreter_active():
    _major_minor = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if _major_minor < (3, 8):
        _mend_old_interpreter()
    from . import tf32_emulation

    if tf32_emulation.requested():  # FMA_FAST_INTERPRET_TF32=1: fp32 dots rounded as on a GPU
        tf32_emulation.install()


def triton_usable(*tensors: torch.Tensor) -> tuple[bool, str]:
    """Whether the Triton kernels can run on these tensors, and why not when they cannot.

    CUDA tensors need a working triton; CPU tensors need the interpreter as well.
    """
    if not HAS_TRITON:
        return False, "triton is not installed"
    devices = {t.device.type for t in tensors}
    if len(devices) > 1:
        return False, f"tensors are on several device types {sorted(devices)}"
    if devices == {"cuda"}:
        return True, ""
    if devices == {"cpu"}:
        if interpreter_active():
            return True, ""
        return False, "CPU tensors need TRITON_INTERPRET=1 (set before triton is imported)"
    return False, f"no Triton backend for device type {devices}"


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch options of one kernel launch."""

    block_n: int
    block_d: int
    block_c: int
    num_warps: int
    num_stages: int


_MIN_DOT = 16  # tl.dot needs every tile side >= 16
_H100_SMS = 132


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


OPS = ("euler", "flow_matching", "noise", "cosine_topk", "cosine_lse", "ensemble_topk",
       "cosine_ce", "cosine_ce_backward", "folded_block", "folded_final")


HOPPER = 90
"""Compute capability (major·10 + minor) the block sizes were first chosen for."""


def device_arch(device: torch.device) -> int:
    """The compute capability of a CUDA device as major·10 + minor (90 for an H100); Hopper's
    for anything else (the interpreter picks its own tiles)."""
    if device.type != "cuda":
        return HOPPER
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def pick_blocks(op: str, rows: int, dim: int, classes: int = 1,
                dtype: torch.dtype = torch.float32, *, arch: int = HOPPER) -> Blocks:
    """The block sizes of ``op`` for an (rows, dim) input of ``dtype`` against ``classes``
    (for the folded-step ops: ``dim`` is the hidden width, ``classes`` the output dim) on a GPU
    of compute capability ``arch``.

    Defaults **untuned by timing** (no GPU was at hand): the largest tiles whose AOT compile
    shows no register spill and fits the arch's shared memory (fma_fast/aot.py, checked in
    tests/test_kernels_dispatch.py for sm_80, sm_89 and sm_90). On Hopper, fp32 scoring, where
    tf32x3 splits every operand in two, fits 64 rows × 64 classes × 32-wide D chunks on 8 warps
    and halves fit 128 classes. Before Hopper the MMA operands live in registers rather than
    shared memory, so fp32 takes 16-wide D chunks and smaller ensemble, cross-entropy backward
    and final-layer tiles. Under the interpreter small fixed tiles keep the numpy emulation
    quick and make tiny test shapes span several tiles and masks.
    """
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; known: {OPS}")
    if interpreter_active():
        if op == "euler":
            return Blocks(block_n=256, block_d=1, block_c=1, num_warps=1, num_stages=1)
        if op == "flow_matching":
            return Blocks(block_n=8, block_d=16, block_c=1, num_warps=1, num_stages=1)
        if op == "noise":  # only tests call it, on thousands of rows: few, large programs
            return Blocks(block_n=64, block_d=64, block_c=1, num_warps=1, num_stages=1)
        return Blocks(block_n=16, block_d=16, block_c=16, num_warps=1, num_stages=1)
    d_pow2, c_pow2 = _pow2(dim), _pow2(classes)
    half = dtype in (torch.float16, torch.bfloat16)
    registers_mma = arch < HOPPER and not half  # tf32x3 operands held in registers
    if op == "euler":
        return Blocks(block_n=2048, block_d=1, block_c=1, num_warps=8, num_stages=1)
    if op in ("flow_matching", "noise"):  # Philox + Box-Muller per element: register hungry
        block_d = min(64, max(_MIN_DOT, d_pow2))
        return Blocks(block_n=16, block_d=block_d, block_c=1, num_warps=4, num_stages=1)
    if op == "cosine_ce_backward":
        # The gradient slice (block_n × block_d) stays in registers across the class loop;
        # fp32 at 32 × 64 × 64 spills before Hopper, and on Hopper under triton 3.6.
        if not half:
            return Blocks(block_n=16, block_d=min(64, max(_MIN_DOT, d_pow2)),
                          block_c=min(32, max(_MIN_DOT, c_pow2)), num_warps=8, num_stages=3)
        block_c = min(64, max(_MIN_DOT, c_pow2))
        block_d = min(64, max(_MIN_DOT, d_pow2))
        return Blocks(block_n=32, block_d=block_d, block_c=block_c, num_warps=8, num_stages=3)
    if op == "folded_block":
        # A (block_n × next_pow2(width)) fp32 accumulator lives in registers: rows shrink as
        # the width grows, and the hidden slice (block_c) from 512 on (triton 3.6 spills a
        # 32-wide slice at width 512).
        block_n = 32 if d_pow2 <= 256 or (half and d_pow2 <= 512) else 16
        block_c = 32 if d_pow2 < 512 else 16
        return Blocks(block_n=block_n, block_d=32, block_c=block_c, num_warps=8, num_stages=2)
    if op == "folded_final":
        if registers_mma:
            return Blocks(block_n=32, block_d=32, block_c=min(64, max(_MIN_DOT, c_pow2)),
                          num_warps=8, num_stages=3)
        return Blocks(block_n=64, block_d=32, block_c=min(128, max(_MIN_DOT, c_pow2)),
                      num_warps=8, num_stages=3)
    # The scoring ops (cosine_topk, cosine_lse, ensemble_topk, cosine_ce): 64-row tiles suit
    # Hopper's warpgroup MMA; rows shrink while fewer programs than half the SMs would run.
    block_n = 64
    while block_n > _MIN_DOT and -(-rows // block_n) < _H100_SMS // 2:
        block_n //= 2
    block_c = min(128 if half else 64, max(_MIN_DOT, c_pow2))
    block_d = min(16 if registers_mma else 32, max(_MIN_DOT, d_pow2))
    num_warps = 4 if block_n == _MIN_DOT else 8
    if registers_mma:
        num_warps = 8
        if op == "ensemble_topk":  # K=16 running slots on top of the tile
            block_n, block_d = _MIN_DOT, min(32, max(_MIN_DOT, d_pow2))
    return Blocks(block_n=block_n, block_d=block_d, block_c=block_c, num_warps=num_warps,
                  num_stages=3)


TUNED_OPS = ("folded_block", "folded_final", "cosine_topk")
"""The ops of the solve's hot path, which :func:`tuned_blocks` may time (the rest are
bandwidth-bound or run once per training step)."""


def candidate_blocks(op: str, rows: int, dim: int, classes: int = 1,
                     dtype: torch.dtype = torch.float32, *, arch: int = HOPPER) -> list[Blocks]:
    """Launch configurations to time for ``op``, :func:`pick_blocks`' default first.

    Written from first principles for Hopper, **not yet timed on a GPU**: each varies one axis
    of the default (rows per program, hidden or class slice, K chunk, warps, pipeline stages)
    within what the sm_90 AOT compile shows to fit the registers with no spills
    (tests/test_kernels_dispatch.py compiles every candidate). Before Hopper, under the
    interpreter, or for the other ops, the default alone: on sm_80/sm_89 several Hopper
    variants spill or exceed the shared memory, and none has been timed there.
    """
    default = pick_blocks(op, rows, dim, classes, dtype, arch=arch)
    if op not in TUNED_OPS or interpreter_active() or arch < HOPPER:
        return [default]
    half = dtype in (torch.float16, torch.bfloat16)
    # Each rule keeps to what ptxas -v showed to fit 255 registers with no spill under triton
    # 3.6 and 3.8: 4 warps cannot hold the folded block's accumulator, nor fp32 scoring
    # 64-wide K chunks or 16-row tiles on 8 warps; the final layer spills at 128 rows.
    variants: list[dict[str, int]] = []
    if op == "folded_block":
        if default.block_c > _MIN_DOT:
            variants.append(dict(block_c=_MIN_DOT))
        if half or _pow2(dim) <= 512:
            variants.append(dict(num_stages=3))
        if default.block_d > _MIN_DOT:
            variants.append(dict(block_d=_MIN_DOT))
        if default.block_n > _MIN_DOT:
            variants.append(dict(block_n=default.block_n // 2))
    elif op == "folded_final":  # (64-wide K chunks spill under triton 3.6)
        variants = [dict(block_n=32), dict(block_c=64), dict(num_stages=4)]
    else:  # cosine_topk
        variants.append(dict(num_stages=4))
        if default.num_warps == 8 and not half:  # (halves on 4 warps spill under triton 3.6)
            variants.append(dict(num_warps=4))
        if half and default.block_n >= 32:
            variants.append(dict(block_d=64, num_stages=2))
        if default.block_n > 32 or (half and default.block_n >= 32):
            variants.append(dict(block_n=default.block_n // 2))
        if default.block_c > 32 and (half or default.block_n >= 32):
            variants.append(dict(block_c=default.block_c // 2))
    candidates = [default]
    for change in variants:
        blocks = replace(default, **change)
        if blocks not in candidates:
            candidates.append(blocks)
    return candidates


_TUNED: dict[tuple, Blocks] = {}


def autotune_enabled() -> bool:
    """``FMA_FAST_AUTOTUNE=1``: time the hot ops' candidates on first use (off by default, so
    a first call costs no tuning time and results do not depend on timing noise)."""
    return os.environ.get("FMA_FAST_AUTOTUNE") == "1"


def _cuda_milliseconds(launch: Callable[[], None], repeats: int = 3) -> float:
    """Best of ``repeats`` timed launches after one untimed (compiling) launch."""
    launch()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        launch()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def fastest_blocks(candidates: list[Blocks], launch: Callable[[Blocks], None],
                   timer: Callable[[Callable[[], None]], float] = _cuda_milliseconds) -> Blocks:
    """The candidate whose ``launch`` the ``timer`` measures fastest (ties: the earlier).
    Candidates that cannot be built or launched on this GPU are passed over; when none can,
    the last such error is raised (and the op falls back)."""
    times, failure = [], None
    for blocks in candidates:
        try:
            times.append(timer(lambda blocks=blocks: launch(blocks)))
        except Exception as error:
            if not kernel_failure(error):
                raise
            times.append(float("inf"))
            failure = error
    if failure is not None and min(times) == float("inf"):
        raise failure
    return candidates[times.index(min(times))]


def tuned_blocks(op: str, rows: int, dim: int, classes: int, dtype: torch.dtype,
                 device: torch.device, launch: Callable[[Blocks], None]) -> Blocks:
    """:func:`pick_blocks`, or with :func:`autotune_enabled` on CUDA the fastest of
    :func:`candidate_blocks` for this (op, row bucket, dim, class bucket, dtype, GPU), timed
    once per process. ``launch(blocks)`` must run the op into scratch outputs: it is called
    several times. No tuning during CUDA-graph capture (the default is used there)."""
    arch = device_arch(device)
    default = pick_blocks(op, rows, dim, classes, dtype, arch=arch)
    if (device.type != "cuda" or op not in TUNED_OPS or not autotune_enabled()
            or torch.cuda.is_current_stream_capturing()):
        return default
    key = (op, _pow2(rows), dim, _pow2(classes), dtype, torch.cuda.get_device_name(device))
    if key not in _TUNED:
        candidates = candidate_blocks(op, rows, dim, classes, dtype, arch=arch)
        _TUNED[key] = fastest_blocks(candidates, launch)
    return _TUNED[key]


def check_dot_precision(precision: str) -> str:
    return check_choice("precision", precision, DOT_PRECISIONS)


def row_major(t: torch.Tensor) -> torch.Tensor:
    """The tensor with unit stride along its last dimension (the kernels assume it)."""
    return t if t.stride(-1) == 1 else t.contiguous()


if HAS_TRITON:

    @triton.jit
    def row_inv_norm(x_ptr, stride_x, rows64, row_mask, D, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):
        """1 / max(||x_row||, 1e-12) for a block of rows (F.normalize's eps), fp32."""
        sumsq = tl.zeros((BLOCK_N,), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            mask = row_mask[:, None] & (cols < D)[None, :]
            x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
            x = x.to(tl.float32)
            sumsq += tl.sum(x * x, axis=1)
        return 1.0 / tl.maximum(tl.sqrt(sumsq), 1e-12)

    @triton.jit
    def dot_tile(x_ptr, stride_x, rows64, row_mask, z_ptr, stride_z, cls64, cls_mask, D,
                 BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                 PRECISION: tl.constexpr):
        """x_rows · z_clsᵀ as a (BLOCK_N, BLOCK_C) fp32 tile, accumulated over D chunks."""
        acc = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_mask = cols < D
            x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :],
                        mask=row_mask[:, None] & col_mask[None, :], other=0.0)
            z = tl.load(z_ptr + cls64[:, None] * stride_z + cols[None, :],
                        mask=cls_mask[:, None] & col_mask[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(z), acc, input_precision=PRECISION)
        return acc

    @triton.jit
    def merge_topk(top_v, top_i, scores, cls, K: tl.constexpr, K_PAD: tl.constexpr):
        """Fold a (BLOCK_N, BLOCK_C) score tile into the running unsorted top-K slots.

        Masked columns must hold -inf. Slots K..K_PAD-1 hold +inf so they are never the
        minimum that gets replaced. Each round moves the tile's row maximum (its lowest class
        among equals) into the slot of the running minimum (its highest class among equals)
        when larger, so equal scores keep the lower class index; rounds stop once no row of
        the block can improve, which after the first few tiles is usually at once (at most K
        rounds)."""
        slots = tl.arange(0, K_PAD)
        big = tl.full(cls.shape, 2147483647, tl.int32)
        round_ = 0
        improving = tl.max((tl.max(scores, axis=1) > tl.min(top_v, axis=1)).to(tl.int32),
                           axis=0) > 0
        while improving & (round_ < K):
            best = tl.max(scores, axis=1)
            arg = tl.min(tl.where(scores == best[:, None], cls[None, :], big[None, :]), axis=1)
            scores = tl.where(cls[None, :] == arg[:, None], float("-inf"), scores)
            low = tl.min(top_v, axis=1)
            # of equal minima the highest class goes: equal scores keep the lower class
            at_low = top_v == low[:, None]
            evict = tl.max(tl.where(at_low, top_i, -1), axis=1)
            low_slot = tl.min(tl.where(at_low & (top_i == evict[:, None]), slots[None, :],
                                       K_PAD), axis=1)
            replace = (slots[None, :] == low_slot[:, None]) & (best > low)[:, None]
            top_v = tl.where(replace, best[:, None], top_v)
            top_i = tl.where(replace, arg[:, None], top_i)
            round_ += 1
            improving = tl.max((tl.max(scores, axis=1) > tl.min(top_v, axis=1)).to(tl.int32),
                               axis=0) > 0
        return top_v, top_i
