"""Processes launched by ``torchrun``: this process's place in the job (:class:`Context`),
and joining the job that the environment describes (:func:`launch`). A job of one process
needs no torch.distributed at all."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .validation import resolve_device


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
    backend serves CPU and GPU jobs alike. On a machine with GPUs, each rank's local GPU is the
    current CUDA device inside the block: a bare "cuda" and every kernel launch (Triton
    launches on the current device and its stream) then go to that rank's GPU, not all to
    GPU 0.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        yield SINGLE
        return
    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo")
    try:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        with _local_gpu(local_rank):
            yield Context(dist.get_rank(), dist.get_world_size(), local_rank)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _local_gpu(local_rank: int) -> AbstractContextManager:
    """GPU ``local_rank`` as the current CUDA device while the block runs (the previous one
    afterwards); nothing without that GPU (a CPU job)."""
    if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
        return torch.cuda.device(local_rank)
    return nullcontext()
