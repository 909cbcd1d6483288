"""A kernel that cannot be built or launched on the user's GPU (a compile error, too little shared
memory, a dtype the arch lacks) falls back to torch for that op alone, with one warning; the
``path`` says so and the results equal the reference. Failures are forced in the interpreter."""

from __future__ import annotations

import warnings

import pytest
import torch
from kernel_support import assert_close
from support import randomize_parameters

import fma_fast
from fma_fast import reference
from fma_fast.core import names
from fma_fast.kernels import _common
from fma_fast.kernels._common import HAS_TRITON, KernelFallbackWarning
from fma_fast.ops import dispatch
from fma_fast.solver import fused, routing

pytestmark = pytest.mark.skipif(
    not HAS_TRITON or not _common.interpreter_active(),
    reason="SKIPPED, not passed: forced kernel failures run in the Triton interpreter",
)

if HAS_TRITON:
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import InterpreterError, OutOfResources

    FAILURES = {
        "compile error": lambda: CompilationError(None, None, "unsupported construct"),
        "out of resources": lambda: OutOfResources(262_144, 232_448, "shared memory"),
        "unsupported dtype": lambda: CompilationError(
            None, None, "type bf16 not supported in this architecture"),
        "launch refused": lambda: RuntimeError("Triton Error [CUDA]: invalid device context"),
    }
else:
    FAILURES = {}


class FailingKernel:
    """Stands in for a @triton.jit function: every launch raises ``error``."""

    def __init__(self, error):
        self.error = error
        self.launches = 0

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
            raise self.error()

        return launch


@pytest.fixture(autouse=True)
def fresh_fallbacks(monkeypatch):
    """Every test starts with no recorded fallback and no kernel known to run."""
    monkeypatch.setattr(_common, "FALLBACKS", {})
    monkeypatch.setattr(dispatch, "_FLOW_MATCHING_RUNS", set())
    monkeypatch.setattr(fused, "_RUNS", set())


def fail(monkeypatch, module: str, kernel: str, failure) -> FailingKernel:
    failing = FailingKernel(failure)
    monkeypatch.setattr(f"fma_fast.kernels.{module}.{kernel}", failing)
    return failing


def data(rows=7, dim=12, classes=9):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, dim, generator=g)
    table = torch.nn.functional.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    labels = torch.arange(rows) % classes
    return x, table, labels


def call_twice(op):
    """The first call warns once and falls back; the second falls back silently."""
    with pytest.warns(KernelFallbackWarning, match="takes the PyTorch path") as caught:
        first = op()
    assert len(caught) == 1, [str(w.message) for w in caught]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = op()
    return first, second


@pytest.mark.parametrize("failure", FAILURES.values(), ids=FAILURES.keys())
def test_scoring_falls_back_per_op(monkeypatch, failure):
    x, table, labels = data()
    failing = fail(monkeypatch, "cosine_topk", "_cosine_topk_kernel", failure)
    first, second = call_twice(lambda: dispatch.cosine_topk(x, table, 3, normalized=True))
    assert first.path == second.path == names.PATH_FALLBACK
    assert failing.launches == 1, "a failed kernel must not be retried"
    values, indices = reference.cosine_topk(x, table, 3)
    assert torch.equal(first.indices, indices)
    assert_close(first.values, values, "fallback top-k values")
    # Only that op fell back: the cross-entropy kernel still runs.
    assert dispatch.cosine_cross_entropy(x, table, labels, normalized=True).path == (
        names.PATH_INTERPRETER)
    assert list(_common.FALLBACKS) == [("cosine_topk", "cpu", "float32")]


@pytest.mark.parametrize("failure", FAILURES.values(), ids=FAILURES.keys())
def test_every_dispatched_op_falls_back(monkeypatch, failure):
    x, table, labels = data()
    fail(monkeypatch, "cosine_cross_entropy", "_forward_kernel", failure)
    fail(monkeypatch, "step_ensemble", "_ensemble_topk_kernel", failure)
    fail(monkeypatch, "step_ensemble", "_cosine_lse_kernel", failure)
    fail(monkeypatch, "euler", "_euler_kernel", failure)
    loss, _ = call_twice(lambda: dispatch.cosine_cross_entropy(x, table, labels))
    assert loss.path == names.PATH_FALLBACK
    assert_close(loss.loss, reference.cosine_cross_entropy(x, table, labels), "fallback CE")
    ensemble, _ = call_twice(lambda: dispatch.step_ensemble_topk([x, 2 * x], table, 2))
    probs = sum(torch.softmax(reference.cosine_logits(s, table, 100.0), -1) for s in (x, 2 * x))
    assert ensemble.path == names.PATH_FALLBACK
    assert torch.equal(ensemble.indices, probs.topk(2, dim=-1).indices)
    t = torch.zeros(())
    state = x.clone()
    step, _ = call_twice(lambda: dispatch.euler_step(state, x, t, 0.5, inplace=True))
    assert step.path == names.PATH_FALLBACK and step.x is state
    assert_close(state, x + 0.5 * x + 0.5 * x, "two in-place fallback Euler steps")
    assert float(t) == pytest.approx(1.0)


@pytest.mark.parametrize("kernel", ["_pair_kernel", "_loss_kernel"])
def test_flow_matching_pair_and_loss_fall_back_together(monkeypatch, kernel):
    """Pair and loss share the noise: if either kernel fails both must take torch, or the
    pair's Philox noise would meet the loss's torch noise."""
    x0, table, labels = data(rows=6, dim=16)
    t = torch.rand(6, generator=torch.Generator().manual_seed(1))
    options = dict(seed=4, gamma=0.3, form="bridge")
    fail(monkeypatch, "flow_matching", kernel, FAILURES["out of resources"])
    with pytest.warns(KernelFallbackWarning, match="flow_matching"):
        pair = dispatch.fused_pair(x0, labels, table, t, **options)
    pred = pair.x_t.clone().requires_grad_(True)
    loss = dispatch.fused_loss(pred, x0, labels, table, t, **options)
    assert pair.path == loss.path == names.PATH_FALLBACK
    expected_pair = dispatch.fused_pair(x0, labels, table, t, backend="reference", **options)
    expected = dispatch.fused_loss(pred, x0, labels, table, t, backend="reference", **options)
    assert torch.equal(pair.x_t, expected_pair.x_t)
    assert torch.equal(loss.loss, expected.loss)


def test_fused_solve_falls_back_to_the_torch_chain(monkeypatch):
    """On a GPU (simulated: the fused route is forced) whose fused step kernels cannot run,
    solve takes the folded torch chain, says so in .path and equals the reference."""
    net = fma_fast.VelocityNet(12, blocks=2)
    randomize_parameters(net, scale=0.2)
    x, table, _ = data()
    monkeypatch.setattr(routing, "_network", lambda *args: names.NETWORK_FUSED)
    fail(monkeypatch, "folded_step", "_residual_block_kernel", FAILURES["out of resources"])
    with pytest.warns(KernelFallbackWarning, match="folded_step"):
        result = fma_fast.solve(x, net, 3, class_features=table, topk=2)
    assert result.path.startswith("folded-fallback-fp32+"), result.path
    expected = fma_fast.solve(x, net, 3, class_features=table, topk=2, backend="reference")
    assert torch.equal(result.topk_indices, expected.topk_indices)
    assert_close(result.topk_values, expected.topk_values, "fallback solve")


@pytest.mark.parametrize("failure", ["compile error", "out of resources"])
def test_an_explicit_triton_backend_raises_instead(monkeypatch, failure):
    x, table, _ = data()
    fail(monkeypatch, "cosine_topk", "_cosine_topk_kernel", FAILURES[failure])
    error = CompilationError if failure == "compile error" else OutOfResources
    with pytest.raises(error):
        dispatch.cosine_topk(x, table, 2, backend="triton")
    assert not _common.FALLBACKS


def test_kernel_bugs_and_bad_arguments_are_never_hidden(monkeypatch):
    """An error the interpreter finds in a kernel, or a ValueError from a launcher, is a bug
    to see, not a GPU to work around."""
    x, table, _ = data()
    fail(monkeypatch, "cosine_topk", "_cosine_topk_kernel",
         lambda: InterpreterError("index out of bounds"))
    with pytest.raises(InterpreterError):
        dispatch.cosine_topk(x, table, 2)
    fail(monkeypatch, "cosine_topk", "_cosine_topk_kernel", lambda: ValueError("bad stride"))
    with pytest.raises(ValueError, match="bad stride"):
        dispatch.cosine_topk(x, table, 2)
    assert not _common.FALLBACKS


if HAS_TRITON:
    _ACCELERATOR_ERROR = getattr(torch, "AcceleratorError", RuntimeError)  # torch >= 2.8
    FAULTS = {
        "illegal address (Triton's launcher)": lambda: RuntimeError(
            "Triton Error [CUDA]: an illegal memory access was encountered"),
        "device-side assert (torch)": lambda: _ACCELERATOR_ERROR(
            "CUDA error: device-side assert triggered\nCUDA kernel errors might be "
            "asynchronously reported at some other API call"),
        "sticky fault of an earlier op (torch < 2.8)": lambda: RuntimeError(
            "CUDA error: unspecified launch failure"),
        "misaligned address": lambda: RuntimeError("Triton Error [CUDA]: misaligned address"),
        "out of memory (Triton's loader)": lambda: RuntimeError(
            "Triton Error [CUDA]: out of memory"),
        "cuBLAS after a fault": lambda: RuntimeError(
            "CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm(...)`"),
    }
    BUILD_OR_LAUNCH_REFUSALS = {
        **FAILURES,
        "PTX newer than the driver": lambda: RuntimeError(
            "Triton Error [CUDA]: the provided PTX was compiled with an unsupported toolchain."),
        "too many resources for launch": lambda: RuntimeError(
            "Triton Error [CUDA]: too many resources requested for launch"),
        "compiler pass failure": lambda: RuntimeError("PassManager::run failed"),
    }
else:
    FAULTS, BUILD_OR_LAUNCH_REFUSALS = {}, {}


@pytest.mark.parametrize("fault", FAULTS.values(), ids=FAULTS.keys())
def test_cuda_faults_are_raised_never_recorded_as_fallbacks(monkeypatch, fault):
    """An illegal address, a device-side assert or any "CUDA error" says the GPU faulted (the
    context is usually broken for good), not that this kernel cannot run here: it is raised,
    and no op is sent to torch for the rest of the process."""
    x, table, _ = data()
    fail(monkeypatch, "cosine_topk", "_cosine_topk_kernel", fault)
    with pytest.raises(type(fault())) as raised:
        dispatch.cosine_topk(x, table, 2)
    assert str(raised.value) == str(fault())
    assert not _common.FALLBACKS
    assert not _common.kernel_failure(fault())


@pytest.mark.parametrize("failure", BUILD_OR_LAUNCH_REFUSALS.values(),
                         ids=BUILD_OR_LAUNCH_REFUSALS.keys())
def test_build_and_launch_refusals_are_kernel_failures(failure):
    assert _common.kernel_failure(failure())


def test_a_pending_gpu_fault_surfaces_instead_of_a_fallback(monkeypatch):
    """A kernel on a (fake) cuda:1 fails to build while an earlier launch left a fault behind:
    the device is synchronised before the fallback is recorded, and the fault is raised."""
    like = type("Like", (), {"device": torch.device("cuda", 1), "dtype": torch.float32})()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "fake H200")
    fault = FAULTS["device-side assert (torch)"]
    synchronised = []

    def synchronize(device):
        synchronised.append(device)
        raise fault()

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)

    def kernel():
        raise FAILURES["compile error"]()

    with pytest.raises(type(fault()), match="device-side assert"):
        _common.with_fallback("cosine_topk", like, kernel, lambda: "torch")
    assert synchronised == [torch.device("cuda", 1)] and not _common.FALLBACKS
    # A healthy device: the build failure is a fallback, named after that GPU.
    monkeypatch.setattr(torch.cuda, "synchronize", synchronised.append)
    with pytest.warns(KernelFallbackWarning, match=r"fake H200 \(sm_90\)"):
        assert _common.with_fallback("cosine_topk", like, kernel, lambda: "torch") == (
            "torch", True)
    assert list(_common.FALLBACKS) == [("cosine_topk", "cuda:1", "float32")]
