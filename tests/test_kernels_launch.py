"""What reaches a kernel launch: the device it runs on, the arguments Triton specialises on, and
the labels a kernel indexes the class table with.

Triton launches on torch's *current* CUDA device and its stream, whatever the tensors' device,
so every launcher must make its tensors' device current. Without a second GPU this is shown
with a recording guard (every kernel launch happens inside one, for its tensors' device) and a
fake device bookkeeping (cuda:1 becomes current while device 0 was). Specialisations are those
Triton's JIT computes for sm_90, from the launch arguments the real launchers pass."""

from __future__ import annotations

import functools
import importlib
from contextlib import contextmanager, nullcontext

import pytest
import torch
import torch.nn.functional as F
from kernel_support import SKIP_REASON, FakeCudaDevices, kernel_device

from fma_fast.kernels import _common
from fma_fast.ops import dispatch

DEVICE = kernel_device()
needs_kernels = pytest.mark.skipif(DEVICE is None, reason=SKIP_REASON)

LAUNCHING_MODULES = ("euler", "flow_matching", "cosine_topk", "cosine_cross_entropy",
                     "step_ensemble", "folded_step")
"""Every kernels/ module that launches kernels (aot.py compiles them, _common helps)."""


@functools.cache
def _kernels() -> dict[str, tuple[object, str]]:
    """'module.name' -> (module, name) of every launched @triton.jit kernel (``*_kernel``),
    as found before any test patched them."""
    from triton.runtime.jit import KernelInterface

    found = {}
    for name in LAUNCHING_MODULES:
        module = importlib.import_module(f"fma_fast.kernels.{name}")
        for attr, value in vars(module).items():
            if isinstance(value, KernelInterface) and attr.endswith("_kernel"):
                found[f"{name}.{attr}"] = (module, attr)
    return found


class Watched:
    """Stands in for a kernel: records each launch (its tensors' devices, the guards entered
    at that moment and its arguments), then launches the real kernel."""

    def __init__(self, name, kernel, launches, guards):
        self.name, self.kernel, self.launches, self.guards = name, kernel, launches, guards

    def __getitem__(self, grid):
        run = self.kernel[grid]

        def launch(*args, **kwargs):
            devices = {a.device for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
            self.launches.append((self.name, devices, list(self.guards), args, kwargs))
            return run(*args, **kwargs)

        return launch


@pytest.fixture
def watched(monkeypatch):
    """Every kernel watched and ``_common.launch_device`` recording the guards entered; yields
    the list of launches."""
    launches, guards = [], []
    for name, (module, attr) in _kernels().items():
        monkeypatch.setattr(module, attr, Watched(name, getattr(module, attr), launches, guards))

    real = getattr(_common, "launch_device", nullcontext)  # (none before the guard existed)

    @contextmanager
    def recording(device):
        guards.append(device)
        try:
            with real(device):
                yield
        finally:
            guards.pop()

    monkeypatch.setattr(_common, "launch_device", recording, raising=False)
    return launches


def _tiny(rows=5, dim=20, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g).to(DEVICE)
    table = F.normalize(torch.randn(classes, dim, generator=g), dim=-1).to(DEVICE)
    labels = (torch.arange(rows) % classes).to(DEVICE)
    t = torch.rand(rows, generator=g).to(DEVICE)
    return x, table, labels, t


def _launch_every_kernel(seed: int = 5) -> None:
    """Each launcher of kernels/ once, on tiny inputs on DEVICE."""
    from fma_fast.kernels import (
        cosine_cross_entropy,
        cosine_topk,
        euler,
        flow_matching,
        folded_step,
        step_ensemble,
    )

    x, table, labels, t = _tiny()
    euler.euler_step(x, x, torch.zeros(1, device=DEVICE), 0.1)
    flow_matching.noise(seed, 4, 16, DEVICE)
    flow_matching.training_input(x, labels, table, t, seed, gamma=0.5)
    pred = x.clone().requires_grad_(True)
    flow_matching.flow_matching_loss(pred, x, labels, table, t, seed, gamma=0.5).backward()
    cosine_topk.cosine_topk(x, table, 2)
    leaf = x.clone().requires_grad_(True)
    cosine_cross_entropy.cosine_cross_entropy(leaf, table, labels).backward()
    step_ensemble.ensemble_topk(torch.stack([x, 2 * x]), table, 2, 100.0)
    width = x.shape[1]
    g = torch.Generator().manual_seed(1)
    w, b = (0.1 * torch.randn(width, width, generator=g)).to(DEVICE), torch.zeros(width,
                                                                                 device=DEVICE)
    hidden = folded_step.residual_block(x, w, b, w, b)
    folded_step.final_euler_update(hidden, x, w, b)


# ------------------------------------------------------------------------- the launch device


@needs_kernels
def test_every_kernel_launches_inside_its_tensors_device_guard(watched):
    with torch.enable_grad():
        _launch_every_kernel()
    launched = {name for name, *_ in watched}
    assert launched == set(_kernels()), f"not exercised: {set(_kernels()) - launched}"
    for name, devices, guards, _, _ in watched:
        assert len(devices) == 1, f"{name} launched with tensors on {devices}"
        assert guards, f"{name} launched outside any device guard (on the current device)"
        assert guards[-1] == next(iter(devices)), (
            f"{name}: guard for {guards[-1]} but its tensors are on {devices}")


def test_the_guard_makes_the_tensors_gpu_current(monkeypatch):
    """A fake cuda:1 tensor while device 0 is current: inside a launcher, the current device
    (what Triton launches on, and whose current stream it uses) is 1, and 0 again after."""
    fake = FakeCudaDevices(monkeypatch)

    class OnCuda1(torch.Tensor):
        @property
        def device(self):
            return torch.device("cuda", 1)

    seen = []
    launcher = _common.on_tensor_device(lambda x, *, out=None: seen.append(
        torch.cuda.current_device()))
    launcher(torch.empty(2).as_subclass(OnCuda1), out=torch.empty(2).as_subclass(OnCuda1))
    assert seen == [1]
    assert fake.current == 0, "the previous device must be current again"
    with _common.launch_device(torch.device("cpu")):
        assert fake.current == 0, "a CPU launch switches nothing"


@needs_kernels
def test_a_launch_refuses_tensors_on_two_devices():
    """A kernel reads every pointer on one GPU: tensors on two devices are refused by name."""
    from fma_fast.kernels import euler

    x = torch.zeros(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match=r"euler_step: the tensors are on several devices"):
        euler.euler_step(x, torch.zeros(3, 4, device="meta"), torch.zeros(1, device=DEVICE), 0.1)


# ------------------------------------------------------------------------- specialisation


def _sm90_binder(kernel):
    """Triton's own argument binder for ``kernel`` with the sm_90 backend: it returns the
    specialisation that keys the JIT cache (a new entry compiles a new variant)."""
    nvidia = pytest.importorskip("triton.backends.nvidia.compiler")
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if not isinstance(kernel, JITFunction):  # the interpreter's wrapper of the same function
        kernel = JITFunction(kernel.fn, **kernel.kwargs)
    return create_function_from_signature(kernel.signature, kernel.params,
                                          nvidia.CUDABackend(GPUTarget("cuda", 90, 32)))


@needs_kernels
def test_the_seed_compiles_no_new_kernel_variant(watched):
    """A fresh seed every training step: 1, multiples of 16 and any other seed below 2**31 must
    share one compiled variant of each flow-matching kernel."""
    seeds = (7, 1, 16, 4096, 2**31 - 1)
    specialisations: dict[str, set] = {}
    for seed in seeds:
        watched.clear()
        with torch.enable_grad():
            _launch_every_kernel(seed)
        for name, _, _, args, kwargs in watched:
            if name.startswith("flow_matching."):
                binder = _sm90_binder(getattr(*_kernels()[name]).kernel)
                key = repr(binder(*args, **kwargs)[1])
                specialisations.setdefault(name, set()).add(key)
    assert set(specialisations) == {"flow_matching._pair_kernel", "flow_matching._loss_kernel",
                                    "flow_matching._noise_kernel"}
    for name, keys in specialisations.items():
        assert len(keys) == 1, f"{name}: {len(keys)} variants for seeds {seeds}: {sorted(keys)}"


# ------------------------------------------------------------------------- labels


@needs_kernels
@pytest.mark.parametrize("backend", ["auto", "triton", "reference"])
@pytest.mark.parametrize("bad", [7, -1], ids=["C", "-1"])
def test_labels_outside_the_table_are_refused_before_a_launch(watched, backend, bad):
    """A label C or -1 would make a kernel read outside the class table (on a GPU: an illegal
    address, or garbage): every public op with labels refuses it, naming the argument."""
    x, table, labels, t = _tiny()
    labels = labels.clone()
    labels[2] = bad
    options = dict(seed=3, gamma=0.5, backend=backend)
    expected = r"labels must lie in \[0, 7\) for 7 classes"
    with pytest.raises(ValueError, match=expected):
        dispatch.fused_pair(x, labels, table, t, **options)
    with pytest.raises(ValueError, match=expected):
        dispatch.fused_loss(x.clone(), x, labels, table, t, **options)
    with pytest.raises(ValueError, match=expected):
        dispatch.cosine_cross_entropy(x, table, labels, backend=backend)
    assert not watched, "a kernel was launched with bad labels"


@needs_kernels
def test_labels_checked_by_the_caller_skip_the_sync(monkeypatch):
    """fit checks its labels once; its per-step calls pass labels_checked=True and take no
    range check (one host sync each) per step."""
    import fma_fast
    from fma_fast.core import validation

    checks = []
    real = validation.check_labels
    monkeypatch.setattr(validation, "check_labels",
                        lambda *args, **kwargs: checks.append(args[0]) or real(*args, **kwargs))
    x, table, labels, _ = _tiny(rows=12)
    fma_fast.fit(x.cpu(), labels.cpu(), table.cpu(), blocks=1, epochs=2, batch_size=4,
                 progress=False)
    assert checks == ["labels"], f"label checks during fit: {checks}"
