"""Bad input gets a clear ValueError/TypeError naming the argument."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import fma_fast


@pytest.fixture
def setup():
    generator = torch.Generator().manual_seed(0)
    model = fma_fast.VelocityNet(8, blocks=1)
    x = torch.randn(6, 8, generator=generator)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    z = torch.randn(3, 8, generator=generator)
    return model, x, labels, z


def fit(x, labels, z):
    return fma_fast.fit(x, labels, z, blocks=1, epochs=1, progress=False)


def test_feature_dim_must_match_model(setup):
    model, x, labels, z = setup
    with pytest.raises(ValueError, match="features has dim 5 but the model expects 8"):
        fma_fast.solve(x[:, :5], model, 1)
    with pytest.raises(ValueError, match="image_features have dim 8 but model expects 4"):
        fma_fast.fit(x, labels, z, model=fma_fast.VelocityNet(4, 1), epochs=1, progress=False)


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (torch.tensor([0, 1, 2, 0, 1, 3]), ValueError, r"labels must lie in \[0, 3\)"),
        (torch.tensor([0, 1, 2, 0, 1, -1]), ValueError, r"labels must lie in \[0, 3\)"),
        (torch.tensor([0.0, 1, 2, 0, 1, 2]), TypeError, "labels must be an integer tensor"),
        (torch.tensor([0, 1, 2]), ValueError, "labels has 3 entries but the features have 6"),
    ],
)
def test_labels_are_checked(setup, bad, error, message):
    model, x, _, z = setup
    with pytest.raises(error, match=message):
        fit(x, bad, z)
    with pytest.raises(error, match=message):
        fma_fast.select_steps(model, x, bad, z, max_steps=1)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_features_are_refused(setup, value):
    model, x, labels, z = setup
    x = x.clone()
    x[4, 2] = value
    with pytest.raises(ValueError, match=r"features contains NaN or Inf \(first at row 4\)"):
        fma_fast.solve(x, model, 1)
    with pytest.raises(ValueError, match="image_features contains NaN or Inf"):
        fit(x, labels, z)
    z = z.clone()
    z[0, 0] = value
    with pytest.raises(ValueError, match="class_features contains NaN or Inf"):
        fma_fast.solve(setup[1], model, 1, class_features=z)


def test_empty_inputs_are_refused(setup):
    model, x, labels, z = setup
    with pytest.raises(ValueError, match="features is empty"):
        fma_fast.solve(x[:0], model, 1)
    with pytest.raises(ValueError, match="image_features is empty"):
        fit(x[:0], labels[:0], z)
    with pytest.raises(ValueError, match="class_features is empty"):
        fma_fast.solve(x, model, 1, class_features=z[:0])


def test_class_features_of_wrong_dim(setup):
    model, x, labels, z = setup
    with pytest.raises(ValueError, match="class_features has dim 7 but features expects 8"):
        fma_fast.solve(x, model, 1, class_features=z[:, :7])
    with pytest.raises(ValueError, match="class_features has dim 7 but image_features expects 8"):
        fit(x, labels, z[:, :7])


def test_features_must_be_2d_floating(setup):
    model, x, labels, z = setup
    with pytest.raises(ValueError, match=r"features must be 2-D \(rows, dim\), got shape \(48,\)"):
        fma_fast.solve(x.flatten(), model, 1)
    with pytest.raises(TypeError, match="features must be a floating-point tensor"):
        fma_fast.solve(x.long(), model, 1)
    with pytest.raises(TypeError, match="features must be a torch.Tensor or numpy.ndarray"):
        fma_fast.solve(x.tolist(), model, 1)
    for narrow in (torch.float8_e4m3fn, torch.float8_e5m2):  # torch.isfinite: not implemented
        with pytest.raises(TypeError, match=f"features has dtype {narrow}; expected float16, "
                                            "bfloat16, float32 or float64"):
            fma_fast.solve(x.to(narrow), model, 1)
        with pytest.raises(TypeError, match=f"class_features has dtype {narrow}"):
            fma_fast.solve(x, model, 1, class_features=z.to(narrow))


def test_steps_and_options(setup):
    model, x, labels, z = setup
    with pytest.raises(ValueError, match="steps must be >= 0, got -1"):
        fma_fast.solve(x, model, -1)
    with pytest.raises(TypeError, match="steps must be an int"):
        fma_fast.solve(x, model, 1.5)
    with pytest.raises(ValueError, match="topk must be <= the number of classes 3"):
        fma_fast.solve(x, model, 1, class_features=z, topk=4)
    with pytest.raises(ValueError, match="step_size must be a finite number > 0"):
        fma_fast.solve(x, model, 1, step_size=0.0)
    with pytest.raises(ValueError, match="noise must be one of"):
        fma_fast.fit(x, labels, z, noise="gaussian", epochs=1, progress=False)
    with pytest.warns(UserWarning, match="steps \\* step_size = 1.2 > 1"):
        fma_fast.solve(x, model, 12)


def test_autocast_has_one_vocabulary_and_off_is_read_as_fp32(setup):
    """fit and the CLIP encoder name no autocast "fp32"; fit's earlier "off" still runs (the
    same fit) and is recorded as "fp32", so one choice has one name in every saved config."""
    model, x, labels, z = setup
    fitted = {amp: fma_fast.fit(x, labels, z, blocks=1, epochs=1, amp=amp, progress=False)
              for amp in ("fp32", "off")}
    assert fitted["fp32"].config["amp"] == fitted["off"].config["amp"] == "fp32"
    assert fitted["fp32"].history == fitted["off"].history
    with pytest.raises(ValueError, match=r"amp must be one of \('auto', 'fp32', 'fp16', "
                                         r"'bf16'\), got 'none'"):
        fma_fast.fit(x, labels, z, epochs=1, amp="none", progress=False)
    from fma_fast.cli import build_parser

    args = build_parser().parse_args(["train", "f.safetensors", "--amp", "off"])
    assert args.amp == "fp32"


def test_tensors_on_different_devices(setup):
    model, x, labels, z = setup
    z_meta = z.to("meta")
    with pytest.raises(ValueError, match="same device: features on cpu, class_features on meta"):
        fma_fast.solve(x, model, 1, class_features=z_meta)
    with pytest.raises(ValueError, match="same device"):
        fit(x, labels.to("meta"), z)


def test_numpy_inputs_are_accepted(setup):
    model, x, labels, z = setup
    result = fma_fast.solve(x.numpy(), model, 2, class_features=np.asarray(z), topk=2)
    assert result.topk_indices.shape == (6, 2)


@pytest.mark.parametrize(
    "device, message",
    [
        ("nonexistent", "device must be a torch device such as 'cpu'"),
        ("cuda:99", "cuda:99"),
        (3.5, "device must be a str or torch.device"),
    ],
)
def test_bad_devices_are_named(setup, device, message):
    model, x, labels, z = setup
    error = TypeError if isinstance(device, float) else ValueError
    with pytest.raises(error, match=message):
        fma_fast.solve(x, model, 1, device=device)
    with pytest.raises(error, match=message):
        fma_fast.select_steps(model, x, labels, z, max_steps=1, device=device)
    with pytest.raises(error, match=message):
        fma_fast.fit(x, labels, z, blocks=1, epochs=1, device=device, progress=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_named(setup):
    model, x, labels, z = setup
    with pytest.raises(ValueError, match="'cuda': no CUDA GPU is available here"):
        fma_fast.solve(x, model, 1, device="cuda")
    with pytest.raises(ValueError, match="'cuda': no CUDA GPU is available here"):
        fma_fast.fit(x, labels, z, blocks=1, epochs=1, device="cuda", progress=False)


def test_select_steps_needs_a_class_table(setup):
    model, x, labels, _ = setup
    with pytest.raises(TypeError, match=r"class_features must be a \(C, D\) class table"):
        fma_fast.select_steps(model, x, labels, None)
    with pytest.raises(TypeError, match=r"class_features must be a \(C, D\) class table"):
        fma_fast.accuracy_by_steps(model, x, labels, None)


def test_max_steps_is_named_as_max_steps(setup):
    model, x, labels, z = setup
    with pytest.raises(ValueError, match="max_steps must be >= 0, got -1"):
        fma_fast.select_steps(model, x, labels, z, max_steps=-1)
    with pytest.raises(TypeError, match="max_steps must be an int"):
        fma_fast.accuracy_by_steps(model, x, labels, z, max_steps="3")


def test_ensemble_steps_must_be_a_sequence(setup):
    model, x, _, z = setup
    with pytest.raises(TypeError, match="ensemble_steps must be a sequence of step counts"):
        fma_fast.solve(x, model, 4, class_features=z, ensemble_steps=4)
    with pytest.raises(TypeError, match="ensemble_steps must be an int"):
        fma_fast.solve(x, model, 4, class_features=z, ensemble_steps=[0, 2.5])


@pytest.mark.parametrize("option", [{"topk": 2}, {"ensemble_steps": (0, 1)}])
def test_scoring_options_without_a_class_table_are_errors(setup, option):
    model, x, _, _ = setup
    name = next(iter(option))
    with pytest.raises(ValueError, match=f"{name} needs class_features"):
        fma_fast.solve(x, model, 1, **option)


@pytest.mark.parametrize(
    "option, error, message",
    [
        ({"seed": "1"}, TypeError, "seed must be an int, got str"),
        ({"seed": 1.5}, TypeError, "seed must be an int, got float"),
        ({"seed": -1}, ValueError, "seed must be >= 0"),
        ({"time_eps": "0.01"}, TypeError, "time_eps must be a number, got str"),
        ({"time_eps": 0.5}, ValueError, r"time_eps must lie in \(0, 0.5\)"),
    ],
)
def test_fit_seed_and_time_eps_are_checked(setup, option, error, message):
    _, x, labels, z = setup
    with pytest.raises(error, match=message):
        fma_fast.fit(x, labels, z, blocks=1, epochs=1, progress=False, **option)


def test_long_solve_warning_points_at_the_callers_line(setup):
    """Both warnings a call can give (the long solve, and these random rows that are not
    unit-norm) point at the caller's line, from every public function."""
    model, x, labels, z = setup
    for call in (
        lambda: fma_fast.solve(x, model, 12),
        lambda: fma_fast.solve(x, model, 12, class_features=z),
        lambda: fma_fast.select_steps(model, x, labels, z, max_steps=11),
        lambda: fma_fast.accuracy_by_steps(model, x, labels, z, max_steps=11),
    ):
        with pytest.warns(UserWarning, match=r"> 1: the solve runs past t=1") as caught:
            call()
        kinds = sorted(type(w.message).__name__ for w in caught)
        assert kinds == ["NotUnitNormWarning", "UserWarning"], kinds
        assert [w.filename for w in caught] == [__file__] * 2, [
            (w.filename, w.lineno) for w in caught]


def test_read_only_memmaps_are_accepted_without_a_warning(setup, tmp_path):
    model, x, labels, z = setup
    x = torch.nn.functional.normalize(x, dim=-1)  # unit rows: no NotUnitNormWarning either
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "z.npy", z.numpy())
    features = np.load(tmp_path / "x.npy", mmap_mode="r")
    table = np.load(tmp_path / "z.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = fma_fast.solve(features, model, 2, class_features=table)
        fma_fast.select_steps(model, features, labels.numpy(), table, max_steps=2)
    assert torch.equal(result.pred, fma_fast.solve(x, model, 2, class_features=z).pred)


# ------------------------------------------------- class tables across machines (issue 21, 3)


def _recomputed_tables() -> dict[str, torch.Tensor]:
    """One table, text features times a projection, computed as three machines would: in
    float64 rounded once, and in fp32 summed over K=64 in one order and in the reverse order
    (element-wise IEEE products and sums: the same bits on every CPU)."""
    generator = torch.Generator().manual_seed(3)
    text = torch.nn.functional.normalize(
        torch.randn(40, 64, generator=generator, dtype=torch.float64), dim=-1)
    projection = torch.randn(64, 32, generator=generator, dtype=torch.float64) / 8
    text32, projection32 = text.float(), projection.float()
    forward, backward = torch.zeros(40, 32), torch.zeros(40, 32)
    for k in range(64):
        forward = forward + text32[:, k:k + 1] * projection32[k]
        backward = backward + text32[:, 63 - k:64 - k] * projection32[63 - k]
    return {"float64": (text @ projection).float(), "forward": forward, "backward": backward}


def _ulps(first: torch.Tensor, second: torch.Tensor) -> int:
    """Largest distance in units of the last place between two fp32 tables."""
    def ordered(t):
        bits = t.view(torch.int32).long()
        return torch.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
    return int((ordered(first) - ordered(second)).abs().max())


def test_a_class_table_recomputed_within_fp32_rounding_is_the_same_table():
    """Guards refusing the same table computed on another machine (MKL's result depends on
    memory alignment on some CPUs): 1-ulp differences in half the elements, and the table
    recomputed in other summation orders (a few ulps, computed here, never zero) pass, through
    the record check every command uses."""
    from fma_fast.io.features import check_same_origin, class_table_difference

    tables = _recomputed_tables()
    base = tables["float64"]
    up = torch.nextafter(base, torch.full_like(base, torch.inf))
    one_ulp = torch.where(torch.rand(base.shape, generator=torch.Generator().manual_seed(4))
                          < 0.5, up, base)
    assert _ulps(base, one_ulp) == 1
    for name in ("forward", "backward"):  # really recomputed: a few ulps of the row's norm
        moved = (tables[name].double() - base.double()).norm(dim=1) / base.double().norm(dim=1)
        assert 0 < float(moved.max()) <= 8 * 2**-23, name
    for other in (one_ulp, tables["forward"], tables["backward"]):
        assert class_table_difference(base, other) is None
        check_same_origin({"train": _record(base), "test": _record(other)})


def _record(table: torch.Tensor, names: list[str] | None = None) -> dict:
    from fma_fast.io.features import FeatureSet, data_record

    return data_record(FeatureSet(table[:1], None, table, names or [f"c{i}" for i in
                                                                    range(table.shape[0])]))


def _perturbed(table: torch.Tensor, row: int, fraction: float) -> torch.Tensor:
    """``table`` with ``row`` moved by ``fraction`` of its norm (in L2), in a random direction."""
    direction = torch.randn(table.shape[1], generator=torch.Generator().manual_seed(5))
    moved = table.clone()
    moved[row] += fraction * float(table[row].norm()) * direction / direction.norm()
    return moved


def test_another_class_table_is_refused():
    """Guards a tolerance that lets a different table through: another class, swapped rows,
    a row moved by twice the tolerance (half of it passes: the bound is the stated one) and
    other names are refused, each naming what differs."""
    from fma_fast.core.policy import CLASS_TABLE_TOLERANCE
    from fma_fast.io.features import FeatureFileError, check_same_origin

    base = _recomputed_tables()["float64"]
    other_class = base.clone()
    other_class[7] = torch.randn(32, generator=torch.Generator().manual_seed(6))
    swapped = base[[0, 2, 1, *range(3, 40)]]
    cases = {
        "another class": (other_class, None, "class 7 differs by"),
        "swapped rows": (swapped, None, "class 1 differs by"),
        "perturbed": (_perturbed(base, 11, 2 * CLASS_TABLE_TOLERANCE), None,
                      "class 11 differs by 2e-05 of its norm"),
        "other names": (base, [f"c{i}" for i in range(39)] + ["cat"], "class 39: 'c39' vs "),
        "fewer classes": (base[:39], None, "40 vs 39 classes"),
    }
    for table, names, message in cases.values():
        with pytest.raises(FeatureFileError, match=message):
            check_same_origin({"train": _record(base), "test": _record(table, names)})
    check_same_origin({"train": _record(base),
                       "test": _record(_perturbed(base, 11, CLASS_TABLE_TOLERANCE / 2))})
