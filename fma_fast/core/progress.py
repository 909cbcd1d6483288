"""Progress of long jobs (fit, encode, score, predict, report): a bar on a terminal, and where
output goes to a log (no terminal), one line every ``policy.PROGRESS_SECONDS`` with the rate
and the time left, so a job in a batch system or CI is never silent for minutes."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm.auto import tqdm

from . import policy


def _interval() -> float:
    """Seconds between two lines: ``policy.PROGRESS_SECONDS``, or
    ``FMA_FAST_PROGRESS_SECONDS``."""
    text = os.environ.get("FMA_FAST_PROGRESS_SECONDS")
    if text is None:
        return policy.PROGRESS_SECONDS
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"FMA_FAST_PROGRESS_SECONDS={text!r}: expected a number of seconds") from None
    if not value >= 0:
        raise ValueError(f"FMA_FAST_PROGRESS_SECONDS={text!r}: expected seconds >= 0")
    return value


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LogProgress:
    """The log form of a bar: the same calls as tqdm's (update, set_postfix, close,
    iteration), one line per interval: ``desc: done/total unit (p%), rate unit/s, ETA``."""

    def __init__(self, iterable: Iterable | None, total: float | None, desc: str, unit: str,
                 stream: TextIO, interval: float) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.stream, self.interval = stream, interval
        self.done = 0.0
        self.postfix = ""
        self.start = self.last = time.monotonic()
        self.lines = 0

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update(1)

    def update(self, n: float = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self._line(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        if self.lines:  # a job that logged progress also logs its end
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        self.last, self.lines = now, self.lines + 1
        elapsed = max(now - self.start, 1e-9)
        rate = self.done / elapsed
        count = f"{self.done:,.0f}"
        if self.total:
            count += f"/{self.total:,.0f} {self.unit} ({100 * self.done / self.total:.0f}%)"
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            eta = f", ETA {_clock(left)}" if left != float("inf") else ""
        else:
            count, eta = f"{count} {self.unit}", ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {count}, {rate:,.1f} {self.unit}/s, elapsed {_clock(elapsed)}"
              f"{eta}{extra}", file=self.stream, flush=True)


def progress(iterable: Iterable | None = None, *, total: float | None = None, desc: str,
             unit: str, enabled: bool = True, stream: TextIO | None = None) -> Any:
    """A bar on a terminal, :class:`LogProgress` lines in a log, nothing when not
    ``enabled``: what every long job of the library reports its progress with."""
    stream = stream or sys.stderr
    if enabled and not (hasattr(stream, "isatty") and stream.isatty()):
        return LogProgress(iterable, total, desc, unit, stream, _interval())
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, leave=False,
                file=stream)
