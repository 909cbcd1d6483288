"""Compatibility with the released code: its checkpoint format and its golden outputs."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from support import quantized, relative_error

import fma_fast
from fma_fast import reference
from fma_fast.core.policy import TOLERANCES

RELATIVE_TOLERANCE = TOLERANCES[torch.float32].chain  # fp32 rounding


def test_network_output_matches_golden(official_fixture, golden):
    model = fma_fast.load_official(official_fixture)
    assert (model.dim, model.blocks) == (golden["dim"], golden["blocks"])
    with torch.no_grad():
        v = model(golden["x"], golden["t"])
    assert relative_error(v, golden["v"]) < RELATIVE_TOLERANCE


@pytest.mark.parametrize("steps", [5, 10])
def test_features_after_steps_match_golden(official_fixture, golden, steps):
    model = fma_fast.load_official(official_fixture / "model.pth")  # model.pth alone
    moved = fma_fast.solve(golden["x"], model, steps, step_size=golden["step_size"])
    expected = golden[f"features_after_{steps}_steps"]
    assert relative_error(moved, expected) < RELATIVE_TOLERANCE
    # The field really moves the features: a broken solver returning x would fail above.
    assert relative_error(golden["x"], expected) > 0.1


def test_predictions_for_every_m_match_golden(official_fixture, golden):
    model = fma_fast.load_official(official_fixture)
    expected = golden["preds_by_steps"]
    for steps in range(expected.shape[0]):
        result = fma_fast.solve(
            golden["x"],
            model,
            steps,
            step_size=golden["step_size"],
            class_features=golden["class_features"],
        )
        mismatched = (result.pred != expected[steps]).nonzero().flatten().tolist()
        assert not mismatched, f"M={steps}: rows {mismatched} differ from the released code"


def test_training_pair_matches_golden(golden):
    x_t, target = reference.training_pair(
        golden["train_x0"],
        golden["train_z"],
        golden["train_t"],
        golden["train_noise"],
        gamma=golden["train_gamma"],
        form="bridge",
    )
    assert relative_error(x_t, golden["train_xt"]) < RELATIVE_TOLERANCE
    assert relative_error(target, golden["train_v_target"]) < RELATIVE_TOLERANCE


def test_truncated_checkpoint_is_refused_clearly(official_fixture, tmp_path):
    data = (official_fixture / "model.pth").read_bytes()
    (tmp_path / "model.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(fma_fast.CheckpointError, match="truncated or corrupt"):
        fma_fast.load_official(tmp_path)


def test_config_block_count_must_match_keys(official_fixture, tmp_path):
    shutil.copy(official_fixture / "model.pth", tmp_path / "model.pth")
    (tmp_path / "config.json").write_text(json.dumps({"blocks": 12}))
    with pytest.raises(fma_fast.CheckpointError, match="blocks=12 but .* holds 2"):
        fma_fast.load_official(tmp_path)


def test_missing_and_mismatched_keys_are_named(tmp_path):
    state = fma_fast.VelocityNet(16, blocks=1).state_dict()
    del state["res_blocks.0.mlp.2.bias"]
    torch.save(state, tmp_path / "model.pth")
    with pytest.raises(fma_fast.CheckpointError, match=r"missing \['res_blocks.0.mlp.2.bias'\]"):
        fma_fast.load_official(tmp_path / "model.pth")

    state = fma_fast.VelocityNet(16, blocks=1).state_dict()
    state["res_blocks.0.in_ln.weight"] = torch.ones(15)
    torch.save(state, tmp_path / "model.pth")
    with pytest.raises(fma_fast.CheckpointError, match="in_ln.weight has shape"):
        fma_fast.load_official(tmp_path / "model.pth")


def test_not_a_state_dict_and_missing_file(tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "model.pth")
    with pytest.raises(fma_fast.CheckpointError, match="state_dict of tensors"):
        fma_fast.load_official(tmp_path / "model.pth")
    with pytest.raises(fma_fast.CheckpointError, match="cannot read checkpoint .*: no such file"):
        fma_fast.load_official(tmp_path / "absent")


@pytest.mark.parametrize(
    "saved, message",
    [
        ("a string", r"holds 'a string' \(str\), not a state_dict"),
        ({"input_proj.weight": "oops"}, r"entry 'input_proj.weight' holds 'oops' \(str\)"),
        ({"input_proj.weight": 3}, r"entry 'input_proj.weight' holds 3 \(int\)"),
    ],
)
def test_messages_show_the_type_of_a_wrong_value(tmp_path, saved, message):
    torch.save(saved, tmp_path / "model.pth")
    with pytest.raises(fma_fast.CheckpointError, match=message):
        fma_fast.load_official(tmp_path / "model.pth")


def test_a_string_block_count_in_config_is_named_with_its_type(tmp_path):
    torch.save(fma_fast.VelocityNet(8, blocks=2).state_dict(), tmp_path / "model.pth")
    (tmp_path / "config.json").write_text('{"blocks": "2"}')
    message = r"blocks must be an integer, got '2' \(str\)"
    with pytest.raises(fma_fast.CheckpointError, match=message):
        fma_fast.load_official(tmp_path)


def test_non_finite_released_weights_are_refused(tmp_path):
    state = fma_fast.VelocityNet(8, blocks=2).state_dict()
    state["res_blocks.1.mlp.0.weight"][2, 3] = float("nan")
    torch.save(state, tmp_path / "model.pth")
    with pytest.raises(fma_fast.CheckpointError, match=r"res_blocks.1.mlp.0.weight contains NaN"):
        fma_fast.load_official(tmp_path / "model.pth")


def test_data_parallel_prefix_is_accepted(tmp_path):
    model = fma_fast.VelocityNet(8, blocks=2)
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "model.pth")
    assert fma_fast.load_official(tmp_path / "model.pth").blocks == 2


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch on loading sparse tensors
@pytest.mark.parametrize(
    "key, make, message",
    [
        ("input_proj.weight", lambda t: torch.empty(t.shape, device="meta"),
         "input_proj.weight is a meta tensor: it has a shape but holds no data"),
        ("input_proj.bias", lambda t: t.to_sparse(),
         "input_proj.bias has layout sparse_coo; expected a dense tensor"),
        ("final_layer.linear.weight", lambda t: t.to_sparse_csr(),
         "final_layer.linear.weight has layout sparse_csr"),
        ("res_blocks.0.mlp.0.weight", quantized,
         r"res_blocks.0.mlp.0.weight is a quantized tensor \(torch.qint8\)"),
        ("res_blocks.1.mlp.2.bias", lambda t: t.to(torch.complex64),
         "res_blocks.1.mlp.2.bias has complex dtype torch.complex64"),
        ("input_proj.weight", lambda t: torch.zeros(0, t.shape[1]),
         r"input_proj.weight is empty \(shape \[0, 8\]\)"),
        ("res_blocks.0.mlp.2.weight", lambda t: t.to(torch.float8_e5m2),
         "res_blocks.0.mlp.2.weight has dtype torch.float8_e5m2; expected float16, bfloat16, "
         "float32 or float64"),
    ],
    ids=["meta", "sparse", "csr", "quantized", "complex", "width-0", "float8"],
)
def test_tensors_without_dense_floating_data_are_refused(tmp_path, key, make, message):
    """Meta, sparse and float8 tensors used to raise RuntimeError/NotImplementedError inside
    the loader (and an empty weight a ValueError of VelocityNet's not naming the file): each is
    a CheckpointError naming the file and the tensor."""
    state = fma_fast.VelocityNet(8, blocks=2).state_dict()
    state[key] = make(state[key])
    torch.save(state, tmp_path / "model.pth")
    with pytest.raises(fma_fast.CheckpointError, match=message) as caught:
        fma_fast.load_official(tmp_path / "model.pth")
    assert str(tmp_path / "model.pth") in str(caught.value)


def test_a_key_with_and_without_the_module_prefix_is_refused(tmp_path):
    """{'x': A, 'module.x': B} used to keep B silently."""
    state = fma_fast.VelocityNet(8, blocks=1).state_dict()
    state["module.input_proj.bias"] = torch.ones(8)
    torch.save(state, tmp_path / "model.pth")
    message = "holds both 'input_proj.bias' and 'module.input_proj.bias'; keep one"
    with pytest.raises(fma_fast.CheckpointError, match=message):
        fma_fast.load_official(tmp_path / "model.pth")
