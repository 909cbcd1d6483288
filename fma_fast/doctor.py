"""``fma-fast doctor``: what this machine has, which path each op takes here, and whether each
Triton kernel gives its reference's answer on this device (tiny shapes, one run each).

Every check forces the kernels (``backend="triton"``), so a kernel that cannot run here is a
failed check with its reason, where a user's call would fall back to torch with a warning.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .core import reference
from .core import validation as check
from .core.environment import (
    aten_isa,
    cpu_name,
    cpu_units,
    gpus,
    isa_masks,
    onednn_bf16,
    package_version,
)
from .core.model import VelocityNet
from .core.names import PRECISIONS
from .core.policy import LOGIT_SCALE, TOLERANCES, logit_tolerance
from .kernels import _common
from .kernels._common import DEFAULT_DOT_PRECISION, triton_usable
from .ops import dispatch
from .solver import routing
from .solver.api import solve

PACKAGES = ("torch", "triton", "numpy", "safetensors", "tqdm", "open_clip_torch", "pillow",
            "matplotlib", "pytest", "pytest-benchmark")


@dataclass
class CheckResult:
    name: str
    status: str  # "pass", "fail" or "skip"
    max_error: float | None = None
    tolerance: str = ""
    rtol: float | None = None  # the tolerance on max error / max |reference|
    relative_error: float | None = None
    first_call_s: float | None = None  # includes compiling the kernel
    warm_call_s: float | None = None
    detail: str = ""


def environment() -> dict:
    """Versions, devices and the settings that change which path runs."""
    from ._version import __version__

    return {
        "fma_fast": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: package_version(name) for name in PACKAGES},
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "devices": gpus(),
        "cpu_threads": torch.get_num_threads(),
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", ""),
        "FMA_FAST_AUTOTUNE": os.environ.get("FMA_FAST_AUTOTUNE", ""),
        "fma_fast_path": os.path.dirname(os.path.abspath(__file__)),
    }


def solve_routes(device: torch.device, *, compiled: bool = False) -> dict[str, str]:
    """The path ``solve`` takes on ``device`` for a VelocityNet per precision (backend auto;
    with ``compiled`` also bf16 with backend="compiled"), or why it is refused there: the one
    place the doctor resolves them."""
    options = {precision: routing.SolveOptions(precision=precision, device=device)
               for precision in PRECISIONS}
    if compiled:
        options["bf16 compiled"] = routing.SolveOptions(precision="bf16", backend="compiled",
                                                        device=device)
    solve = {}
    for label, option in options.items():
        try:
            # On ``device``, not the probe model's (the CPU): the paths a solve there takes.
            solve[label] = routing.resolve(VelocityNet(8, 1), option, 1, device).path()
        except ValueError as error:
            solve[label] = f"refused: {error}"
    return solve


def _render_routes(solve: dict[str, str]) -> str:
    """``label: path`` per label; a refusal already given for an earlier label is not
    repeated."""
    shown: dict[str, str] = {}
    parts = []
    for label, route in solve.items():
        repeated = route.startswith("refused: ") and route in shown
        parts.append(f"{label}: refused (as {shown[route]})" if repeated else f"{label}: {route}")
        shown.setdefault(route, label)
    return "; ".join(parts)


def routes(device: torch.device) -> dict:
    """The path each op takes here with backend "auto", and why the kernels cannot run when
    they cannot."""
    probe = torch.empty(0, device=device)
    usable, why = triton_usable(probe)
    ops = {op: dispatch.select_path("auto", probe)
           for op in ("cosine_topk", "step_ensemble", "cosine_cross_entropy", "euler_step")}
    training = dispatch.select_path(routing.op_backend("auto", device), probe)
    return {"device": str(device), "kernels_usable": usable, "why_not": why, "ops": ops,
            "solve": solve_routes(device), "fit": training,
            "fallbacks": {"/".join(key): reason for key, reason in _common.FALLBACKS.items()}}


def cpu() -> dict:
    """What this CPU has and what a CPU ``solve`` runs here per precision: the ISA in effect
    (ATen's, and whether oneDNN has a bf16 path; both honour the masks), the units the
    hardware has (as cpuinfo reports them, whatever the masks), and whether bf16 runs on BF16
    units, the rule ``solve`` and ``fit`` follow (``routing.cpu_bf16_units``)."""
    return {
        "name": cpu_name(),
        "threads": torch.get_num_threads(),
        "isa_in_effect": aten_isa(),
        "onednn_bf16": onednn_bf16(),
        "hardware": cpu_units(),
        "mask": isa_masks(),
        "bf16_units": routing.cpu_bf16_units(),
        "solve": solve_routes(torch.device("cpu"), compiled=True),
    }


def _render_cpu(facts: dict) -> list[str]:
    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    hardware = facts["hardware"]
    mask = " ".join(f"{k}={v}" for k, v in facts["mask"].items()) or "none"
    return [
        f"CPU: {facts['name']}, {facts['threads']} threads; ISA in effect: "
        f"{facts['isa_in_effect']}, oneDNN bf16 path: {yes(facts['onednn_bf16'])}; hardware: "
        f"AVX-512 {yes(hardware['avx512'])}, AVX512_BF16 {yes(hardware['avx512_bf16'])}, "
        f"AMX {yes(hardware['amx'])}; ISA mask: {mask}; bf16 on BF16 units: "
        f"{yes(facts['bf16_units'])}",
        "CPU solve -> " + _render_routes(facts["solve"]),
    ]


def _timed(run: Callable[[], object], device: torch.device) -> tuple[object, float]:
    start = time.perf_counter()
    result = run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def _max_error(got, expected) -> float:
    pairs = zip(got, expected) if isinstance(got, (tuple, list)) else [(got, expected)]
    return max(float((g.detach().double() - e.detach().double()).abs().max()) for g, e in pairs)


def _tiny(device: torch.device, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 24, generator=g)
    table = F.normalize(torch.randn(11, 24, generator=g), dim=-1)
    labels = torch.arange(37) % 11
    return x.to(device, dtype), table.to(device, dtype), labels.to(device)


def _kernel_cases(device: torch.device, dtypes: list[torch.dtype]
                  ) -> list[tuple[str, torch.dtype, Callable, Callable, float]]:
    """(name, I/O dtype, kernel run, reference run, logit scale or 0) for every kernel family,
    the scoring ones in each of ``dtypes``."""
    cases = []
    for dtype in dtypes:
        x, table, labels = _tiny(device, dtype)
        tag = str(dtype).removeprefix("torch.")

        def topk(x=x, table=table):
            return dispatch.cosine_topk(x, table, 3, normalized=True, backend="triton").values

        cases.append((f"cosine_topk[{tag}]", dtype, topk,
                      lambda x=x, table=table: reference.cosine_topk(x, table, 3)[0], 0.0))

        def ensemble(x=x, table=table):
            return dispatch.step_ensemble_topk([x, 1.5 * x], table, 2, normalized=True,
                                               backend="triton").values

        def ensemble_ref(x=x, table=table):
            # normalized=True: the kernel takes the rows as unit-norm, so its twin does too (a
            # half table is unit-norm only to its rounding, which the logit scale amplifies)
            unit = table.double()
            probs = sum(torch.softmax(LOGIT_SCALE * F.normalize(s.double(), dim=-1) @ unit.T, -1)
                        for s in (x, 1.5 * x))
            return probs.topk(2, dim=-1).values

        cases.append((f"ensemble_topk[{tag}]", dtype, ensemble, ensemble_ref, LOGIT_SCALE))
        cases.append((f"euler[{tag}]", dtype,
                      lambda x=x: dispatch.euler_step(x.float(), x, torch.zeros((), device=device),
                                                      0.1, backend="triton").x,
                      lambda x=x: x.float() + 0.1 * x.float(), 0.0))
    x, table, labels = _tiny(device)

    def cross_entropy():
        leaf = x.clone().requires_grad_(True)
        loss = dispatch.cosine_cross_entropy(leaf, table, labels, backend="triton").loss
        loss.backward()
        return loss, leaf.grad

    def cross_entropy_ref():
        leaf = x.clone().requires_grad_(True)
        loss = reference.cosine_cross_entropy(leaf, table, labels)
        loss.backward()
        return loss, leaf.grad

    cases.append(("cosine_ce[float32] (loss, grad)", torch.float32, cross_entropy,
                  cross_entropy_ref, LOGIT_SCALE))
    for form in ("bridge", "endpoint"):
        cases.append((f"flow_matching[{form}] (x_t, loss)", torch.float32,
                      *_flow_matching_case(device, form), 0.0))
    cases.append(("folded solve M=3 (fused step kernels)", torch.float32,
                  *_solve_case(device), 0.0))
    return cases


def _flow_matching_case(device: torch.device, form: str):
    x0, table, labels = _tiny(device)
    t = torch.linspace(0.0, 1.0, x0.shape[0], device=device)
    std = x0.std(dim=0)
    pred = torch.zeros_like(x0)
    options = dict(seed=7, gamma=0.5, form=form, feature_std=std)

    def kernel():
        pair = dispatch.fused_pair(x0, labels, table, t, backend="triton", **options)
        loss = dispatch.fused_loss(pred, x0, labels, table, t, backend="triton", **options)
        return pair.x_t, loss.loss

    def expected():  # the reference formulas fed the kernels' own noise
        noise = dispatch.flow_matching_noise(7, *x0.shape, device=device, backend="triton").noise
        x_t, target = reference.training_pair(x0, table[labels], t, noise, gamma=0.5, form=form,
                                              feature_std=std)
        return x_t, reference.flow_matching_loss(pred, target)

    return kernel, expected


def _solve_case(device: torch.device):
    model = VelocityNet(24, blocks=2)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    model = model.to(device)
    x, _, _ = _tiny(device)
    return (lambda: solve(x, model, 3, backend="triton"),
            lambda: solve(x, model, 3, backend="reference"))


def _relative(error: float, expected) -> float:
    values = expected if isinstance(expected, (tuple, list)) else [expected]
    scale = max(float(v.detach().abs().max()) for v in values)
    return error / max(scale, 1e-12)


def kernel_checks(device: torch.device, dtypes: list[torch.dtype] | None = None
                  ) -> list[CheckResult]:
    """Every kernel once against its reference on tiny shapes on ``device``, the scoring ones
    in each of ``dtypes`` (default: fp32, and on CUDA bf16 and fp16 too). Outputs computed
    through logit-scaled cosines get the error model's tolerance (``policy.logit_tolerance``)."""
    if dtypes is None:
        dtypes = [torch.float32] + ([torch.bfloat16, torch.float16]
                                    if device.type == "cuda" else [])
    usable, why = triton_usable(torch.empty(0, device=device))
    cases = _kernel_cases(device, dtypes)
    if not usable:
        return [CheckResult(name, "skip", detail=why) for name, *_ in cases]
    results = []
    for name, dtype, kernel, expected_run, scale in cases:
        if device.type == "cpu" and dtype == torch.bfloat16:
            results.append(CheckResult(name, "skip", detail="the interpreter has no bf16"))
            continue
        rtol = (logit_tolerance(dtype, scale, DEFAULT_DOT_PRECISION) if scale
                else TOLERANCES[dtype].rtol)
        try:
            got, first = _timed(kernel, device)
            _, warm = _timed(kernel, device)
        except Exception as error:
            lines = str(error).strip().splitlines() or [""]
            results.append(CheckResult(name, "fail", detail=f"{type(error).__name__}: "
                                                            f"{lines[-1][:200]}"))
            continue
        expected = expected_run()
        error = _max_error(got, expected)
        relative = _relative(error, expected)
        results.append(CheckResult(
            name, "pass" if relative <= rtol else "fail", max_error=error,
            tolerance=f"max error <= {rtol:g} x max |reference|", rtol=rtol,
            relative_error=relative,
            first_call_s=round(first, 4), warm_call_s=round(warm, 5),
            detail=f"relative {relative:.2e}"))
    return results


def report(device: str | None, *, kernels: bool = True) -> dict:
    """Everything the doctor prints, as one JSON-ready dict."""
    resolved = check.resolve_device(device)
    checks = kernel_checks(resolved) if kernels else []
    return {"environment": environment(), "cpu": cpu(), "routes": routes(resolved),
            "checks": [asdict(result) for result in checks],
            "failed": [result.name for result in checks if result.status == "fail"]}


def render(result: dict) -> str:
    env, routes_ = result["environment"], result["routes"]
    lines = [f"fma_fast {env['fma_fast']} (from {env['fma_fast_path']}), Python {env['python']},"
             f" {env['platform']}"]
    lines.append("packages: " + ", ".join(f"{name} {version}"
                                          for name, version in env["packages"].items()))
    if env["devices"]:
        for dev in env["devices"]:
            lines.append(f"cuda:{dev['index']}: {dev['name']} ({dev['capability']}, "
                         f"{dev['memory_gib']} GiB, {dev['multiprocessors']} SMs)")
    else:
        lines.append(f"no CUDA device (torch built for CUDA {env['torch_cuda']}); "
                     f"{env['cpu_threads']} CPU threads")
    lines.append(f"TRITON_INTERPRET={env['TRITON_INTERPRET'] or '(unset)'}, "
                 f"FMA_FAST_AUTOTUNE={env['FMA_FAST_AUTOTUNE'] or '(unset)'}")
    lines.extend(_render_cpu(result["cpu"]))
    lines.append(f"paths on {routes_['device']}: "
                 + ", ".join(f"{op} -> {path}" for op, path in routes_["ops"].items()))
    on_cpu = routes_["device"] == "cpu"  # the CPU line above gave the solve routes
    lines.append(("" if on_cpu else f"solve -> {_render_routes(routes_['solve'])}; ")
                 + f"fit -> {routes_['fit']}")
    if not routes_["kernels_usable"]:
        lines.append(f"Triton kernels cannot run here: {routes_['why_not']}")
    for key, reason in routes_["fallbacks"].items():
        lines.append(f"fallback in this process: {key}: {reason}")
    if result["checks"]:
        lines.append(f"{'kernel check':<42}{'result':<8}{'max error':>11}{'first s':>10}"
                     f"{'warm s':>10}  detail")
        for row in result["checks"]:
            error = "-" if row["max_error"] is None else f"{row['max_error']:.2e}"
            first = "-" if row["first_call_s"] is None else f"{row['first_call_s']:.3f}"
            warm = "-" if row["warm_call_s"] is None else f"{row['warm_call_s']:.4f}"
            lines.append(f"{row['name']:<42}{row['status']:<8}{error:>11}{first:>10}{warm:>10}"
                         f"  {row['detail']}")
    verdict = (f"{len(result['failed'])} kernel check(s) FAILED: {', '.join(result['failed'])}"
               if result["failed"] else "no kernel check failed")
    lines.append(verdict)
    return "\n".join(lines)
