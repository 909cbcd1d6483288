"""Reading a scoring job's inputs: the parts each input shard is cut into, and the rows of
those parts chunk by chunk from a reader thread, with the digest of the bytes each part read."""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..io.row_sources import PartDigest, ShardReader


class Source(Protocol):
    """What the job needs of an input to cut it into parts and record them: a feature
    :class:`~fma_fast.io.row_sources.Shard`, or a list of images (``fma-fast predict``)."""

    path: Path

    @property
    def rows(self) -> int: ...

    def record(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Part:
    """Rows ``start:stop`` of an input (a shard): the unit written atomically and recorded."""

    shard: Source
    index: int
    start: int
    stop: int
    stem: str


def plan_parts(shards: Sequence[Source], part_rows: int) -> list[list[Part]]:
    """Every shard cut into parts of at most ``part_rows`` rows, named after the shard."""
    out = []
    for shard in shards:
        stops = list(range(0, shard.rows, part_rows))[1:] + [shard.rows]
        starts = [0] + stops[:-1]
        prefix = part_prefix(shard)
        out.append([Part(shard, i, a, b, f"{prefix}{i:05d}")
                    for i, (a, b) in enumerate(zip(starts, stops))])
    return out


def part_prefix(shard: Source) -> str:
    """The start of a shard's part names: its stem and a digest of its resolved path."""
    tag = hashlib.sha256(str(shard.path.resolve()).encode()).hexdigest()[:8]
    return f"{shard.path.stem}-{tag}.part"


def reader_for(part: Part, reader: ShardReader | None) -> ShardReader:
    """A reader of ``part``'s shard: ``reader`` when it reads that shard, else a new one
    (``reader`` closed). Parts come shard by shard, so each shard is opened once."""
    if reader is not None and reader.shard is part.shard:
        return reader
    if reader is not None:
        reader.close()
    return part.shard.open()


PREFETCH_DEPTH = 2
"""Chunks read ahead of the one being solved."""


def prefetch(parts: list[Part], chunk: int, pin: bool
             ) -> Iterator[tuple[Part, tuple, str | None]]:
    """(part, (features, labels, ids), digest) chunk by chunk, read ahead in a thread; the
    digest of the part's input bytes comes with its last chunk (None before), after the file
    was checked to be unchanged since it was planned.

    One handle per input shard. The rows land in a ring of ``PREFETCH_DEPTH + 2`` reused
    buffers (queued, being solved, being read): a fresh buffer per chunk would let the heap
    fragment and grow with N. A chunk's features are only valid until the consumer asks for
    the chunk after next.
    """
    widest = max((part.shard.features.row_bytes for part in parts), default=0)
    ring = [bytearray(chunk * widest) for _ in range(PREFETCH_DEPTH + 2)] if parts else []

    def read() -> Iterator[tuple[Part, tuple, str | None]]:
        reader: ShardReader | None = None
        try:
            number = 0
            for part in parts:
                reader = reader_for(part, reader)
                digest = PartDigest(part.shard)
                for start in range(part.start, part.stop, chunk):
                    buffer = ring[number % len(ring)]
                    number += 1
                    end = min(start + chunk, part.stop)
                    rows = reader.read(start, end, buffer, digest)
                    if pin:
                        rows = (rows[0].pin_memory(), *rows[1:])
                    finished = None
                    if end == part.stop:
                        reader.check_unchanged((part.start, part.stop, digest))
                        finished = digest.hexdigest()
                    yield part, rows, finished
        finally:
            if reader is not None:
                reader.close()

    return threaded(read(), "score-reader", PREFETCH_DEPTH)


def threaded(items: Iterable, name: str, depth: int = PREFETCH_DEPTH) -> Iterator:
    """The items of ``items`` produced in a thread, at most ``depth`` ahead of the consumer: a
    stage of a pipeline (decode -> encode -> solve). An error in the thread is raised in the
    consumer; a consumer that stops (or fails) stops the thread, which closes ``items``."""
    handed: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                handed.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((end, None))
        except BaseException as error:  # handed to the consumer, raised there
            put((None, error))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=produce, name=f"fma-fast-{name}", daemon=True)
    worker.start()
    try:
        while True:
            item, error = handed.get()
            if error is not None:
                raise error
            if item is end:
                return
            yield item
    finally:
        stop.set()
        worker.join()
