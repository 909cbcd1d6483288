"""Fail unless the ISA mask of CI's masked pass took effect: ATen, oneDNN and inductor on AVX2.

Run under ``ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2``. A mask that is silently
ignored (misspelt, set too late, a torch that no longer reads it) would leave AVX-512 kernels
running and the masked pass testing nothing new, so each layer is asked what it runs:
ATen's dispatch capability, inductor's vector ISA (the compiled path's C++ code), and oneDNN's
verbose log of one fp32 linear (its ISA line and the kernel it picked) in a child process.
Exit status 0 when all say AVX2, else 1 with one line per layer that does not.
"""

from __future__ import annotations

import os
import subprocess
import sys

LINEAR = ("import torch; x = torch.randn(64, 256); w = torch.randn(128, 256); "
          "torch.ops.mkldnn._linear_pointwise(x, w, torch.zeros(128), 'none', [], '')")


def onednn_lines() -> list[str]:
    """oneDNN's verbose lines (ISA and executed primitives) for one fp32 linear."""
    env = {**os.environ, "ONEDNN_VERBOSE": "1"}
    done = subprocess.run([sys.executable, "-c", LINEAR], capture_output=True, text=True,
                          env=env, timeout=300, check=True)
    return [line for line in done.stdout.splitlines() if line.startswith("onednn_verbose")]


def problems() -> list[str]:
    import torch
    from torch._inductor import cpu_vec_isa

    found = []
    capability = torch.backends.cpu.get_cpu_capability()
    if capability != "AVX2":
        found.append(f"ATen's CPU capability is {capability}, expected AVX2")
    vector = str(cpu_vec_isa.pick_vec_isa())
    if vector != "avx2":
        found.append(f"inductor's vector ISA is {vector!r}, expected 'avx2'")
    lines = onednn_lines()
    isa = [line for line in lines if ",info,cpu,isa:" in line]
    kernels = [line.split(",")[6] for line in lines if ",primitive,exec,cpu," in line]
    if not isa or "AVX-512" in isa[0] or "AVX2" not in isa[0]:
        found.append(f"oneDNN's ISA line is {isa[:1]}, expected Intel AVX2")
    if not kernels or any("avx512" in kernel or "amx" in kernel for kernel in kernels):
        found.append(f"oneDNN ran {kernels or 'no logged primitive'}, expected AVX2 kernels")
    return found


if __name__ == "__main__":
    failed = problems()
    for problem in failed:
        print(f"ISA mask not in effect: {problem}", file=sys.stderr)
    if not failed:
        print("ISA mask in effect: ATen AVX2, inductor avx2, oneDNN AVX2 kernels")
    sys.exit(1 if failed else 0)
