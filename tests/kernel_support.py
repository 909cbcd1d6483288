"""Test support for the kernels: a located assert_close on the one per-dtype tolerance table
(``fma_fast.policy.TOLERANCES``, which the doctor uses too), and the device the kernel tests
run on. Imports without triton."""

from __future__ import annotations

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
