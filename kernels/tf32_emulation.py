"""fp32 ``tl.dot`` in the Triton interpreter with a GPU's tensor-core rounding (a test tool).

The interpreter multiplies fp32 tiles exactly whatever ``input_precision`` says, so a tolerance
that only holds for exact products passes here and fails on the first GPU run. With
``FMA_FAST_INTERPRET_TF32=1`` (read when the kernels are imported, like ``TRITON_INTERPRET``) or
inside :func:`emulated`, fp32 dots round their operands as an NVIDIA GPU does:

* ``"tf32"``: the tensor core reads the top 19 bits of each fp32 operand (1 sign, 8 exponent,
  10 mantissa bits; the low 13 are dropped, i.e. truncated toward zero);
* ``"tf32x3"`` (Triton's F32DotTC rewrite, 3.4 and later): ``big = cvt.rna.tf32(a)`` (round to
  nearest, ties away), ``small = a - big`` (exact in fp32); ``small·big_b`` then ``big_a·small_b``
  from zero, NaNs of that sum zeroed, ``big_a·big_b`` on top, and the accumulator added last;
  each of the three products reads its operands as ``"tf32"`` does (``small`` is truncated);
* ``"ieee"`` and half/bf16 operands: unchanged (exact products, fp32 sums).

Each MMA is modelled per 8-wide K slice (a Hopper tf32 ``wgmma``'s K): the slice's products
summed exactly, then added to the fp32 accumulator with one rounding. The hardware's own
alignment and truncation inside a slice differ in the last bit; the operand rounding, which
sets the error (about 2⁻²¹·Σ|a||b| for tf32x3, 2⁻¹¹·Σ|a||b| for tf32), is modelled exactly.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np

ENV = "FMA_FAST_INTERPRET_TF32"
"""Set to 1 (before the kernels are imported, with TRITON_INTERPRET=1) to emulate."""

MMA_K = 8
"""Products summed per tensor-core instruction before the fp32 accumulator is rounded."""

_LOW_BITS = np.uint32(0x1FFF)  # the 13 mantissa bits tf32 does not have
_HALF_ULP = np.uint32(0x1000)


def tf32_truncate(a: np.ndarray) -> np.ndarray:
    """What a tensor core reads of fp32 ``a`` in tf32 mode: the low 13 bits cleared."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return (bits & ~_LOW_BITS).view(np.float32)


def tf32_round(a: np.ndarray) -> np.ndarray:
    """``cvt.rna.tf32.f32``: fp32 ``a`` to the nearest tf32, ties away from zero (NaN and
    infinity kept)."""
    a = np.ascontiguousarray(a, dtype=np.float32)
    bits = a.view(np.uint32)
    rounded = ((bits + _HALF_ULP) & ~_LOW_BITS).view(np.float32)
    return np.where(np.isfinite(a), rounded, a).astype(np.float32)


def _mma(a: np.ndarray, b: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """acc + a @ b with tf32-read operands, one fp32 rounding per MMA_K slice of K."""
    a, b = tf32_truncate(a).astype(np.float64), tf32_truncate(b).astype(np.float64)
    acc = acc.astype(np.float32, copy=True)
    for k0 in range(0, a.shape[-1], MMA_K):
        part = np.matmul(a[..., k0:k0 + MMA_K], b[..., k0:k0 + MMA_K, :])
        acc = (acc.astype(np.float64) + part).astype(np.float32)
    return acc


def tf32x3_dot(a: np.ndarray, b: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """acc + a @ b as Triton's tf32x3 rewrite computes it on an NVIDIA GPU (fp32 result)."""
    a_big, b_big = tf32_round(a), tf32_round(b)
    a_small = (a.astype(np.float32) - a_big).astype(np.float32)
    b_small = (b.astype(np.float32) - b_big).astype(np.float32)
    zero = np.zeros(acc.shape, np.float32)
    small = _mma(a_big, b_small, _mma(a_small, b_big, zero))
    big = _mma(a_big, b_big, np.where(np.isnan(small), np.float32(0), small))
    return (big + acc.astype(np.float32)).astype(np.float32)


def tf32_dot(a: np.ndarray, b: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """acc + a @ b with tf32 ("tf32" input precision) operands (fp32 result)."""
    return _mma(a, b, acc)


_EMULATED = {"TF32": tf32_dot, "TF32x3": tf32x3_dot}


def _builder():
    from triton.runtime import interpreter

    return interpreter.InterpreterBuilder


def active() -> bool:
    """Whether fp32 dots in the interpreter are rounded as on a GPU now."""
    return getattr(_builder().create_dot, "tf32_emulation", False)


def install() -> None:
    """Round fp32 ``tl.dot`` operands as on a GPU from now on in this process (idempotent)."""
    from triton.runtime.interpreter import TensorHandle

    builder = _builder()
    if active():
        return
    exact = builder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        emulate = _EMULATED.get(getattr(input_precision, "name", str(input_precision)))
        fp32 = a.data.dtype == np.float32 and b.data.dtype == np.float32
        if emulate is None or not fp32 or d.data.dtype != np.float32:
            return exact(self, a, b, d, input_precision, max_num_imprecise_acc)
        return TensorHandle(emulate(a.data, b.data, d.data), d.dtype.scalar)

    create_dot.tf32_emulation = True
    create_dot.exact = exact
    builder.create_dot = create_dot


def uninstall() -> None:
    """Exact fp32 dots again (the interpreter's own)."""
    builder = _builder()
    if active():
        builder.create_dot = builder.create_dot.exact


@contextlib.contextmanager
def emulated(on: bool = True) -> Iterator[None]:
    """Within the block, fp32 dots are rounded as on a GPU (``on``) or exact (not ``on``)."""
    was = active()
    install() if on else uninstall()
    try:
        yield
    finally:
        install() if was else uninstall()


def requested() -> bool:
    """Whether the environment asks for the emulation (``FMA_FAST_INTERPRET_TF32=1``)."""
    return os.environ.get(ENV) == "1"
