"""Progress of a long job: a tqdm bar on a terminal, else one line every
:data:`~fma_fast.core.policy.PROGRESS_SECONDS` (done, rate, ETA) so that a log shows that the
job moves and when it should end."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm.auto import tqdm

from . import policy


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class Progress:
    """Counts ``total`` units of work under ``desc``. ``enabled`` False: silent. The bar or the
    lines go to ``stream`` (stderr, as tqdm's); lines only when it is not a terminal."""

    def __init__(self, total: int, *, desc: str, unit: str, enabled: bool = True,
                 stream: TextIO | None = None, interval: float | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream if stream is not None else sys.stderr
        self.interval = policy.PROGRESS_SECONDS if interval is None else interval
        self.done = 0
        self.started = self.last = time.monotonic()
        terminal = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False,
                        file=self.stream) if enabled and terminal else None
        self.lines = enabled and not terminal

    def update(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        now = time.monotonic()
        if self.lines and now - self.last >= self.interval:
            self.last = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now: float | None = None) -> str:
        """``desc: done/total unit (pct), rate unit/s, ETA``."""
        elapsed = (time.monotonic() if now is None else now) - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = (f", ETA {_duration((self.total - self.done) / rate)}" if rate > 0
               else ", ETA unknown")
        return (f"{self.desc}: {self.done:,}/{self.total:,} {self.unit}{share}, "
                f"{rate:,.1f} {self.unit}/s{eta}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
