"""Test support for the kernels: a located assert_close on the one per-dtype tolerance table
(``fma_fast.core.policy.TOLERANCES``, which the doctor uses too), the device the kernel tests
run on, and GPU numerics in the interpreter. Imports without triton."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import ModuleType

import torch

from fma_fast.core.policy import TOLERANCES
from fma_fast.kernels._common import HAS_TRITON, interpreter_active


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
    default_rtol, default_atol = TOLERANCES[dtype].rtol, TOLERANCES[dtype].atol
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


class FakeCudaDevices:
    """torch's current-CUDA-device bookkeeping on a machine without CUDA: ``count`` devices,
    device 0 current, ``torch.cuda.device``/``set_device`` switching ``current`` (what
    ``torch.cuda.current_device()``, and so Triton's launcher, then reports). Patched with
    ``monkeypatch``, undone after the test."""

    def __init__(self, monkeypatch, count: int = 2) -> None:
        self.current = 0
        self.count = count
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "_exchange_device", self._exchange)
        monkeypatch.setattr(torch.cuda, "_maybe_exchange_device", self._exchange)
        monkeypatch.setattr(torch.cuda, "set_device", lambda device: self._exchange(
            torch.cuda._utils._get_device_index(device)))

    def _exchange(self, index: int) -> int:
        if index >= self.count:
            raise RuntimeError(f"fake CUDA: no device {index} of {self.count}")
        previous = self.current
        if index >= 0:  # torch: a negative index leaves the device as it is
            self.current = index
        return previous


def exact_ties(classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Four one-hot rows x (4, D), an exactly unit-norm class table (C, D) and the cosines
    (4, C) the table was built with, in {-0.5, -0.25, 0, 0.25, 0.5}: many exact ties, inside
    and across class tiles. Rows 0 and 3 are random (about C/5 classes per level). In 16-class
    tiles, row 1 has zeros and one better class in each later tile (23, 39), so a running
    top-k must evict one of several equal minima (the higher class); row 2 has class 1 above
    the zeros and 24, 40 tied above it, so the slots end holding 40 before 24 and only the
    final ordering can put 24 first. Every cosine is one product of exact binary fractions
    plus zeros, the same in any summation order or tile, and the rows are unit-norm exactly
    (padding entries of 0.25), so no normalisation breaks a tie."""
    rows = 4
    g = torch.Generator().manual_seed(seed)
    levels = torch.randint(-2, 3, (rows, classes), generator=g).float() / 4
    levels[1:3] = 0
    for row, picks in ((1, {23: 0.25, 39: 0.5}), (2, {1: 0.25, 24: 0.5, 40: 0.5})):
        for c, level in picks.items():
            if c < classes:
                levels[row, c] = level
    pads = (16 - 16 * (levels ** 2).sum(0)).long()  # entries of 0.25 that complete the norm
    table = torch.zeros(classes, rows + 16)
    table[:, :rows] = levels.T
    for c, count in enumerate(pads.tolist()):
        table[c, rows:rows + count] = 0.25
    x = torch.eye(rows, rows + 16)
    assert torch.equal((table ** 2).sum(1), torch.ones(classes)), "the table is not unit-norm"
    return x, table, levels


def tie_rule_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The k best columns of each row by brute force: higher score first, equal scores in
    ascending column order (fma_fast's documented tie rule)."""
    return torch.tensor([sorted(range(len(row)), key=lambda c: (-row[c], c))[:k]
                         for row in scores.tolist()])
