"""solve(differentiable=True): gradients through the folded solve vs autograd through the plain
reference loop, gradcheck in float64, the Triton forward under the interpreter, and what the
backward skips."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_support import SKIP_REASON, kernel_device
from support import assert_gradients_close, randomize_parameters
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode

import fma_fast
from fma_fast.core import reference
from fma_fast.solver import api, fused, grad, plan, routing

pytestmark = pytest.mark.usefixtures("one_thread")


def random_net(dim: int, blocks: int, width: int | None = None, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> fma_fast.VelocityNet:
    net = fma_fast.VelocityNet(dim, blocks=blocks, width=width)
    randomize_parameters(net, seed=seed, scale=0.3)
    return net.to(dtype)


def unit_rows(rows: int, dim: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=generator, dtype=torch.float64),
                       dim=-1).to(dtype)


def gradients(output_of, model, x: torch.Tensor, weights: torch.Tensor) -> dict:
    """d(Σ weights·output)/d(features and every parameter), by name."""
    x = x.detach().clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    (output_of(x) * weights).sum().backward()
    found = {"features": x.grad}
    found.update({name: p.grad for name, p in model.named_parameters()})
    model.zero_grad(set_to_none=True)
    return found


SHAPES = [  # (rows, dim, blocks, width, steps): odd sizes, no block, width != dim, M = 1
    (5, 12, 2, None, 3),
    (3, 7, 0, 5, 2),
    (6, 9, 1, 11, 1),
    (4, 10, 3, 6, 4),
]


@pytest.mark.parametrize(("rows", "dim", "blocks", "width", "steps"), SHAPES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gradients_equal_autograd_through_the_reference_loop(rows, dim, blocks, width, steps,
                                                              precision):
    net = random_net(dim, blocks, width, seed=rows)
    x = unit_rows(rows, dim, seed=dim)
    weights = torch.randn(rows, dim, generator=torch.Generator().manual_seed(3))
    if precision == "bf16" and not routing.cpu_bf16_units():  # AVX2-only CPUs (CI's masked pass)
        with pytest.raises(ValueError, match="needs a CPU with BF16 units"):
            fma_fast.solve(x, net, steps, differentiable=True, precision=precision)
        return
    expected = gradients(lambda f: reference.euler_solve(net, f, steps), net, x, weights)
    got = gradients(lambda f: fma_fast.solve(f, net, steps, differentiable=True,
                                             precision=precision), net, x, weights)
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    assert_gradients_close(got, expected, dtype, f"{precision} {rows}x{dim} b={blocks} M={steps}")


def test_the_forward_equals_the_reference_and_the_fast_solve():
    net = random_net(24, 3, 17)
    x = unit_rows(33, 24)
    moved = fma_fast.solve(x, net, 5, differentiable=True)
    assert moved.requires_grad and moved.dtype == torch.float32
    with torch.no_grad():
        expected = reference.euler_solve(net, x, 5)
    displacement = float((expected - x).abs().max())
    assert float((moved.detach() - expected).abs().max()) <= 1e-5 * displacement
    torch.testing.assert_close(moved.detach(), fma_fast.solve(x, net, 5), rtol=1e-5, atol=1e-6)


GRADCHECK_SHAPES = [  # (rows, dim, blocks, width, steps, fast): M = 0 and 1 included
    (3, 5, 1, 4, 2, True),
    (2, 4, 2, 3, 1, True),
    (3, 6, 0, 3, 3, True),
    (2, 5, 1, 3, 0, True),
    (2, 3, 1, 2, 2, False),  # the whole Jacobian, entry by entry (slow mode)
]


class _Solve(torch.nn.Module):
    """solve(differentiable=True) as a module, so functional_call swaps the field's
    parameters for gradcheck's inputs."""

    def __init__(self, field: fma_fast.VelocityNet, steps: int):
        super().__init__()
        self.field, self.steps = field, steps

    def forward(self, x):
        return fma_fast.solve(x, self.field, self.steps, differentiable=True)


def _gradcheck_inputs(module: torch.nn.Module, x: torch.Tensor):
    names = [name for name, _ in module.named_parameters()]
    params = [p.detach().clone().requires_grad_(True) for _, p in module.named_parameters()]
    return names, params, x.detach().clone().requires_grad_(True)


@pytest.mark.parametrize(("rows", "dim", "blocks", "width", "steps", "fast"), GRADCHECK_SHAPES)
def test_gradcheck_in_float64(rows, dim, blocks, width, steps, fast):
    """The Jacobian of x_M w.r.t. the features and every parameter (time MLP, input
    projection, LayerNorm affine, block Linears, adaLN, final layer) against finite
    differences, in float64: in gradcheck's fast mode (random projections of it, each input
    tensor perturbed along a random direction), and once entry by entry."""
    net = random_net(dim, blocks, width, seed=steps, dtype=torch.float64)
    module = _Solve(net, steps)
    names, params, x = _gradcheck_inputs(module, unit_rows(rows, dim, dtype=torch.float64))

    def call(features, *values):
        return functional_call(module, dict(zip(names, values)), (features,))

    assert torch.autograd.gradcheck(call, (x, *params), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=fast)


def test_gradcheck_of_the_loss_reaches_the_class_table():
    """cosine_cross_entropy(solve(x0, model, M, differentiable=True), z, y): features, class
    table and every parameter in one float64 gradcheck."""
    net = random_net(5, 1, 4, seed=2, dtype=torch.float64)
    module = _Solve(net, 2)
    names, params, x = _gradcheck_inputs(module, unit_rows(4, 5, dtype=torch.float64))
    z = unit_rows(3, 5, seed=8, dtype=torch.float64).requires_grad_(True)
    labels = torch.tensor([0, 2, 1, 2])

    def loss(features, table, *values):
        moved = functional_call(module, dict(zip(names, values)), (features,))
        return fma_fast.cosine_cross_entropy(moved, table, labels, logit_scale=5.0)

    assert torch.autograd.gradcheck(loss, (x, z, *params), eps=1e-6, atol=1e-7, rtol=1e-5,
                                    fast_mode=True)


def test_zero_steps_is_the_identity_with_its_gradient():
    net = random_net(6, 1)
    x = unit_rows(4, 6).requires_grad_(True)
    moved = fma_fast.solve(x, net, 0, differentiable=True)
    assert torch.equal(moved.detach(), x.detach()) and moved is not x
    upstream = torch.randn(4, 6)
    moved.backward(upstream)
    assert torch.equal(x.grad, upstream)


@pytest.mark.skipif(kernel_device() is None, reason=SKIP_REASON)
def test_the_triton_forward_gives_the_reference_gradients():
    """backend="triton": the fused step kernels run the forward (the interpreter on the CPU),
    the backward recomputes in torch; gradients as the reference loop's."""
    net = random_net(16, 2, seed=4).to(kernel_device())
    x = unit_rows(9, 16).to(kernel_device())
    weights = torch.randn(9, 16, generator=torch.Generator().manual_seed(5)).to(x.device)
    seen = []
    original = fused.fused_states

    def spy(*args, **kwargs):
        seen.append(True)
        return original(*args, **kwargs)

    fused.fused_states = spy
    try:
        got = gradients(lambda f: fma_fast.solve(f, net, 3, differentiable=True,
                                                 backend="triton"), net, x, weights)
    finally:
        fused.fused_states = original
    assert seen, "the fused kernels did not run the forward"
    expected = gradients(lambda f: reference.euler_solve(net, f, 3), net, x, weights)
    assert_gradients_close(got, expected, torch.float32, "triton forward")


def test_new_weights_are_used_after_an_in_place_update(monkeypatch):
    """Weights change at every optimizer step: a differentiable call never reads the plan
    cache, and one after an in-place update uses the new weights."""
    net = random_net(8, 2)
    x = unit_rows(5, 8)
    fma_fast.solve(x, net, 3)  # caches a plan of the old weights

    def no_plan(*args, **kwargs):
        raise AssertionError("a differentiable solve read the plan cache")

    for module in (plan, routing, api):
        monkeypatch.setattr(module, "solver_plan", no_plan)
    first = fma_fast.solve(x, net, 3, differentiable=True)
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.mul_(1.5).add_(0.01)
    second = fma_fast.solve(x, net, 3, differentiable=True)
    with torch.no_grad():
        expected = reference.euler_solve(net, x, 3)
    torch.testing.assert_close(second.detach(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(first.detach(), second.detach())


ROWS = 7  # a row count no other dimension of the test shares


class _CountRowGemms(TorchDispatchMode):
    """Counts the matrix products over the rows (an operand with ROWS rows or columns)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        gemm = func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm,
                                       torch.ops.aten.addmm_)
        if gemm and any(isinstance(a, torch.Tensor) and ROWS in a.shape for a in args):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("train_field", "train_features"),
                         [(True, True), (False, True), (True, False)])
def test_the_backward_skips_what_needs_no_gradient(train_field, train_features):
    """Per step the backward recomputes the step (2B + 2 GEMMs over the rows) and runs the
    input products (2B + 2, the last one skipped at step 0 when the features need no
    gradient) and, only when the field needs gradients, the weight products (2B + 2)."""
    blocks, steps = 2, 3
    net = random_net(10, blocks)
    net.requires_grad_(train_field)
    x = unit_rows(ROWS, 10).requires_grad_(train_features)
    moved = fma_fast.solve(x, net, steps, differentiable=True)
    with _CountRowGemms() as counter:
        moved.sum().backward()
    per_step = 2 * blocks + 2
    expected = steps * (3 if train_field else 2) * per_step - (0 if train_features else 1)
    assert counter.count == expected, f"{counter.count} row GEMMs, expected {expected}"
    assert (x.grad is not None) == train_features
    assert all((p.grad is not None) == train_field for p in net.parameters())


def test_any_other_velocity_callable_is_differentiated_through_the_loop():
    matrix = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)).requires_grad_(True)

    def linear_field(features, t):
        return features @ matrix + t

    x = unit_rows(4, 6).requires_grad_(True)
    moved = fma_fast.solve(x, linear_field, 3, differentiable=True)
    moved.sum().backward()
    got = (x.grad.clone(), matrix.grad.clone())
    x.grad = matrix.grad = None
    reference.euler_solve(linear_field, x, 3).sum().backward()
    torch.testing.assert_close(got[0], x.grad)
    torch.testing.assert_close(got[1], matrix.grad)


def test_refusals():
    net = random_net(6, 1)
    x, z = unit_rows(3, 6), unit_rows(4, 6, seed=2)
    for extra in ({"class_features": z}, {"topk": 2}, {"batch_size": 2},
                  {"ensemble_steps": (0, 1)}, {"zero_shot": True}):
        with pytest.raises(ValueError, match=f"{next(iter(extra))} is not available with "
                                             "differentiable=True"):
            fma_fast.solve(x, net, 2, differentiable=True, **extra)
    with pytest.raises(ValueError, match="compiled"):
        fma_fast.solve(x, net, 2, differentiable=True, backend="compiled", precision="bf16")
    with pytest.raises(TypeError, match="differentiable must be True or False"):
        fma_fast.solve(x, net, 2, differentiable=1)
    bad = x.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="features contains NaN"):
        fma_fast.solve(bad, net, 2, differentiable=True)
    with torch.no_grad():
        net.final_layer.linear.bias[0] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fma_fast.solve(x, net, 2, differentiable=True)


def test_the_trajectory_output_gives_the_gradients_of_every_state():
    """``trajectory=True`` (refine's weighted losses): the (M + 1, N, D) states, a gradient
    reaching each of them, as autograd through the reference trajectory."""
    net = random_net(9, 2, seed=6)
    x = unit_rows(5, 9)
    weights = torch.randn(4, 5, 9, generator=torch.Generator().manual_seed(2))
    route = routing.resolve(net, routing.SolveOptions(), 3, x.device, probe=False)
    got = gradients(lambda f: grad.differentiable_solve(net, f, 3, route,
                                                              trajectory=True), net, x, weights)
    expected = gradients(lambda f: torch.stack(reference.euler_solve(
        net, f, 3, return_trajectory=True)), net, x, weights)
    assert_gradients_close(got, expected, torch.float32, "trajectory")


@pytest.mark.parametrize("train_features", [True, False])
def test_row_chunks_on_worker_threads_give_the_same_gradients(monkeypatch, train_features):
    """With several CPU threads the backward runs row chunks on workers, each summing its
    own weight gradients: 301 rows in chunks of 64 (the last one partial) on 2 workers."""
    monkeypatch.setattr(grad, "CPU_CHUNK_ROWS", 64)
    net = random_net(12, 2, 10, seed=8)
    x = unit_rows(301, 12)
    weights = torch.randn(301, 12, generator=torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        chunked = grad._ChunkedBackward(301, x.device, [])
        assert chunked.workers == 2 and len(chunked.chunks) == 5
        solve = lambda f: fma_fast.solve(f, net, 3, differentiable=True)  # noqa: E731
        got = gradients(solve, net, x, weights)
    finally:
        torch.set_num_threads(threads)
    expected = gradients(lambda f: reference.euler_solve(net, f, 3), net, x, weights)
    if not train_features:
        got.pop("features"), expected.pop("features")
    assert_gradients_close(got, expected, torch.float32, "row chunks on 2 workers")
