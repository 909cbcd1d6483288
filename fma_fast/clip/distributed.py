"""Scale-out over processes launched by ``torchrun``: each rank takes a share of the rows and
results are gathered in rank order, so a job gives the same answer on 1 or N processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .._validation import resolve_device
from ..solver import SolveResult, accuracy_by_steps, solve


@dataclass(frozen=True)
class Context:
    """This process's place in the job; the default is a job of one process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def rows(self, count: int) -> slice:
        """This rank's contiguous share of ``count`` rows (earlier ranks take the remainder)."""
        base, extra = divmod(count, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if self.world_size == 1:
            return [value]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``value`` on every rank."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def owner(self, job: int) -> int:
        """The rank that does job number ``job`` whole (jobs are dealt round-robin)."""
        return job % self.world_size

    def device(self, device: str | torch.device | None) -> torch.device:
        """``device``, with a bare "cuda" (or the default) mapped to this rank's local GPU."""
        device = resolve_device(device)
        if device.type == "cuda" and device.index is None and self.world_size > 1:
            return torch.device("cuda", self.local_rank)
        return device


SINGLE = Context()


@contextmanager
def launch() -> Iterator[Context]:
    """Join the job that ``torchrun`` describes in the environment, or run as a single process.

    Only small objects (predictions, counts, the trained field) cross processes, so the gloo
    backend serves CPU and GPU jobs alike and needs no device pinning.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield SINGLE
        return
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo")
    try:
        yield Context(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    finally:
        if owns_group:
            dist.destroy_process_group()


def _cat(parts: list[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
    present = [part for part in parts if part is not None]
    return torch.cat(present) if present else like


def solve_sharded(
    features: torch.Tensor,
    model,
    steps: int,
    *,
    class_features: torch.Tensor,
    context: Context = SINGLE,
    topk: int = 1,
    step_size: float = 0.1,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    backend: str = "auto",
) -> SolveResult:
    """:func:`fma_fast.solve` with this rank solving its share of the rows; every rank gets
    the full result, rows in their original order."""
    share = features[context.rows(features.shape[0])]
    local = None
    if share.shape[0]:
        result = solve(
            share,
            model,
            steps,
            step_size=step_size,
            class_features=class_features,
            topk=topk,
            device=device,
            precision=precision,
            backend=backend,
        )
        local = (result.topk_values.cpu(), result.topk_indices.cpu(), result.path)
    parts = [part for part in context.gather(local) if part is not None]
    values = _cat([p[0] for p in parts], torch.empty(0, topk))
    indices = _cat([p[1] for p in parts], torch.empty(0, topk, dtype=torch.long))
    return SolveResult(
        pred=indices[:, 0].clone(), topk_values=values, topk_indices=indices, path=parts[0][2]
    )


def accuracy_by_steps_sharded(
    model,
    features: torch.Tensor,
    labels: torch.Tensor,
    class_features: torch.Tensor,
    *,
    context: Context = SINGLE,
    max_steps: int = 10,
    step_size: float = 0.1,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    backend: str = "auto",
) -> list[float]:
    """:func:`fma_fast.accuracy_by_steps` over every rank's share: correct counts are summed."""
    share = context.rows(features.shape[0])
    counts = [0] * (max_steps + 1)
    rows = features[share].shape[0]
    if rows:
        accuracy = accuracy_by_steps(
            model,
            features[share],
            labels[share],
            class_features,
            max_steps=max_steps,
            step_size=step_size,
            device=device,
            precision=precision,
            backend=backend,
        )
        counts = [round(a * rows) for a in accuracy]
    totals = [sum(column) for column in zip(*context.gather(counts))]
    return [total / features.shape[0] for total in totals]
