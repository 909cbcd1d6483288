"""solve / select_steps: streaming, results, and one trajectory pass for every M."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from kernel_support import SKIP_REASON, kernel_device
from support import LargestTensor, randomize_parameters

import fma_fast
from fma_fast import reference
from fma_fast.core import policy
from fma_fast.ops import dispatch, scoring
from fma_fast.solver import routing


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def model() -> fma_fast.VelocityNet:
    net = fma_fast.VelocityNet(12, blocks=2)
    randomize_parameters(net, scale=0.2)
    return net


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(9)
    return torch.randn(37, 12, generator=generator), torch.randn(11, 12, generator=generator)


@pytest.mark.parametrize("batch_size", [1, 5, 37, 1000])
def test_chunked_solve_equals_one_pass(model, data, batch_size):
    x, z = data
    with torch.no_grad():
        expected = reference.euler_solve(model, x, 4)
    moved = fma_fast.solve(x, model, 4, batch_size=batch_size)
    torch.testing.assert_close(moved, expected, rtol=1e-5, atol=1e-6)
    result = fma_fast.solve(x, model, 4, class_features=z, topk=3, batch_size=batch_size)
    values, indices = reference.cosine_topk(expected, z, 3)
    torch.testing.assert_close(result.topk_values, values, rtol=1e-5, atol=1e-6)
    assert torch.equal(result.topk_indices, indices)
    assert torch.equal(result.pred, indices[:, 0])
    assert isinstance(result.path, str) and result.path


def test_topk_equal_to_class_count_sorts_every_class(model, data):
    x, z = data
    result = fma_fast.solve(x, model, 2, class_features=z, topk=z.shape[0])
    assert sorted(result.topk_indices[0].tolist()) == list(range(z.shape[0]))
    assert (result.topk_values[:, :-1] >= result.topk_values[:, 1:]).all()


def test_memory_mapped_numpy_features_stream(model, data, tmp_path):
    x, z = data
    path = tmp_path / "features.npy"
    np.save(path, x.numpy())
    mapped = np.load(path, mmap_mode="r+")
    result = fma_fast.solve(mapped, model, 3, class_features=z, batch_size=8)
    assert torch.equal(result.pred, fma_fast.solve(x, model, 3, class_features=z).pred)


def test_select_steps_matches_solving_each_m_separately(model, data):
    x, z = data
    labels = torch.arange(37) % 11
    selection = fma_fast.select_steps(model, x, labels, z, max_steps=6, batch_size=10)
    for steps in range(7):
        pred = fma_fast.solve(x, model, steps, class_features=z).pred
        assert selection.accuracy[steps] == pytest.approx(float((pred == labels).double().mean()))
        transported = fma_fast.solve(x, model, steps, backend="reference")
        expected_loss = float(reference.cosine_cross_entropy(transported, z, labels))
        assert selection.cross_entropy[steps] == pytest.approx(expected_loss, rel=1e-5)
    tied = [m for m, acc in enumerate(selection.accuracy) if acc == max(selection.accuracy)]
    assert selection.best_steps == min(tied, key=lambda m: selection.cross_entropy[m])
    assert "<- best" in selection.table()


def test_ties_in_accuracy_are_broken_by_cross_entropy_then_fewest_steps():
    z = torch.eye(3)
    x = torch.tensor([[1.0, 0.97, 0.0], [0.0, 1.0, 0.97], [0.97, 0.0, 1.0]])  # near ties
    labels = torch.arange(3)

    def toward_labels(features, t):  # every step sharpens the (already right) predictions
        return 0.1 * (z[labels] - torch.nn.functional.normalize(features, dim=-1))

    selection = fma_fast.select_steps(toward_labels, x, labels, z, max_steps=4)
    assert selection.accuracy == [1.0] * 5
    assert selection.best_steps == 4, selection.table()
    assert selection.cross_entropy == sorted(selection.cross_entropy, reverse=True)
    still = fma_fast.select_steps(lambda f, t: torch.zeros_like(f), x, labels, z, max_steps=4)
    assert still.best_steps == 0, "equal accuracy and loss: the fewest steps"


def test_any_velocity_module_can_be_solved(data):
    x, z = data

    def constant_field(features, t):
        return torch.ones_like(features)

    moved = fma_fast.solve(x, constant_field, 5, step_size=0.1)
    torch.testing.assert_close(moved, x + 0.5)


def interpreter_or_cuda() -> bool:

    return kernel_device() is not None


@pytest.mark.parametrize("backend", ["auto", "folded", "triton"])
def test_every_backend_equals_the_reference(model, data, backend):
    if backend == "triton" and not interpreter_or_cuda():
        pytest.skip(SKIP_REASON)
    x, z = data
    expected = fma_fast.solve(x, model, 3, class_features=z, topk=4, backend="reference")
    assert expected.path == "reference"
    result = fma_fast.solve(x, model, 3, class_features=z, topk=4, backend=backend)
    torch.testing.assert_close(result.topk_values, expected.topk_values, rtol=1e-5, atol=1e-6)
    assert torch.equal(result.topk_indices, expected.topk_indices), result.path
    moved = fma_fast.solve(x, model, 3, backend=backend)
    torch.testing.assert_close(moved, fma_fast.solve(x, model, 3, backend="reference"),
                               rtol=1e-5, atol=1e-6)
    accuracy = fma_fast.accuracy_by_steps(model, x, torch.arange(37) % 11, z, max_steps=3,
                                          backend=backend)
    assert accuracy == fma_fast.accuracy_by_steps(model, x, torch.arange(37) % 11, z,
                                                  max_steps=3, backend="reference")


def test_path_names_the_implementation(model, data):
    x, z = data
    auto = fma_fast.solve(x, model, 2, class_features=z).path
    assert auto.startswith("folded-fp32+") and auto.endswith("-topk")
    generic = fma_fast.solve(x, lambda f, t: torch.zeros_like(f), 2, class_features=z).path
    assert generic.startswith("generic-fp32+")


def test_step_ensemble_scoring_matches_the_reference(model, data):
    x, z = data
    result = fma_fast.solve(x, model, 8, class_features=z, topk=3, ensemble_steps=(0, 4, 8))
    with torch.no_grad():
        probs = reference.step_ensemble_probs(model, x, z, steps=8, ensemble_steps=(0, 4, 8))
    values, indices = probs.topk(3, dim=-1)
    torch.testing.assert_close(result.topk_values, values, rtol=1e-5, atol=1e-6)
    assert torch.equal(result.topk_indices, indices)
    with pytest.raises(ValueError, match="ensemble_steps must be"):
        fma_fast.solve(x, model, 4, class_features=z, ensemble_steps=(0, 8))


def test_precision_options(model, data):
    x, z = data
    with pytest.raises(ValueError, match="fp16' needs a CUDA device"):
        fma_fast.solve(x, model, 2, precision="fp16", device="cpu")
    with pytest.raises(ValueError, match="reference runs in fp32 only"):
        fma_fast.solve(x, model, 2, precision="bf16", backend="reference")
    with pytest.raises(ValueError, match="precision must be one of"):
        fma_fast.solve(x, model, 2, precision="int8")
    with pytest.raises(ValueError, match="backend='folded' needs a VelocityNet"):
        fma_fast.solve(x, lambda f, t: f, 2, backend="folded")
    if not routing.cpu_bf16_units():
        with pytest.raises(ValueError, match="precision='bf16'.* needs a CPU with BF16 units"):
            fma_fast.solve(x, model, 3, precision="bf16")
        return
    low = fma_fast.solve(x, model, 3, precision="bf16")
    exact = fma_fast.solve(x, model, 3)
    error = float((low - exact).norm() / exact.norm())
    assert error < 2e-2, f"bf16 solve is {error:.2e} away from fp32"


@pytest.mark.parametrize("backend", ["auto", "folded", "compiled"])
def test_bf16_on_a_cpu_without_bf16_units_is_refused_with_the_reason(model, data, monkeypatch,
                                                                     backend):
    """Never a silent 30x slowdown: without BF16 units (AVX2 CPUs) bf16 GEMMs are emulated,
    slower than fp32, so solve refuses bf16 and the compiled path and says what to use."""
    x, z = data
    monkeypatch.setattr(routing, "cpu_bf16_units", lambda: False)
    with pytest.raises(ValueError, match=r"precision='bf16' \(and backend='compiled'\) needs a "
                                         r"CPU with BF16 units .*use precision='fp32'"):
        fma_fast.solve(x, model, 2, class_features=z, precision="bf16", backend=backend)
    assert fma_fast.solve(x, model, 2, class_features=z, backend=backend if backend != "compiled"
                          else "auto").path.startswith("folded-fp32")


# --------------------------------------------------- class tiles: top-k and cross-entropy


@pytest.mark.parametrize("classes", [1, 7, 8, 9, 29])
@pytest.mark.parametrize("topk", [1, 3, 11])  # 11: wider than a tile of 8
def test_class_tiles_equal_the_untiled_reference(model, data, monkeypatch, classes, topk):
    """With tiles of 8 classes, C spans zero to three tile boundaries; indices past the first
    tile carry the tile's offset, and the online log-sum-exp equals the plain softmax."""
    monkeypatch.setattr(policy, "CLASS_TILE", 8)
    x, _ = data
    z = torch.nn.functional.normalize(torch.randn(classes, 12, generator=seeded(4)), dim=-1)
    labels = torch.arange(37) % classes
    k = min(topk, classes)
    expected = fma_fast.solve(x, model, 2, class_features=z, topk=k, backend="reference")
    got = fma_fast.solve(x, model, 2, class_features=z, topk=k)
    assert torch.equal(got.topk_indices, expected.topk_indices), "tiled top-k indices differ"
    torch.testing.assert_close(got.topk_values, expected.topk_values, rtol=1e-5, atol=1e-6)
    selection = fma_fast.select_steps(model, x, labels, z, max_steps=2)
    truth = fma_fast.select_steps(model, x, labels, z, max_steps=2, backend="reference")
    assert selection.accuracy == truth.accuracy
    for m, (tiled, plain) in enumerate(zip(selection.cross_entropy, truth.cross_entropy)):
        # logits are 100·cos: fp32 rounding of a logit is about 1e-5
        assert tiled == pytest.approx(plain, rel=1e-5, abs=2e-5), f"cross-entropy at M={m}"


def test_select_steps_never_builds_rows_times_classes(model, monkeypatch):
    """C is 16× the tile here: an N×C logits or softmax temporary would be seen (the largest
    tensor allowed is half of N×C, which the (C, D) normalised table fits in)."""
    monkeypatch.setattr(policy, "CLASS_TILE", 32)
    x = torch.randn(40, 12, generator=seeded(5))
    z = torch.randn(512, 12, generator=seeded(6))
    labels = torch.arange(40) * 7 % 512
    with LargestTensor() as probe:
        fma_fast.select_steps(model, x, labels, z, max_steps=2)
    assert probe.numel < 40 * 512 // 2, f"a tensor of {probe.numel} elements (N×C = {40 * 512})"
    with LargestTensor() as reference_probe:
        fma_fast.select_steps(model, x, labels, z, max_steps=2, backend="reference")
    assert reference_probe.numel >= 40 * 512, "the probe missed the reference's N×C logits"


# ------------------------------------------------------------------ non-finite models


def test_a_model_returning_nan_is_refused(data):
    x, z = data

    def broken(features, t):
        velocity = torch.zeros_like(features)
        velocity[3, 1] = float("nan") if float(t) > 0.15 else 0.0
        return velocity

    with pytest.raises(ValueError, match="returned NaN or Inf velocities at step 3"):
        fma_fast.solve(x, broken, 4, class_features=z)
    with pytest.raises(ValueError, match="returned NaN or Inf velocities"):
        fma_fast.select_steps(broken, x, torch.arange(37) % 11, z, max_steps=4)
    with pytest.raises(ValueError, match="returned NaN or Inf velocities"):
        fma_fast.solve(x, lambda f, t: torch.full_like(f, float("inf")), 1)
    with pytest.raises(ValueError, match=r"must return velocities of shape \(37, 12\)"):
        fma_fast.solve(x, lambda f, t: f[:, :3], 1)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_a_velocity_net_with_nan_weights_is_refused(model, data, backend):
    x, z = data
    with torch.no_grad():
        model.res_blocks[1].mlp[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fma_fast.solve(x, model, 2, class_features=z, backend=backend)
    with pytest.raises(ValueError, match="NaN or Inf"):
        fma_fast.select_steps(model, x, torch.arange(37) % 11, z, max_steps=2, backend=backend)


def test_weights_that_become_nan_after_a_solve_are_refused(model, data):
    x, z = data
    fma_fast.solve(x, model, 2, class_features=z)  # caches a plan
    with torch.no_grad():
        model.input_proj.bias.fill_(float("inf"))
    with pytest.raises(ValueError, match=r"weights contain NaN or Inf \(first in input_proj"):
        fma_fast.solve(x, model, 2, class_features=z)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, -1.0])
def test_logit_scale_must_be_finite_and_positive(model, data, scale):
    x, z = data
    with pytest.raises(ValueError, match="logit_scale must be a finite number > 0"):
        fma_fast.solve(x, model, 2, class_features=z, ensemble_steps=(0, 2), logit_scale=scale)
    for op in (dispatch.cosine_topk, dispatch.step_ensemble_topk):
        with pytest.raises(ValueError, match="logit_scale must be a finite number > 0"):
            op(x if op is dispatch.cosine_topk else [x], z, 1, logit_scale=scale)
    with pytest.raises(ValueError, match="logit_scale must be a finite number > 0"):
        dispatch.cosine_cross_entropy(x, z, torch.arange(37) % 11, scale)


def test_tiled_top_k_keeps_the_lower_index_on_ties_across_tile_borders(monkeypatch):
    """Guards the tile merge: class 11 (second tile) repeats class 3 (first tile) and class 17
    (third tile) repeats class 12: equal cosines, the lower index first, at any k up to C;
    checked against a brute-force sort of the full table."""
    monkeypatch.setattr(policy, "CLASS_TILE", 8)
    g = seeded(8)
    z = torch.nn.functional.normalize(torch.randn(20, 12, generator=g), dim=-1)
    z[11], z[17] = z[3], z[12]
    x = torch.randn(9, 12, generator=g)
    x[0], x[1] = z[3], z[12]  # rows whose best class is a tied pair
    unit = torch.nn.functional.normalize(x, dim=-1)
    cosines = unit @ z.T
    for k in (1, 2, 5, 20):
        values, indices, _ = scoring.tiled_scores(x, z, k)
        for row in range(9):
            order = sorted(range(20), key=lambda c: (-float(cosines[row, c]), c))[:k]
            got = indices[row].tolist()
            # equal cosines may differ in the last bit between a GEMM tile and the full product:
            # compare as (value, index) pairs rounded to the tolerance, then the tie order
            assert sorted(got) == sorted(order) or all(
                abs(float(cosines[row, a]) - float(cosines[row, b])) < 1e-6
                for a, b in zip(got, order)
            ), f"row {row}, k={k}: {got} vs {order}"
        if k >= 2:
            assert indices[0, :2].tolist() == [3, 11] and indices[1, :2].tolist() == [12, 17]
        else:
            assert indices[0].tolist() == [3] and indices[1].tolist() == [12]


# ------------------------------------------------- item 9: fold only what the fold reproduces


class _DoubledVelocity(fma_fast.VelocityNet):
    def forward(self, x, t):
        return 2 * super().forward(x, t)


class _CalledTwice(fma_fast.VelocityNet):
    def __call__(self, x, t):
        return super().__call__(x, t) + super().__call__(x, t)


class _RenamedOnly(fma_fast.VelocityNet):
    """Adds a method and overrides no call: the fold reproduces it."""

    def describe(self) -> str:
        return "renamed"


def _gelu_in_first_mlp(net):
    net.res_blocks[0].mlp[1] = torch.nn.GELU()


def _identity_layer_norm(net):
    net.res_blocks[1].in_ln = torch.nn.Identity()


def _other_eps_layer_norm(net):
    swapped = torch.nn.LayerNorm(net.width, eps=0.5)
    swapped.load_state_dict(net.res_blocks[0].in_ln.state_dict())
    net.res_blocks[0].in_ln = swapped


def _wrapped_input_projection(net):
    net.input_proj = torch.nn.Sequential(net.input_proj, torch.nn.Tanh())


def _instance_forward(net):
    block = net.res_blocks[0]
    original = block.forward
    block.forward = lambda x, y: original(x, y) * 0.5


def _model_hook(net):
    net.register_forward_hook(lambda module, args, out: out * 3)


def _submodule_pre_hook(net):
    net.final_layer.linear.register_forward_pre_hook(lambda module, args: (args[0] * 2,))


def _submodule_hook(net):
    net.res_blocks[1].mlp[0].register_forward_hook(lambda module, args, out: torch.tanh(out))


def _in_place_silu(net):
    net.res_blocks[0].adaLN_modulation[0] = torch.nn.SiLU(inplace=True)


def _parametrized_weight(net):
    torch.nn.utils.parametrize.register_parametrization(
        net.final_layer.linear, "weight", _Halved())


class _Halved(torch.nn.Module):
    def forward(self, weight):
        return weight / 2


UNFOLDABLE = {
    "subclass forward": (_DoubledVelocity, None),
    "subclass __call__": (_CalledTwice, None),
    "GELU for SiLU": (fma_fast.VelocityNet, _gelu_in_first_mlp),
    "LayerNorm -> Identity": (fma_fast.VelocityNet, _identity_layer_norm),
    "LayerNorm other eps": (fma_fast.VelocityNet, _other_eps_layer_norm),
    "wrapped input_proj": (fma_fast.VelocityNet, _wrapped_input_projection),
    "instance forward": (fma_fast.VelocityNet, _instance_forward),
    "model forward hook": (fma_fast.VelocityNet, _model_hook),
    "submodule pre-hook": (fma_fast.VelocityNet, _submodule_pre_hook),
    "submodule hook": (fma_fast.VelocityNet, _submodule_hook),
    "in-place SiLU": (fma_fast.VelocityNet, _in_place_silu),
    "parametrized weight": (fma_fast.VelocityNet, _parametrized_weight),
}


def _changed_net(kind, change) -> fma_fast.VelocityNet:
    net = kind(12, blocks=2)
    randomize_parameters(net, scale=0.2)
    if change is not None:
        change(net)
    return net


def _assert_runs_as_given(net, x, z, steps=4):
    with torch.no_grad():
        expected = reference.euler_solve(net, x, steps)
    torch.testing.assert_close(fma_fast.solve(x, net, steps), expected, rtol=1e-5, atol=1e-5)
    result = fma_fast.solve(x, net, steps, class_features=z, topk=2)
    assert result.path.startswith("generic-fp32+"), result.path
    values, indices = reference.cosine_topk(expected, z, 2)
    assert torch.equal(result.topk_indices, indices)
    torch.testing.assert_close(result.topk_values, values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", sorted(UNFOLDABLE))
def test_a_velocity_net_the_fold_would_not_reproduce_runs_as_given(data, variant):
    net = _changed_net(*UNFOLDABLE[variant])
    x, z = data
    with torch.no_grad():  # the change matters: the plain VelocityNet math differs
        plain = _changed_net(fma_fast.VelocityNet, None)
        assert not torch.allclose(reference.euler_solve(net, x, 4),
                                  reference.euler_solve(plain, x, 4), atol=1e-3)
    _assert_runs_as_given(net, x, z)
    from fma_fast.solver.plan import build_plan, fold_problem, solver_plan

    assert fold_problem(net) is not None
    with pytest.raises(ValueError, match="cannot be folded"):
        fma_fast.solve(x, net, 4, class_features=z, backend="folded")
    with pytest.raises(ValueError, match="cannot be folded"):
        build_plan(net, 2)
    with pytest.raises(ValueError, match="cannot be folded"):
        solver_plan(net, 2)


def test_global_forward_hooks_stop_the_fold(model, data):
    from torch.nn.modules.module import (
        register_module_forward_hook,
        register_module_forward_pre_hook,
    )

    x, z = data
    for register, hook in (
        (register_module_forward_hook,
         lambda module, args, out: out + 0.25 if isinstance(module, torch.nn.Linear) else None),
        (register_module_forward_pre_hook,
         lambda module, args: (args[0] * 1.5,) if isinstance(module, torch.nn.Linear) else None),
    ):
        handle = register(hook)
        try:
            _assert_runs_as_given(model, x, z)
        finally:
            handle.remove()
    assert fma_fast.solve(x, model, 4, class_features=z).path.startswith("folded-fp32+")


def test_a_hook_added_after_a_plan_was_cached_is_honoured(model, data):
    x, z = data
    assert fma_fast.solve(x, model, 4, class_features=z).path.startswith("folded-fp32+")
    handle = model.res_blocks[0].register_forward_hook(lambda module, args, out: out * 2)
    try:
        _assert_runs_as_given(model, x, z)
        with pytest.raises(ValueError, match="res_blocks.0 has forward hooks"):
            fma_fast.solver.cpu.folded_final(model, x, 4, 0.1)
    finally:
        handle.remove()
    assert fma_fast.solve(x, model, 4, class_features=z).path.startswith("folded-fp32+")


def _patch_res_block(monkeypatch):
    from fma_fast.core.model import ResBlock

    forward = ResBlock.forward
    monkeypatch.setattr(ResBlock, "forward", lambda self, x, y: 2 * forward(self, x, y) - x)


def _patch_linear(monkeypatch):
    forward = torch.nn.Linear.forward
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, x: forward(self, x) + 0.05)


def _patch_silu(monkeypatch):
    monkeypatch.setattr(torch.nn.SiLU, "forward", lambda self, x: torch.nn.functional.gelu(x))


def _patch_module_call(monkeypatch):
    call = torch.nn.Module.__call__

    def scaled(self, *args, **kwargs):
        out = call(self, *args, **kwargs)
        return out * 1.5 if isinstance(self, torch.nn.LayerNorm) else out

    monkeypatch.setattr(torch.nn.Module, "__call__", scaled)


@pytest.mark.parametrize("patch", [_patch_res_block, _patch_linear, _patch_silu,
                                   _patch_module_call],
                         ids=["ResBlock.forward", "Linear.forward", "SiLU.forward",
                              "Module.__call__"])
def test_a_class_method_patched_after_import_stops_the_fold(model, data, monkeypatch, patch):
    """Review item 13: the fold reads the weights and runs the math of the classes' forward as
    shipped; a class whose forward (or Module's __call__) was replaced later computes something
    else, and the fold (with a plan cached before the patch) returned the unpatched answer."""
    x, z = data
    assert fma_fast.solve(x, model, 4, class_features=z).path.startswith("folded-fp32+")
    with torch.no_grad():
        before = reference.euler_solve(model, x, 4)
    with monkeypatch.context() as patched:
        patch(patched)
        with torch.no_grad():  # the patch matters: the plain loop now gives another answer
            assert not torch.allclose(reference.euler_solve(model, x, 4), before, atol=1e-3)
        _assert_runs_as_given(model, x, z)
        from fma_fast.solver.plan import fold_problem

        assert "was replaced after fma_fast was imported" in fold_problem(model)
    assert fma_fast.solve(x, model, 4, class_features=z).path.startswith("folded-fp32+")


def test_a_subclass_that_overrides_no_call_is_still_folded(data):
    net = _changed_net(_RenamedOnly, None)
    x, z = data
    with torch.no_grad():
        expected = reference.euler_solve(net, x, 4)
    result = fma_fast.solve(x, net, 4, class_features=z)
    assert result.path.startswith("folded-fp32+"), result.path
    torch.testing.assert_close(fma_fast.solve(x, net, 4), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- one tie rule everywhere


@pytest.mark.parametrize("class_tile", [8, policy.CLASS_TILE])  # across tiles; inside one
@pytest.mark.parametrize("backend", ["auto", "reference", "folded", "triton"])
def test_every_solve_path_gives_equal_cosines_to_the_lower_class(backend, class_tile,
                                                                 monkeypatch):
    """Exact ties (kernel_support.exact_ties) through solve, its step ensemble and the
    scoring ops alone: every path ranks equal scores by ascending class, as documented."""
    from kernel_support import exact_ties, tie_rule_topk

    if backend == "triton" and not interpreter_or_cuda():
        pytest.skip(SKIP_REASON)
    monkeypatch.setattr(policy, "CLASS_TILE", class_tile)
    x, z, levels = exact_ties(45, seed=7)
    net = fma_fast.VelocityNet(x.shape[1], blocks=1)  # untrained: exactly zero velocity
    for k in (1, 2, 3, 5, 16):
        expected = tie_rule_topk(levels, k)
        result = fma_fast.solve(x, net, 1, class_features=z, topk=k, backend=backend)
        assert torch.equal(result.topk_indices, expected), (
            f"{result.path} k={k}: {result.topk_indices.tolist()} != {expected.tolist()}")
        ensemble = fma_fast.solve(x, net, 1, class_features=z, topk=k, backend=backend,
                                  ensemble_steps=(0, 1), logit_scale=10.0)
        assert torch.equal(ensemble.topk_indices, expected), (
            f"ensemble {ensemble.path} k={k}: {ensemble.topk_indices.tolist()}")
        if backend in ("reference", "triton"):
            top = dispatch.cosine_topk(x, z, k, normalized=True, backend=backend)
            assert torch.equal(top.indices, expected), f"cosine_topk {top.path} k={k}"
        else:
            assert torch.equal(scoring.tiled_topk(x, z, k)[1], expected), f"tiled k={k}"


# ------------------------------------------------------- class tables partly unit-norm


def test_a_class_table_with_only_some_unit_rows_is_normalised_everywhere(model, data):
    """Guards the solver's shortcut for unit-norm tables (no copy when every row is unit):
    with rows 0, 4 and 9 scaled and the rest unit, every scoring user must see cosines, as
    with the table normalised by hand (and against the reference for the final state)."""
    x, z = data
    unit = torch.nn.functional.normalize(z, dim=-1)
    mixed = unit.clone()
    mixed[0], mixed[4], mixed[9] = 6.0 * unit[0], 0.1 * unit[4], 3.0 * unit[9]
    assert int(((mixed.norm(dim=1) - 1).abs() <= 1e-6).sum()) == 8  # most rows are unit
    with torch.no_grad():
        final = reference.euler_solve(model, x, 3)
    values, indices = reference.cosine_topk(final, unit, 3)
    result = fma_fast.solve(x, model, 3, class_features=mixed, topk=3, zero_shot=True)
    assert torch.equal(result.topk_indices, indices), (
        f"rows scaled in the table changed the ranking: {result.topk_indices[:3].tolist()} "
        f"!= {indices[:3].tolist()} (first 3 rows)")
    torch.testing.assert_close(result.topk_values, values, rtol=1e-5, atol=1e-6)
    assert torch.equal(result.zero_shot_pred, reference.cosine_topk(x, unit, 1)[1][:, 0])
    ensemble = [fma_fast.solve(x, model, 3, class_features=table, topk=2, ensemble_steps=(0, 3))
                for table in (mixed, unit)]
    assert torch.equal(ensemble[0].topk_indices, ensemble[1].topk_indices)
    torch.testing.assert_close(ensemble[0].topk_values, ensemble[1].topk_values)
    labels = torch.arange(x.shape[0]) % z.shape[0]
    selections = [fma_fast.select_steps(model, x, labels, table, max_steps=3)
                  for table in (mixed, unit)]
    assert selections[0].accuracy == selections[1].accuracy
    assert selections[0].cross_entropy == pytest.approx(selections[1].cross_entropy, rel=1e-5)


def test_solve_and_the_commands_keep_unit_rows_by_one_tolerance():
    """Review item 19: solve's class-table rule hard-coded 1e-6 beside io.features'
    UNIT_ROW_TOLERANCE; both read policy's one constant (a row off by less keeps its bits)."""
    from fma_fast.io import features as features_io
    from fma_fast.solver import api

    assert api.UNIT_ROW_TOLERANCE is policy.UNIT_ROW_TOLERANCE
    assert features_io.UNIT_ROW_TOLERANCE is policy.UNIT_ROW_TOLERANCE
    table = torch.nn.functional.normalize(torch.randn(5, 12, dtype=torch.float64), dim=-1)
    near = (table * (1 + policy.UNIT_ROW_TOLERANCE / 2)).float()
    assert api._unit_rows(near, torch.device("cpu")) is near
    assert features_io.unit_rows(near, "rows")[1] == 0
