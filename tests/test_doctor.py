"""``fma-fast doctor``: versions, devices, paths, and each kernel against its reference (the
one-command GPU check that runs it is tested in tests/test_benchmarks_harness.py)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from fma_fast import doctor
from fma_fast.cli import main
from fma_fast.core.environment import ISA_MASKS
from fma_fast.kernels._common import HAS_TRITON, interpreter_active
from fma_fast.solver import routing

REPO = Path(__file__).resolve().parents[1]

needs_interpreter = pytest.mark.skipif(
    not (HAS_TRITON and interpreter_active()),
    reason="SKIPPED, not passed: the kernel checks run here in the Triton interpreter")


@needs_interpreter
def test_doctor_runs_every_kernel_against_its_reference(tmp_path, capsys):
    report = tmp_path / "doctor.json"
    assert main(["doctor", "--device", "cpu", "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(report.read_text())
    names = [row["name"] for row in result["checks"]]
    for family in ("cosine_topk", "ensemble_topk", "euler", "cosine_ce", "flow_matching[bridge]",
                   "flow_matching[endpoint]", "folded solve"):
        assert any(name.startswith(family) for name in names), (family, names)
    for row in result["checks"]:
        assert row["status"] == "pass", row
        assert row["max_error"] is not None and row["first_call_s"] is not None, row
    assert result["routes"]["ops"]["cosine_topk"] == "triton-interpreter"
    assert result["environment"]["packages"]["torch"] != "not installed"
    assert "no kernel check failed" in printed and "cosine_topk[float32]" in printed


@needs_interpreter
def test_doctor_reports_a_failing_kernel_and_exits_1(monkeypatch, capsys):
    def broken(*args, **kwargs):
        values, indices = real(*args, **kwargs)
        return values + 1e-2, indices  # a wrong answer, not a crash

    from fma_fast.kernels import cosine_topk

    real = cosine_topk.cosine_topk
    monkeypatch.setattr(cosine_topk, "cosine_topk", broken)
    assert main(["doctor", "--device", "cpu"]) == 1
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("cosine_topk[float32]"))
    assert " fail " in line, line
    assert "1 kernel check(s) FAILED: cosine_topk[float32]" in printed


@needs_interpreter
def test_the_fp16_ensemble_check_leaves_room_for_a_gpus_rounding():
    """The fp16 step-ensemble check compares the kernel with its twin on the kernel's own
    operands (normalized=True: the table's rows taken as unit-norm) within the error model's
    tolerance, and must use at most a quarter of it here, where the GPU's accumulation order
    and tiles are not yet in play. Against a renormalised table it used 80% (1.61e-3 of 2e-3):
    the table's fp16 rounding times the logit scale, before the kernel's own error counted."""
    import torch

    rows = doctor.kernel_checks(torch.device("cpu"), [torch.float16])
    ensemble = next(row for row in rows if row.name == "ensemble_topk[float16]")
    assert ensemble.status == "pass", ensemble
    assert ensemble.relative_error <= ensemble.rtol / 4, ensemble


def test_without_a_kernel_backend_the_checks_are_skipped_with_the_reason():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run([sys.executable, "-m", "fma_fast.cli", "doctor", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("cosine_topk")]
    assert rows and " skip " in rows[0], done.stdout
    reason = "CPU tensors need TRITON_INTERPRET=1" if HAS_TRITON else "triton is not installed"
    assert reason in done.stdout


def test_routes_name_the_solve_path_of_each_precision():
    import torch

    routes = doctor.routes(torch.device("cpu"))
    assert routes["solve"]["fp32"] == "folded-fp32"
    assert routes["solve"]["fp16"].startswith("refused: precision='fp16' needs a CUDA")


def test_the_doctor_resolves_and_prints_each_refusal_once(monkeypatch):
    """Review item 19: the CPU section and the routes each resolved the precisions (twice the
    same rule, two wordings), and a CPU without BF16 units printed its bf16 refusal 3 times."""
    import torch

    monkeypatch.setattr(routing, "cpu_bf16_units", lambda: False)
    result = doctor.report("cpu", kernels=False)
    assert result["cpu"]["solve"] == doctor.solve_routes(torch.device("cpu"), compiled=True)
    text = doctor.render(result)
    assert text.count("needs a CPU with BF16 units") == 1, text
    assert "bf16 compiled: refused (as bf16)" in text, text
    assert text.count("needs a CUDA device (CPUs have no fast fp16 GEMM)") == 1, text


def test_the_cpu_section_says_what_the_cpu_has_and_what_solve_runs(monkeypatch):
    """The ISA in effect, the units, and per precision the path a CPU solve takes or why it
    is refused, from the one rule (``routing.cpu_bf16_units``)."""
    import torch

    facts = doctor.cpu()
    assert facts["isa_in_effect"] == torch.backends.cpu.get_cpu_capability()
    assert facts["solve"]["fp32"] == "folded-fp32"
    if routing.cpu_bf16_units():
        assert facts["solve"]["bf16"] == "folded-bf16"
        assert facts["solve"]["bf16 compiled"] == "folded-compiled-bf16"
    monkeypatch.setattr(routing, "cpu_bf16_units", lambda: False)
    refused = doctor.cpu()
    assert not refused["bf16_units"] and refused["solve"]["fp32"] == "folded-fp32"
    for label in ("bf16", "bf16 compiled"):
        assert refused["solve"][label].startswith("refused: precision='bf16'"), refused["solve"]
        assert "needs a CPU with BF16 units" in refused["solve"][label]
    head, solve = doctor._render_cpu(refused)
    assert f"ISA in effect: {facts['isa_in_effect']}" in head, head
    assert "bf16 on BF16 units: no" in head and "bf16: refused: " in solve, (head, solve)


X86 = platform.machine().lower() in ("x86_64", "amd64")


@pytest.mark.skipif(not X86, reason="SKIPPED, not passed: the ISA masks are x86's")
@pytest.mark.parametrize("mask", [{"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
                                  {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"}], ids=["AVX2", "AVX512"])
def test_the_isa_mask_is_honoured_by_the_bf16_rule_and_the_doctor(mask):
    """A CPU with BF16 units masked to AVX2 has no bf16 path for oneDNN (~30x slower than
    fp32), masked to AVX-512 without BF16 an emulated one (slower than fp32): the rule must
    see the mask, not the hardware flags."""
    env = {**{k: v for k, v in os.environ.items() if k not in ISA_MASKS}, **mask}
    code = "import json; from fma_fast import doctor; print(json.dumps(doctor.cpu()))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    facts = json.loads(done.stdout.splitlines()[-1])
    if "ATEN_CPU_CAPABILITY" in mask:
        assert facts["isa_in_effect"] == "AVX2" and not facts["onednn_bf16"], facts
    assert facts["mask"] == mask, facts
    assert not facts["bf16_units"] and facts["solve"]["bf16"].startswith("refused"), facts


@pytest.mark.skipif(not X86, reason="SKIPPED, not passed: the ISA masks are x86's")
def test_ci_isa_mask_check_fails_without_the_mask_and_passes_with_it():
    """.ci/check_isa_mask.py guards CI's masked pass: it must fail where AVX-512 is in
    effect (unmasked, on an AVX-512 CPU) and pass under the mask."""
    script = [sys.executable, str(REPO / ".ci" / "check_isa_mask.py")]
    base = {k: v for k, v in os.environ.items() if k not in ISA_MASKS}
    masked = subprocess.run(script, capture_output=True, text=True, timeout=600,
                            env={**base, "ONEDNN_MAX_CPU_ISA": "AVX2",
                                 "ATEN_CPU_CAPABILITY": "avx2"})
    assert masked.returncode == 0, masked.stderr[-2000:]
    assert "ISA mask in effect" in masked.stdout
    import torch

    if not torch.cpu._is_avx512_supported():
        return  # unmasked is AVX2 already: nothing for the check to catch here
    partial = subprocess.run(script, capture_output=True, text=True, timeout=600,
                             env={**base, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert partial.returncode == 1, partial.stdout
    assert "ATen's CPU capability is AVX512" in partial.stderr, partial.stderr
    unmasked = subprocess.run(script, capture_output=True, text=True, timeout=600, env=base)
    assert unmasked.returncode == 1 and "avx512" in unmasked.stderr, unmasked.stderr
