"""The whole pipeline on a GPU against the CPU reference: solve on every precision, select_steps,
fit with the fused kernels, bounded memory for many classes. Skipped
without CUDA (the kernels' own tests run in the interpreter there)."""

from __future__ import annotations

import pytest
import torch
from support import randomize_parameters

import fma_fast
from fma_fast import synthetic
from fma_fast.core import names
from fma_fast.kernels._common import HAS_TRITON

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and HAS_TRITON),
    reason="SKIPPED, not passed: needs a CUDA GPU and triton",
)

AGREEMENT = {"fp32": 0.999, "bf16": 0.98, "fp16": 0.99}
"""Share of top-1 predictions equal to the fp32 reference's, per solve precision (on a trained
field, where near-ties are rare: fp32 differs only by tf32x3 rounding)."""


@pytest.fixture(scope="module")
def trained():
    task = synthetic.make_task(num_classes=20, dim=64, shots=8, test_per_class=50, seed=4)
    fitted = fma_fast.fit(task.train.features, task.train.labels, task.class_features,
                          blocks=3, epochs=30, lr=1e-3, gamma=0.05, device="cuda", seed=4,
                          progress=False)
    return task, fitted


def test_fit_on_cuda_uses_the_fused_kernels_and_learns(trained):
    task, fitted = trained
    assert fitted.config["path"] == names.PATH_TRITON, fitted.config["path"]
    assert fitted.history[-1] < 0.8 * fitted.history[0], fitted.history


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_solve_on_cuda_agrees_with_the_reference(trained, precision):
    task, fitted = trained
    model = fitted.model
    x, z = task.test.features.cuda(), task.class_features.cuda()
    expected = fma_fast.solve(x.cpu(), model.cpu(), 6, class_features=z.cpu(),
                              backend="reference")
    model.cuda()
    result = fma_fast.solve(x, model, 6, class_features=z, topk=3, precision=precision)
    assert result.path.startswith(f"fused-triton-{precision}+triton"), result.path
    assert result.pred.device.type == "cuda"
    agreement = float((result.pred.cpu() == expected.pred).double().mean())
    assert agreement >= AGREEMENT[precision], f"{precision}: {agreement:.4f} agreement"


def test_select_steps_on_cuda_equals_the_cpu(trained):
    task, fitted = trained
    model = fitted.model.cuda()
    val = (task.val.features.cuda(), task.val.labels.cuda(), task.class_features.cuda())
    gpu = fma_fast.select_steps(model, *val, max_steps=6)
    cpu = fma_fast.select_steps(model.cpu(), task.val.features, task.val.labels,
                                task.class_features, max_steps=6)
    model.cuda()
    assert gpu.accuracy == pytest.approx(cpu.accuracy, abs=1.5 / len(task.val.labels))
    assert gpu.cross_entropy == pytest.approx(cpu.cross_entropy, rel=1e-3, abs=1e-4)


def test_many_classes_keep_gpu_memory_bounded():
    net = fma_fast.VelocityNet(64, blocks=1).cuda()
    randomize_parameters(net)
    x = torch.nn.functional.normalize(torch.randn(4096, 64, device="cuda"), dim=-1)
    z = torch.nn.functional.normalize(torch.randn(100_000, 64, device="cuda"), dim=-1)
    labels = torch.randint(100_000, (4096,), device="cuda")
    fma_fast.solve(x[:8], net, 2, class_features=z)  # compile outside the measurement
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fma_fast.solve(x, net, 2, class_features=z, topk=5)
    fma_fast.select_steps(net, x, labels, z, max_steps=2)
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 4 * 4096 * 100_000 / 10, f"peak {peak / 2**20:.0f} MiB: an N×C buffer?"
