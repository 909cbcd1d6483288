"""Training what sits before a fixed FMA field through its solve (docs/method.md §10): the
documented CLIP-Adapter example runs and learns, and its gradients are autograd's through
the plain reference loop."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from support import assert_gradients_close, randomize_parameters

import fma_fast
from fma_fast.core import reference

DOCS = Path(__file__).resolve().parents[1] / "docs" / "method.md"
pytestmark = pytest.mark.usefixtures("one_thread")


def _example() -> str:
    section = DOCS.read_text().split("## §10 Training through FMA", 1)[1]
    (block,) = re.findall(r"```python\n(.*?)```", section, re.S)
    return block


def test_the_documented_adapter_example_runs_and_its_loss_falls(capsys):
    namespace: dict = {}
    exec(compile(_example(), str(DOCS), "exec"), namespace)  # noqa: S102 (our own docs)
    losses = namespace["losses"]
    assert len(losses) == 30 and losses[-1] < 0.7 * losses[0], losses
    assert all(not p.requires_grad for p in namespace["field"].parameters())
    assert "adapter loss" in capsys.readouterr().out


class _Adapter(torch.nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.down = torch.nn.Linear(dim, dim // 2, bias=False)
        self.up = torch.nn.Linear(dim // 2, dim, bias=False)

    def forward(self, x):
        return F.normalize(0.2 * F.relu(self.up(F.relu(self.down(x)))) + 0.8 * x, dim=-1)


@pytest.mark.parametrize("train_table", [False, True])
def test_adapter_and_table_gradients_equal_autograd_through_the_plain_loop(train_table):
    dim, rows, classes, steps = 10, 13, 7, 4
    field = fma_fast.VelocityNet(dim, blocks=2)
    randomize_parameters(field, seed=3, scale=0.3)
    field.requires_grad_(False)
    torch.manual_seed(0)
    adapter = _Adapter(dim)
    generator = torch.Generator().manual_seed(5)
    x = F.normalize(torch.randn(rows, dim, generator=generator), dim=-1)
    table = F.normalize(torch.randn(classes, dim, generator=generator), dim=-1)
    labels = torch.randint(classes, (rows,), generator=generator)

    def grads(transport, loss_of) -> dict:
        adapter.zero_grad(set_to_none=True)
        z = table.clone().requires_grad_(train_table)
        loss_of(transport(adapter(x)), z, labels).backward()
        found = {name: p.grad for name, p in adapter.named_parameters()}
        if train_table:
            found["class_features"] = z.grad
        return found

    got = grads(lambda f: fma_fast.solve(f, field, steps, differentiable=True),
                fma_fast.cosine_cross_entropy)
    expected = grads(lambda f: reference.euler_solve(field, f, steps),
                     reference.cosine_cross_entropy)
    assert_gradients_close(got, expected, torch.float32, "CLIP-Adapter through FMA")
    assert all(p.grad is None for p in field.parameters())
