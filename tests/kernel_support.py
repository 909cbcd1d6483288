"""Test support for the kernels: a located assert_close on the one per-dtype tolerance table
(``fma_fast.policy.TOLERANCES``, which the doctor uses too), the device the kernel tests run on,
and GPU numerics in the interpreter. Imports without triton."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType

import torch

from fma_fast.kernels._common import HAS_TRITON, interpreter_active
from fma_fast.policy import TOLERANCES


def kernel_device() -> str | None:
    """'cuda' when a GPU and triton are there, 'cpu' under the interpreter, else None."""
    if not HAS_TRITON:
        return None
    if torch.cuda.is_available() and not interpreter_active():
        return "cuda"
    return "cpu" if interpreter_active() else None


SKIP_REASON = ("SKIPPED, not passed: the Triton kernels need triton plus CUDA, or "
               "TRITON_INTERPRET=1 exported before triton is imported (tests/conftest.py sets it "
               "when there is no GPU)")

HALF_SKIP_REASON = ("SKIPPED, not passed: fp16/bf16 kernels are tested on CUDA only (the Triton "
                    "interpreter has no bfloat16 and emulates halves in numpy, which says nothing "
                    "about tensor-core numerics)")


NUMERICS = ("native", "emulated-sm90")
"""How a kernel test may run its fp32 dots: natively (exact products on the interpreter's small
tiles, or the GPU's own), or, in the interpreter, as an sm_90 GPU would (:func:`gpu_numerics`)."""


@contextlib.contextmanager
def gpu_numerics(*kernel_modules: ModuleType) -> Iterator[None]:
    """Within the block, the interpreter rounds fp32 dots as tf32x3/tf32 do on a GPU
    (``fma_fast.kernels.tf32_emulation``) and the kernels of ``kernel_modules`` take the block
    sizes ``pick_blocks`` gives on Hopper: the accumulation order of the GPU's tiles, not the
    interpreter's 16-wide ones."""
    from fma_fast.kernels import _common, tf32_emulation

    def hopper_blocks(*args, **kwargs):
        real_active = _common.interpreter_active
        _common.interpreter_active = lambda: False
        try:
            return real_pick(*args, **kwargs)
        finally:
            _common.interpreter_active = real_active

    real_pick = _common.pick_blocks
    originals = [(module, module.pick_blocks) for module in kernel_modules]
    for module, _ in originals:
        module.pick_blocks = hopper_blocks
    try:
        with tf32_emulation.emulated():
            yield
    finally:
        for module, pick in originals:
            module.pick_blocks = pick


def numerics_context(numerics: str, *kernel_modules: ModuleType):
    """The context of one of :data:`NUMERICS` (skips "sm90" where there is no interpreter)."""
    import pytest

    if numerics == "native":
        return contextlib.nullcontext()
    if kernel_device() != "cpu":
        pytest.skip("SKIPPED, not passed: GPU numerics are emulated only in the interpreter "
                    "(on CUDA the real ones run)")
    return gpu_numerics(*kernel_modules)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str,
                 dtype: torch.dtype = torch.float32, rtol: float | None = None,
                 atol: float | None = None) -> None:
    """Elementwise |actual - expected| <= atol + rtol·|expected|, with the dtype's defaults.

    On failure the message names ``what``, the count of mismatches, the first mismatching
    index (row, col, ...) and the worst one, with both values at each.
    """
    default_rtol, default_atol = TOLERANCES[dtype]
    rtol = default_rtol if rtol is None else rtol
    atol = default_atol if atol is None else atol
    if actual.shape != expected.shape:
        raise AssertionError(f"{what}: shape {tuple(actual.shape)} != expected "
                             f"{tuple(expected.shape)}")
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    err = (a - e).abs()
    bad = ~(err <= atol + rtol * e.abs())  # NaN counts as a mismatch
    if not bool(bad.any()):
        return
    first = tuple(int(i) for i in bad.nonzero()[0])
    worst = tuple(int(i) for i in torch.unravel_index(err.nan_to_num(float("inf")).argmax(),
                                                      err.shape))
    raise AssertionError(
        f"{what}: {int(bad.sum())} of {bad.numel()} elements differ beyond rtol={rtol:g}, "
        f"atol={atol:g}; first at {first}: got {a[first]:.9g}, expected {e[first]:.9g}; "
        f"worst at {worst}: got {a[worst]:.9g}, expected {e[worst]:.9g}"
    )
