"""Versions and machine, recorded at the top of a report."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone

import numpy as np
import torch

from .._version import __version__


def environment() -> dict[str, str]:
    """Versions and machine, recorded at the top of the report."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [
                line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")
            ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    try:
        import matplotlib

        mpl = matplotlib.__version__
    except ImportError:
        mpl = "not installed"
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu}, {os.cpu_count()} logical cores, "
        f"torch threads {torch.get_num_threads()}, "
        + ("CUDA available (not used)" if torch.cuda.is_available() else "no GPU"),
        "platform": platform.platform(),
        # 1/5/15-minute load at the end: above the core count, other jobs shared the CPU.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "fma_fast": __version__,
        "matplotlib": mpl,
    }
