"""Benchmark helpers: a session-wide throughput log, printed as a table after the run."""

from __future__ import annotations

import pytest

THROUGHPUT = pytest.StashKey[list]()


@pytest.fixture(scope="session")
def throughput_log(pytestconfig) -> list:
    """Rows appended by the benchmarks: (grid, path, rows/s, load before, load after)."""
    return pytestconfig.stash.setdefault(THROUGHPUT, [])


def pytest_terminal_summary(terminalreporter, config) -> None:
    rows = config.stash.get(THROUGHPUT, [])
    if not rows:
        return
    released = {grid: rate for grid, path, rate, *_ in rows if path == "released"}
    terminalreporter.section("solver throughput (best round)")
    terminalreporter.write_line(f"{'grid':<8}{'path':<14}{'rows/s':>10}{'vs released':>13}"
                                f"{'1-min load before/after':>26}")
    for grid, path, rate, load_before, load_after in rows:
        ratio = f"{rate / released[grid]:.2f}x" if grid in released else "-"
        terminalreporter.write_line(f"{grid:<8}{path:<14}{rate:>10.0f}{ratio:>13}"
                                    f"{load_before:>20.2f} / {load_after:.2f}")
