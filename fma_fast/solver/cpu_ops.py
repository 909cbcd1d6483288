"""The elementwise and GEMM ops of the half-precision folded chain (docs/method.md §3).

:func:`linear` is ``x @ weight + bias`` through oneDNN's linear, which adds the bias in the
GEMM's epilogue, where ``torch.addmm`` (its twin, and the fallback) first copies the broadcast
bias into the output: one pass over every GEMM's output less. oneDNN's linear is
``torch.ops.mkldnn._linear_pointwise``, the op inductor itself emits for frozen CPU linears; it
is probed once, and ``addmm`` runs where it is missing or disagrees.
"""

from __future__ import annotations

import functools

import torch


def inverse_rms(hidden: torch.Tensor, out: torch.Tensor, eps: float) -> torch.Tensor:
    """1/sqrt(mean(h²) + eps) per row: the LayerNorm scale of the mean-free hidden state."""
    torch.linalg.vector_norm(hidden, dim=1, keepdim=True, out=out)
    return out.square_().div_(hidden.shape[1]).add_(eps).rsqrt_()


def normed(hidden: torch.Tensor, rstd: torch.Tensor, eps: float, out: torch.Tensor
           ) -> torch.Tensor:
    """``out = hidden / rms(hidden)`` in ``out``'s dtype (the eager twin's two passes)."""
    return torch.mul(hidden, inverse_rms(hidden, rstd, eps), out=out)


def residual_normed(hidden: torch.Tensor, update: torch.Tensor, rstd: torch.Tensor,
                    eps: float, out: torch.Tensor) -> torch.Tensor:
    """``hidden += update`` (fp32 += half), then the next GEMM's operand :func:`normed`."""
    return normed(hidden.add_(update), rstd, eps, out)


@functools.cache
def _onednn_linear_works() -> bool:
    """Whether oneDNN's fused linear exists here and matches ``addmm`` on a small bf16 case."""
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return False
    generator = torch.Generator().manual_seed(0)
    x, weight, bias = (torch.randn(shape, generator=generator).to(torch.bfloat16)
                       for shape in ((5, 24), (24, 40), (40,)))
    try:
        got = op(x, weight.t(), bias, "none", [], "")
    except (RuntimeError, TypeError):
        return False
    expected = torch.addmm(bias.float(), x.float(), weight.float())
    return got.shape == expected.shape and bool(
        torch.allclose(got.float(), expected, rtol=2e-2, atol=5e-2))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x @ weight + bias`` (weight stored (in, out)), bias in the GEMM's epilogue when
    oneDNN's linear runs here (bf16 CPU tensors), else ``torch.addmm``."""
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and _onednn_linear_works():
        return torch.ops.mkldnn._linear_pointwise(x, weight.t(), bias, "none", [], "")
    return torch.addmm(bias, x, weight)
