"""Shared fixtures. Without CUDA the Triton kernels run in the interpreter (set before import)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_report_header(config) -> str:
    """Which CPU code paths this run takes: CI runs the CPU-dependent tests twice, the second
    time with AVX-512/AMX masked (.ci/run)."""
    from fma_fast.core.environment import cpu_isa
    from fma_fast.solver import routing

    return (f"CPU ISA in effect: {cpu_isa()}; bf16 on BF16 units: "
            f"{routing.cpu_bf16_units()}")


OFFICIAL_FIXTURES = {
    "small": Path(__file__).resolve().parent / "fixtures" / "official_fma_small",
    "large": Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official_fma",
}
"""Checkpoints in the released format with golden outputs of the released code: the small one
(D=64) is in the repo, so every clone runs the golden tests; the large one (D=512) lives
beside the checkout in ../shared and is used as well where it is there."""


@pytest.fixture(params=sorted(OFFICIAL_FIXTURES))
def official_fixture(request) -> Path:
    folder = OFFICIAL_FIXTURES[request.param]
    if not (folder / "golden.pt").is_file():
        if request.param == "small":
            pytest.fail(f"the in-repo golden fixture is missing: {folder}")
        pytest.skip(f"SKIPPED, not passed: the large official fixture is not at {folder}")
    return folder


@pytest.fixture
def golden(official_fixture: Path) -> dict:
    return torch.load(official_fixture / "golden.pt", weights_only=True)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation (several times slower
    on a busy 2-core machine). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomize_parameters(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Give every parameter non-zero values: the released init zeroes whole layers, and a
    comparison against a zero field could not fail."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
