"""Scoring in torch with bounded memory (docs/method.md §4): top-k cosines, the log-sum-exp
and the cosine cross-entropy, one class tile at a time, so no (rows × C) matrix exists.

The CPU solve scores this way, and so does a GPU whose Triton scoring kernel cannot run there
(the fallback of :mod:`fma_fast.ops.dispatch`). The plain twins that build (rows × C) live in
:mod:`fma_fast.core.reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core import policy, reference
from ..core.policy import LOGIT_SCALE


def merge_topk(
    best: tuple[torch.Tensor, torch.Tensor] | None,
    values: torch.Tensor,
    indices: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The running top-k of a row block merged with a new class tile's candidates, best first;
    equal cosines keep the lower class index first (as the Triton kernel does), so results do
    not depend on where the tile borders fall."""
    if best is not None:
        values = torch.cat([best[0], values], dim=1)
        indices = torch.cat([best[1], indices], dim=1)
    by_index = indices.argsort(dim=1)
    values, indices = values.gather(1, by_index), indices.gather(1, by_index)
    order = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, order), indices.gather(1, order)


def tiled_scores(
    x: torch.Tensor,
    class_features: torch.Tensor,
    k: int,
    *,
    with_lse: bool = False,
    logit_scale: float = LOGIT_SCALE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Top-k cosines (values best first, int64 indices) of the rows of ``x`` against the
    unit-norm rows of ``class_features`` and, with ``with_lse``, each row's
    logsumexp_c(``logit_scale``·cos), from one pass over class tiles (an online log-sum-exp)."""
    unit = F.normalize(x.float(), dim=-1)
    z = class_features.to(unit.dtype)
    rows, classes = unit.shape[0], z.shape[0]
    width = max(policy.CLASS_TILE, k)  # a tile no narrower than the top-k: few merges of k
    tile = torch.empty(rows, min(width, classes), dtype=unit.dtype, device=unit.device)
    best = None
    running_max = running_sum = None
    if with_lse:
        running_max = torch.full((rows, 1), -torch.inf, dtype=unit.dtype, device=unit.device)
        running_sum = torch.zeros(rows, 1, dtype=unit.dtype, device=unit.device)
    for start in range(0, classes, width):
        stop = min(start + width, classes)
        cosines = torch.mm(unit, z[start:stop].T, out=tile[:, : stop - start])
        values, indices = reference.topk(cosines, min(k, stop - start))
        best = merge_topk(best, values, indices + start, k)
        if not with_lse:
            continue
        # Online log-sum-exp of scale·cos, in place on the tile (its cosines are used up).
        new_max = torch.maximum(running_max, logit_scale * values[:, :1])
        running_sum.mul_((running_max - new_max).exp_())
        cosines.mul_(logit_scale).sub_(new_max).exp_()
        running_sum.add_(cosines.sum(dim=1, keepdim=True))
        running_max = new_max
    lse = (running_max + running_sum.log())[:, 0] if with_lse else None
    return best[0], best[1], lse


def true_cosines(x: torch.Tensor, class_features: torch.Tensor, labels: torch.Tensor
                 ) -> torch.Tensor:
    """cos(x_n, z_{labels_n}) per row against unit-norm ``class_features`` (no (N, C) matrix)."""
    unit = F.normalize(x.float(), dim=-1)
    return (unit * class_features[labels].to(unit.dtype)).sum(dim=1)


def tiled_topk(
    x: torch.Tensor, class_features: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosines against unit-norm ``class_features``, class tile by class tile."""
    values, indices, _ = tiled_scores(x, class_features, k)
    return values, indices


def tiled_logsumexp(x: torch.Tensor, class_features: torch.Tensor, logit_scale: float
                    ) -> torch.Tensor:
    """logsumexp_c(``logit_scale``·cos(x_n, z_c)) per row, class tile by class tile."""
    return tiled_scores(x, class_features, 1, with_lse=True, logit_scale=logit_scale)[2]


class TiledCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of softmax(scale·u·ẑᵀ) for unit rows u (N, D) and a unit table ẑ
    (C, D), in blocks of CLASS_TILE rows × CLASS_TILE classes both ways: the forward keeps
    each row's log-sum-exp, the backward recomputes the probabilities p tile by tile for
    du = scale/N·(p·ẑ − ẑ_y) and dẑ = scale/N·(pᵀ·u − Σ_{y_n=c} u_n), so no (N, C) matrix is
    held for the backward either."""

    @staticmethod
    def forward(ctx, unit, table, labels, logit_scale):
        lse = torch.full((unit.shape[0],), -torch.inf, dtype=unit.dtype, device=unit.device)
        for rows, _, cosines in _tiles(unit, table):
            lse[rows] = torch.logaddexp(lse[rows], torch.logsumexp(logit_scale * cosines, 1))
        true = (unit * table[labels]).sum(dim=1)
        ctx.save_for_backward(unit, table, labels, lse)
        ctx.logit_scale = logit_scale
        return (lse - logit_scale * true).mean()

    @staticmethod
    def backward(ctx, grad):
        unit, table, labels, lse = ctx.saved_tensors
        scale = ctx.logit_scale
        grad_unit = torch.zeros_like(unit) if ctx.needs_input_grad[0] else None
        grad_table = torch.zeros_like(table) if ctx.needs_input_grad[1] else None
        for rows, classes, cosines in _tiles(unit, table):
            probs = cosines.mul_(scale).sub_(lse[rows, None]).exp_()
            if grad_unit is not None:
                grad_unit[rows].addmm_(probs, table[classes])
            if grad_table is not None:
                grad_table[classes].addmm_(probs.T, unit[rows])
        coef = grad * scale / unit.shape[0]
        if grad_unit is not None:
            grad_unit = grad_unit.sub_(table[labels]).mul_(coef)
        if grad_table is not None:
            grad_table = grad_table.index_add_(0, labels, unit, alpha=-1).mul_(coef)
        return grad_unit, grad_table, None, None


def _tiles(unit: torch.Tensor, table: torch.Tensor):
    """(rows, classes, cosines) for every block of CLASS_TILE rows × CLASS_TILE classes."""
    tile = policy.CLASS_TILE
    for start in range(0, unit.shape[0], tile):
        rows = slice(start, min(start + tile, unit.shape[0]))
        for first in range(0, table.shape[0], tile):
            classes = slice(first, min(first + tile, table.shape[0]))
            yield rows, classes, unit[rows] @ table[classes].T


def tiled_cross_entropy(
    x: torch.Tensor, class_features: torch.Tensor, labels: torch.Tensor, logit_scale: float
) -> torch.Tensor:
    """Mean cross-entropy of softmax(``logit_scale``·cos) against labels, class tile by tile
    (unit-norm ``class_features``), differentiable w.r.t. both without an (N, C) matrix."""
    unit = F.normalize(reference.at_least_fp32(x), dim=-1)
    return TiledCrossEntropy.apply(unit, class_features.to(unit.dtype), labels,
                                   float(logit_scale))
