"""fma_fast's own format: round trip, atomic writes, refusal of mismatched files."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_parameters

import fma_fast
from fma_fast import checkpoint


@pytest.fixture
def model() -> fma_fast.VelocityNet:
    net = fma_fast.VelocityNet(24, blocks=3, width=40)
    randomize_parameters(net)
    return net


def test_round_trip_keeps_weights_and_config(model, tmp_path):
    fma_fast.save(model, tmp_path / "run", extra={"steps": 4})
    loaded = fma_fast.load(tmp_path / "run")
    assert loaded.config == model.config
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    assert fma_fast.load_config(tmp_path / "run")["steps"] == 4


def test_failed_write_keeps_previous_files(model, tmp_path, monkeypatch):
    target = tmp_path / "run"
    fma_fast.save(model, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        fma_fast.save(fma_fast.VelocityNet(24, blocks=3, width=40), target)
    after = {p.name: p.read_bytes() for p in target.iterdir()}
    assert after == before, "a failed save changed or left files behind"


def test_weights_from_another_run_are_refused(model, tmp_path):
    fma_fast.save(model, tmp_path / "a")
    fma_fast.save(fma_fast.VelocityNet(24, blocks=2, width=40), tmp_path / "b")
    (tmp_path / "a" / "config.json").write_text((tmp_path / "b" / "config.json").read_text())
    with pytest.raises(fma_fast.CheckpointError, match="was saved for"):
        fma_fast.load(tmp_path / "a")


def test_corrupt_or_missing_files_are_refused(model, tmp_path):
    fma_fast.save(model, tmp_path / "run")
    weights = tmp_path / "run" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(fma_fast.CheckpointError, match="not a readable safetensors"):
        fma_fast.load(tmp_path / "run")
    with pytest.raises(fma_fast.CheckpointError, match="missing"):
        fma_fast.load(tmp_path / "nothing-here")
    (tmp_path / "run" / "config.json").write_text("{not json")
    with pytest.raises(fma_fast.CheckpointError, match="not valid JSON"):
        fma_fast.load(tmp_path / "run")


def test_save_refuses_non_models_and_file_paths(model, tmp_path):
    with pytest.raises(TypeError, match="VelocityNet"):
        fma_fast.save(torch.nn.Linear(2, 2), tmp_path / "x")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="must be a folder"):
        fma_fast.save(model, tmp_path / "file")
    with pytest.raises(TypeError, match="JSON-serialisable"):
        fma_fast.save(model, tmp_path / "y", extra={"bad": object()})
    assert not (tmp_path / "y" / "config.json").exists()


def test_fit_result_saves_training_settings(tmp_path):
    x = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    result = fma_fast.fit(
        x, torch.tensor([0, 1, 2, 0, 1, 2]), torch.randn(3, 8), blocks=1, epochs=1, progress=False
    )
    fma_fast.save(result, tmp_path / "run")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["training"]["epochs"] == 1 and config["blocks"] == 1


def test_saved_files_get_the_usual_permissions(model, tmp_path):
    import os
    import stat

    fma_fast.save(model, tmp_path / "run")
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json"):
        mode = stat.S_IMODE((tmp_path / "run" / name).stat().st_mode)
        assert mode == 0o666 & ~umask, f"{name} has mode {oct(mode)}"
