"""Class tables that differ per row (CoCoOp's per-image class features), streamed so that no
more than one row batch's (rows, C, D) block exists at a time (docs/method.md §4).

Scoring against per-row tables is a batched matrix-vector product: every table entry is read
once, for one row, so it is bound by memory bandwidth and ``torch.bmm`` already runs at it.
A Triton kernel would have no reuse to exploit; building the tables (a text tower pass per row
and class) costs orders of magnitude more than scoring them, on the CPU and on CUDA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..core import validation as check
from ..core.policy import LOGIT_SCALE, PER_ROW_TABLE_BYTES
from .scoring import merge_topk


class PerRowClasses:
    """Per-row class tables for ``solve``, ``select_steps``, ``accuracy_by_steps`` and ``fit``.

    Give either ``tables``, an (N, C, D) tensor or numpy array (a memmap stays on disk: it is
    read a row batch at a time), or ``build``, a callable that maps a batch of rows' x_0
    (rows, D) to their tables (rows, C, D), with ``num_classes`` and ``dim``. Tables are scored
    as unit rows (normalised here); both kinds must be dense real floating tensors (complex
    ones would lose their imaginary part; meta, sparse and quantized ones are refused too).
    """

    def __init__(
        self,
        tables=None,
        *,
        build: Callable[[torch.Tensor], torch.Tensor] | None = None,
        num_classes: int | None = None,
        dim: int | None = None,
    ) -> None:
        if (tables is None) == (build is None):
            raise TypeError("give either tables (N, C, D) or build (a callable), not both")
        if tables is not None:
            tables = check.check_dense_float("tables", check.as_tensor("tables", tables))
            if tables.dim() != 3:
                raise ValueError(f"tables must be a floating (N, C, D) array, got shape "
                                 f"{tuple(tables.shape)}")
            self.rows_total: int | None = tables.shape[0]
            num_classes, dim = tables.shape[1], tables.shape[2]
        else:
            if not callable(build):
                raise TypeError(f"build must be callable, got {type(build).__name__}")
            self.rows_total = None
            num_classes = check.check_int("num_classes", num_classes, minimum=1)
            dim = check.check_int("dim", dim, minimum=1)
        if num_classes < 1 or dim < 1:
            raise ValueError(f"tables need at least one class and one dim, got C={num_classes}, "
                             f"D={dim}")
        self.tables, self.build = tables, build
        self.num_classes, self.dim = num_classes, dim

    def batch_rows(self) -> int:
        """Rows per batch that keep one batch's fp32 tables within ``PER_ROW_TABLE_BYTES``."""
        return max(1, PER_ROW_TABLE_BYTES // (4 * self.num_classes * self.dim))

    def check_rows(self, rows: int) -> None:
        if self.rows_total is not None and self.rows_total != rows:
            raise ValueError(f"per-row class tables have {self.rows_total} rows but the "
                             f"features have {rows}")

    def for_rows(self, x0: torch.Tensor, index: slice | torch.Tensor) -> torch.Tensor:
        """The unit-norm fp32 tables (rows, C, D) of the rows ``index`` whose x_0 is ``x0``, on
        ``x0``'s device, checked for shape and NaN/Inf."""
        if self.tables is not None:
            index = index.cpu() if isinstance(index, torch.Tensor) else index
            block = self.tables[index]
        else:
            with torch.no_grad():
                block = self.build(x0)
            if not isinstance(block, torch.Tensor):
                raise TypeError(f"build must return a tensor, got {type(block).__name__}")
            check.check_dense_float("tables from build", block)
        expected = (x0.shape[0], self.num_classes, self.dim)
        if tuple(block.shape) != expected:
            raise ValueError(f"per-row class tables for {x0.shape[0]} rows must have shape "
                             f"{expected}, got {tuple(block.shape)}")
        block = block.detach().to(x0.device, torch.float32)
        check.check_finite("per-row class tables", block)
        return F.normalize(block, dim=-1)

    def targets(self, x0: torch.Tensor, index: torch.Tensor, labels: torch.Tensor
                ) -> torch.Tensor:
        """Each row's own-class text feature (rows, D): what ``fit`` moves x_0 toward."""
        if self.tables is not None:  # gather the rows' own classes only: no (rows, C, D) copy
            picked = self.tables[index.cpu(), labels.cpu()].to(x0.device, torch.float32)
            check.check_finite("per-row class tables", picked)
            return F.normalize(picked, dim=-1)
        block = self.for_rows(x0, index)
        return block[torch.arange(block.shape[0], device=block.device), labels]


def cosines(state: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """cos(x_n, z_{n,c}) (rows, C) against unit-norm per-row tables (rows, C, D)."""
    unit = F.normalize(state.float(), dim=-1)
    return torch.bmm(tables, unit.unsqueeze(-1)).squeeze(-1)


def scores(state: torch.Tensor, tables: torch.Tensor, k: int, *, with_lse: bool = False,
           labels: torch.Tensor | None = None):
    """Top-k cosines and classes (equal cosines: the lower class first, as everywhere), the
    log-sum-exp of 100·cos when asked, and each row's own-label cosine when labels are given."""
    cos = cosines(state, tables)
    values, indices = merge_topk(None, cos, torch.arange(cos.shape[1], device=cos.device)
                                 .expand_as(cos), k)
    lse = torch.logsumexp(LOGIT_SCALE * cos, dim=1) if with_lse else None
    true = None if labels is None else cos.gather(1, labels.view(-1, 1)).squeeze(1)
    return values, indices, lse, true
