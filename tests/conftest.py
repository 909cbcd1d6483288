"""Shared fixtures. Without CUDA the Triton kernels run in the interpreter (set before import)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

OFFICIAL_FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "official_fma"


@pytest.fixture
def official_fixture() -> Path:
    """The released-format checkpoint with golden outputs, kept beside the repo in ../shared."""
    if not (OFFICIAL_FIXTURE / "golden.pt").is_file():
        pytest.skip(f"SKIPPED, not passed: official fixture not found at {OFFICIAL_FIXTURE}")
    return OFFICIAL_FIXTURE


@pytest.fixture
def golden(official_fixture: Path) -> dict:
    return torch.load(official_fixture / "golden.pt", weights_only=True)


def randomize_parameters(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Give every parameter non-zero values: the released init zeroes whole layers, and a
    comparison against a zero field could not fail."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
