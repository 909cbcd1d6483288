"""Work lands on the device asked for, and data crossing devices has arrived before it is read:
torchrun ranks use their own GPU, the doctor reports the paths of the device it examines, and
the solve never reads features from a device-to-host copy still in flight. No GPU is needed:
the device bookkeeping is faked (``kernel_support.FakeCudaDevices``) and an asynchronous copy
is emulated."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from kernel_support import FakeCudaDevices
from support import randomize_parameters

import fma_fast
from fma_fast import doctor
from fma_fast.core import distributed
from fma_fast.solver import routing


@pytest.fixture
def torchrun_rank(monkeypatch):
    """This process as rank 1 of 2 on one machine, its process group already joined."""
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)


def test_a_torchrun_rank_runs_on_its_local_gpu(monkeypatch, torchrun_rank):
    """Rank 1 on a 2-GPU machine: inside ``launch`` GPU 1 is current (a bare "cuda", torch's
    streams and every Triton launch go there), and the previous device is current after."""
    gpus = FakeCudaDevices(monkeypatch, count=2)
    with distributed.launch() as context:
        assert (context.rank, context.local_rank) == (1, 1)
        assert torch.cuda.current_device() == 1
        assert context.device("cuda") == torch.device("cuda", 1)
    assert gpus.current == 0


def test_a_cpu_torchrun_job_touches_no_gpu(monkeypatch, torchrun_rank):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def no_gpu(*args):
        raise AssertionError("a CPU job switched the CUDA device")

    monkeypatch.setattr(torch.cuda, "_exchange_device", no_gpu)
    monkeypatch.setattr(torch.cuda, "set_device", no_gpu)
    with distributed.launch() as context:
        assert context.world_size == 2


def test_the_doctor_reports_the_solve_paths_of_the_device_it_examines(monkeypatch):
    """On a (fake) GPU the doctor must say what a solve there runs, the fused kernels in every
    precision, not the paths of its probe model's device (the CPU: the folded torch chain, and
    fp16 unavailable). The one-row probe launch of the kernels is stubbed: no GPU here."""
    FakeCudaDevices(monkeypatch, count=2)
    monkeypatch.setattr(routing, "HAS_TRITON", True)
    monkeypatch.setattr(routing, "solver_plan", lambda *args, **kwargs: None)
    monkeypatch.setattr(routing, "kernels_run", lambda plan: True)
    solve = doctor.solve_routes(torch.device("cuda", 1))
    assert solve == {precision: f"fused-triton-{precision}"
                     for precision in ("fp32", "bf16", "fp16")}, solve


def test_features_copied_to_the_host_have_landed_before_they_are_read(monkeypatch):
    """Features on a GPU and the model on the CPU: a non-blocking device-to-host copy returns
    before its bytes land, and the finiteness check and the CPU solve would read them early.
    Emulated: a non-blocking copy to the host hands back the bytes not yet written (NaN here);
    half features on the CPU stand in for the GPU ones (so the copy is a real one)."""
    real_to = torch.Tensor.to

    def emulated(self, *args, **kwargs):
        result = real_to(self, *args, **kwargs)
        if kwargs.get("non_blocking") and result.device.type == "cpu" and result is not self:
            return torch.full_like(result, float("nan"))
        return result

    net = fma_fast.VelocityNet(16, blocks=1)
    randomize_parameters(net, scale=0.2)
    g = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(torch.randn(9, 16, generator=g), dim=-1)
    table = torch.nn.functional.normalize(torch.randn(5, 16, generator=g), dim=-1)
    expected = fma_fast.solve(features.half().float(), net, 3, class_features=table, topk=2)
    monkeypatch.setattr(torch.Tensor, "to", emulated)
    result = fma_fast.solve(features.half(), net, 3, class_features=table, topk=2)
    assert torch.equal(result.topk_indices, expected.topk_indices)
    assert torch.equal(result.topk_values, expected.topk_values)
