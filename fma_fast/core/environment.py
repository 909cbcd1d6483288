"""What this machine is and has, collected in one place: versions, the CPU (name, units, the ISA
in effect under any mask), GPUs and the load. The report, ``fma-fast doctor``, the routing rule
for bf16 on the CPU and the benchmarks all read it from here."""

from __future__ import annotations

import os
import platform
from datetime import datetime, timezone
from importlib import metadata

import numpy as np
import torch

from .._version import __version__

ISA_MASKS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
"""Environment variables that cap the ISA oneDNN and ATen use (read once, at start-up)."""


def package_version(package: str) -> str:
    """The installed version of a distribution, or "not installed"."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def cpu_name() -> str:
    """The CPU's model name: /proc/cpuinfo's, else torch's cpuinfo's, else the platform's."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    name = getattr(torch._C._cpu, "_get_cpu_capability", dict)().get("cpu_name")
    return name or platform.processor() or platform.machine()


def isa_masks() -> dict[str, str]:
    """The ISA masks set (:data:`ISA_MASKS`), by variable."""
    return {name: os.environ[name] for name in ISA_MASKS if os.environ.get(name)}


def aten_isa() -> str:
    """The ISA ATen dispatches to (it honours ``ATEN_CPU_CAPABILITY``), e.g. AVX512 or AVX2."""
    return torch.backends.cpu.get_cpu_capability()


def cpu_isa() -> str:
    """The CPU ISA in effect for messages: ATen's capability and any ISA mask set."""
    masks = [f"{name}={value}" for name, value in isa_masks().items()]
    return " ".join([aten_isa(), *masks])


def cpu_units() -> dict[str, bool]:
    """The vector and matrix units the CPU has, as cpuinfo reports them (whatever the masks)."""
    return {"avx512": torch.cpu._is_avx512_supported(),
            "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
            "amx": torch.cpu._is_amx_tile_supported()}


def onednn_bf16() -> bool:
    """Whether oneDNN has a bf16 path under the ISA mask in effect."""
    return bool(torch.backends.mkldnn.is_available()
                and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def gpus() -> list[dict]:
    """Every CUDA device: index, name, compute capability, memory and multiprocessors."""
    if not torch.cuda.is_available():
        return []
    found = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        found.append({"index": index, "name": props.name,
                      "capability": f"sm_{props.major}{props.minor}",
                      "memory_gib": round(props.total_memory / 2**30, 1),
                      "multiprocessors": props.multi_processor_count})
    return found


def device_memory(device: torch.device) -> int | None:
    """Bytes of memory of ``device`` (a GPU's, or the machine's for the CPU); None where the
    platform does not say."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no such sysconf name here
        return None


def load_average() -> list[float] | None:
    """The 1/5/15-minute load: above the core count, other jobs shared the CPU."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def environment() -> dict[str, str]:
    """Versions and machine, recorded at the top of the report."""
    try:
        import matplotlib

        mpl = matplotlib.__version__
    except ImportError:
        mpl = "not installed"
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu_name()}, {os.cpu_count()} logical cores, "
        f"torch threads {torch.get_num_threads()}, "
        + ("CUDA available (not used)" if torch.cuda.is_available() else "no GPU"),
        "platform": platform.platform(),
        # 1/5/15-minute load at the end: above the core count, other jobs shared the CPU.
        "load_average": load_average(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "fma_fast": __version__,
        "matplotlib": mpl,
    }
