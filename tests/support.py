"""Helpers shared by the test modules (test modules import from here, never from each other
or from conftest). Kernel-test support (the located assert_close on the tolerance table, the
kernel device, GPU numerics in the interpreter) stays in kernel_support.py and the CLIP
fixtures (tiny open_clip models, image sets, the network guard) in clip_support.py: each is
used by one family of tests and brings its own imports."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fma_fast import VelocityNet, reference
from fma_fast.cli import main
from fma_fast.core.policy import PRECISION_DTYPES, TOLERANCES

REPO = Path(__file__).resolve().parents[1]


def randomize_parameters(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Give every parameter non-zero values: the released init zeroes whole layers, and a
    comparison against a zero field could not fail."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))


# Error of a state, relative to how far the reference moved the features from x_0 (so a solver
# that barely moves cannot hide in the size of x_0), by precision: the table's GEMM-chain column.
TOLERANCE = {name: TOLERANCES[dtype].chain for name, dtype in PRECISION_DTYPES.items()}
def random_net(dim: int, blocks: int, width: int | None = None, seed: int = 0) -> VelocityNet:
    """A field with every parameter non-zero (the released init zeroes adaLN and output layers)."""
    net = VelocityNet(dim, blocks=blocks, width=width)
    randomize_parameters(net, seed=seed, scale=0.2)
    return net.eval()


def unit_rows(rows: int, dim: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=generator), dim=-1)


@torch.no_grad()
def reference_trajectory(net: VelocityNet, x: torch.Tensor, steps: int, step_size: float):
    return reference.euler_solve(net, x, steps, step_size, return_trajectory=True)


def assert_states_close(got, expected, x0, tolerance, where):
    """Compare trajectories state by state; on failure name the step, row and column."""
    assert len(got) == len(expected), f"{where}: {len(got)} states, expected {len(expected)}"
    for step, (actual, wanted) in enumerate(zip(got, expected)):
        assert actual.shape == wanted.shape and actual.dtype == torch.float32, (
            f"{where}, step {step}: got {tuple(actual.shape)} {actual.dtype}, "
            f"expected {tuple(wanted.shape)} float32"
        )
        if step == 0:
            assert torch.equal(actual, wanted), f"{where}: x_0 is not the input"
            continue
        moved = float((wanted - x0).abs().max())
        assert moved > 0, f"{where}, step {step}: the reference did not move (zero field?)"
        error = (actual - wanted).abs()
        worst = int(error.argmax())
        row, col = divmod(worst, error.shape[1])
        relative = float(error.max()) / moved
        assert relative <= tolerance, (
            f"{where}, step {step}: max error {float(error.max()):.3g} is {relative:.3g} of the "
            f"displacement {moved:.3g} (tolerance {tolerance:g}) at row {row}, col {col}: "
            f"got {float(actual[row, col]):.7g}, expected {float(wanted[row, col]):.7g}"
        )


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, in float64."""
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm())


def quantized(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a qint8 quantized tensor (files may hold them; loaders must refuse)."""
    with warnings.catch_warnings():  # torch deprecates quantized tensors
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(tensor.float(), 0.1, 0, torch.qint8)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns while active (CPU or CUDA), as
    ``numel`` and ``bytes``. A Triton kernel cannot allocate memory: all it touches are the
    tensors its launcher passes, and those come from aten ops, which this mode sees."""

    def __init__(self):
        super().__init__()
        self.numel = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.numel = max(self.numel, tensor.numel())
                self.bytes = max(self.bytes, tensor.numel() * tensor.element_size())
        return out


def one_line_error(capsys, argv: list[str]) -> str:
    """Run ``fma-fast argv`` in process: it must exit 2 with one line on stderr and no
    traceback; returns the line."""
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, f"exit status {code} for {argv}: {err}"
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def assert_gradients_close(got: dict, expected: dict, dtype: torch.dtype, where: str) -> None:
    """|a − e| ≤ rtol·max|e| + atol element-wise, with the (rtol, atol) of ``dtype`` from the
    one tolerance table: a gradient sums over rows and steps, so its rounding error follows
    its largest entries (as solver states are compared relative to their displacement)."""
    rtol, atol = TOLERANCES[dtype].rtol, TOLERANCES[dtype].atol
    assert got.keys() == expected.keys()
    for name, wanted in expected.items():
        actual = got[name]
        assert actual is not None, f"{where}: no gradient reached {name}"
        scale = float(wanted.abs().max())
        assert scale > 0, f"{where}: the reference gradient of {name} is zero"
        error = (actual.double() - wanted.double()).abs()
        bad = error > rtol * scale + atol
        assert not bool(bad.any()), (
            f"{where}: d/d{name}: {int(bad.sum())} of {bad.numel()} elements differ; worst "
            f"{float(error.max()):.3g} (largest gradient {scale:.3g}, rtol {rtol:g}·max + "
            f"atol {atol:g})")


def child_environment() -> dict[str, str]:
    """The environment of a CLI child process: one thread, this checkout on the path."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def kill_after_parts(command: list[str], out: Path, env: dict[str, str], *, parts: int = 3,
                     seconds: float = 180) -> int:
    """Start ``command``, SIGKILL it once ``parts`` part records exist in ``out`` (or after
    ``seconds``); returns how many records there were at the kill."""
    process = subprocess.Popen(command, env=env)
    deadline = time.time() + seconds
    while time.time() < deadline and len(list(out.glob("*.done.json"))) < parts:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return len(list(out.glob("*.done.json")))
