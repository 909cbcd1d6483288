"""solver.cpu_ops: oneDNN's linear (bias in the GEMM epilogue) against its addmm twin, the fallback,
and the half-precision LayerNorm passes of the folded CPU chain against plain formulas."""

from __future__ import annotations

import pytest
import torch
from kernel_support import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from fma_fast.solver import cpu_ops

SHAPES = [(1, 8, 16), (37, 24, 40), (257, 96, 80), (1024, 512, 512)]  # (rows, in, out)


def _operands(rows: int, cols_in: int, cols_out: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols_in, generator=generator)
    weight = torch.randn(cols_in, cols_out, generator=generator) / cols_in**0.5
    bias = torch.randn(cols_out, generator=generator)
    return x.to(dtype), weight.to(dtype), bias.to(dtype)


def _onednn_bf16() -> bool:
    """Whether oneDNN has a bf16 path here (BF16 units, or emulated on AVX-512 without them):
    cpu_ops probes the op itself; this only says where the probe must succeed."""
    return bool(torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.mark.parametrize("rows, cols_in, cols_out", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_linear_matches_x_weight_plus_bias(rows, cols_in, cols_out, dtype):
    x, weight, bias = _operands(rows, cols_in, cols_out, dtype, seed=rows + cols_out)
    got = cpu_ops.linear(x, weight, bias)
    assert got.dtype == dtype and got.shape == (rows, cols_out)
    where = f"{dtype} {rows}x{cols_in}x{cols_out}"
    if dtype != torch.float32:  # halves: within their rounding of the exact product
        expected = torch.addmm(bias.double(), x.double(), weight.double())
        assert_close(got, expected, f"linear {where} vs float64", dtype)
    assert_close(got, torch.addmm(bias, x, weight), f"linear {where} vs its addmm twin", dtype)


def test_linear_runs_onednn_where_it_has_a_bf16_path_and_addmm_otherwise(monkeypatch):
    """The fast path must not be silently dead: where oneDNN has a bf16 path bf16 rows go to
    its linear; where it has none (AVX2: it cannot create the primitive), with the probe
    failing, or for fp16 they go to addmm."""
    ops: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.append(str(func))
            return func(*args, **(kwargs or {}))

    x, weight, bias = _operands(9, 16, 24, torch.bfloat16, seed=1)
    if not _onednn_bf16():
        assert not cpu_ops._onednn_linear_works()
        with Record():
            cpu_ops.linear(x, weight, bias)
        assert any("addmm" in op for op in ops) and not any("_linear_pointwise" in op
                                                            for op in ops), ops
        return
    with Record():
        fused = cpu_ops.linear(x, weight, bias)
    assert any("_linear_pointwise" in op for op in ops), ops
    assert not any("addmm" in op for op in ops), ops

    ops.clear()
    monkeypatch.setattr(cpu_ops, "_onednn_linear_works", lambda: False)
    with Record():
        fallback = cpu_ops.linear(x, weight, bias)
        cpu_ops.linear(x.half(), weight.half(), bias.half())
    assert sum("addmm" in op for op in ops) == 2 and not any("_linear_pointwise" in op
                                                             for op in ops), ops
    assert_close(fused, fallback, "oneDNN linear vs its addmm fallback", torch.bfloat16)


@pytest.mark.parametrize("rows, width", [(1, 8), (33, 40), (300, 512)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_residual_then_normed_operand(rows, width, dtype):
    """hidden += update, then the next GEMM's operand hidden / sqrt(mean(hidden²) + eps)."""
    generator = torch.Generator().manual_seed(rows)
    hidden = torch.randn(rows, width, generator=generator) * 3
    update = torch.randn(rows, width, generator=generator).to(dtype)
    eps = 1e-6
    advanced = hidden.double() + update.double()
    expected = advanced / (advanced.square().mean(1, keepdim=True) + eps).sqrt()
    rstd = torch.empty(rows, 1)
    out = torch.empty(rows, width, dtype=dtype)
    got = cpu_ops.residual_normed(hidden, update, rstd, eps, out)
    assert got.data_ptr() == out.data_ptr()
    assert_close(hidden, advanced, "hidden after the residual add")  # fp32 stream kept
    assert_close(got, expected, f"normed operand ({dtype})", dtype)
