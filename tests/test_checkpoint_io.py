"""fma_fast's own format: round trip, atomic writes, refusal of mismatched files."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from support import randomize_parameters

import fma_fast
from fma_fast.io import checkpoint, files


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


def disk_full_after(monkeypatch, tensors: int) -> None:
    """Make the safetensors writer fail with ENOSPC after ``tensors`` tensors were written."""
    written = {"count": 0}
    real = files._tensor_bytes

    def failing(tensor):
        written["count"] += 1
        if written["count"] > tensors:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensor)

    monkeypatch.setattr(files, "_tensor_bytes", failing)


def test_failed_write_keeps_previous_files(model, tmp_path, monkeypatch):
    target = tmp_path / "run"
    fma_fast.save(model, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    disk_full_after(monkeypatch, 3)
    with pytest.raises(OSError, match="No space left on device"):
        fma_fast.save(fma_fast.VelocityNet(24, blocks=3, width=40), target)
    after = {p.name: p.read_bytes() for p in target.iterdir()}
    assert after == before, "a failed save changed or left files behind"
    assert fma_fast.load(target).config == model.config


def test_weights_from_another_run_are_refused(model, tmp_path):
    fma_fast.save(model, tmp_path / "a")
    fma_fast.save(fma_fast.VelocityNet(24, blocks=2, width=40), tmp_path / "b")
    (tmp_path / "a" / "config.json").write_text((tmp_path / "b" / "config.json").read_text())
    with pytest.raises(fma_fast.CheckpointError, match="come from different saves"):
        fma_fast.load(tmp_path / "a")


def test_same_architecture_pairs_from_different_saves_are_refused(model, tmp_path):
    """Same architecture, other weights: the architecture check alone would pass this."""
    other = fma_fast.VelocityNet(24, blocks=3, width=40)
    fma_fast.save(model, tmp_path / "a", extra={"steps": 3})
    fma_fast.save(other, tmp_path / "b", extra={"steps": 3})
    (tmp_path / "a" / "model.safetensors").write_bytes(
        (tmp_path / "b" / "model.safetensors").read_bytes()
    )
    with pytest.raises(fma_fast.CheckpointError, match="come from different saves"):
        fma_fast.load(tmp_path / "a")


def test_a_save_killed_between_its_renames_is_refused_naming_the_newer_file(
    model, tmp_path, monkeypatch
):
    """The weights are renamed first; a kill before the config's rename leaves new weights
    beside the old config."""
    target = tmp_path / "run"
    fma_fast.save(model, target, extra={"steps": 2})
    os.utime(target / "config.json", (1e9, 1e9))  # the old save, long ago
    real_replace = os.replace

    def killed_before_the_config(source, destination):
        if Path(destination).name == "config.json":
            raise KeyboardInterrupt  # the process dies here
        real_replace(source, destination)

    monkeypatch.setattr(files.os, "replace", killed_before_the_config)
    retrained = fma_fast.VelocityNet(24, blocks=3, width=40)
    with pytest.raises(KeyboardInterrupt):
        fma_fast.save(retrained, target, extra={"steps": 5})
    monkeypatch.undo()
    with pytest.raises(
        fma_fast.CheckpointError, match=r"different saves .*; model.safetensors is newer"
    ):
        fma_fast.load(target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("key", checkpoint.RESERVED_KEYS)
def test_extra_may_not_set_what_save_writes(model, tmp_path, key):
    with pytest.raises(ValueError, match=f"extra may not set '{key}'"):
        fma_fast.save(model, tmp_path / "run", extra={key: 1})
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"steps": -1}, "steps must be an int >= 0"),
        ({"steps": "5"}, r"steps must be an int >= 0, got '5' \(str\)"),
        ({"step_size": 0}, "step_size must be a finite number > 0"),
        ({"class_names": "cat"}, "class_names must be a list of strings"),
    ],
)
def test_extra_values_that_load_would_refuse_are_refused(model, tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        fma_fast.save(model, tmp_path / "run", extra=extra)
    fma_fast.save(model, tmp_path / "ok")
    config = json.loads((tmp_path / "ok" / "config.json").read_text())
    (tmp_path / "ok" / "config.json").write_text(json.dumps({**config, **extra}))
    with pytest.raises(fma_fast.CheckpointError, match=message):
        fma_fast.load(tmp_path / "ok")


def test_extra_refuses_nan(model, tmp_path):
    with pytest.raises(TypeError, match="JSON-serialisable"):
        fma_fast.save(model, tmp_path / "run", extra={"val_accuracy": [float("nan")]})


def test_save_records_the_step_size(model, tmp_path):
    fma_fast.save(model, tmp_path / "default")
    assert fma_fast.load_config(tmp_path / "default")["step_size"] == 0.1
    fma_fast.save(model, tmp_path / "given", extra={"step_size": 0.05})
    assert fma_fast.load_config(tmp_path / "given")["step_size"] == 0.05


def test_what_a_model_carries_is_saved_and_loaded(model, tmp_path):
    """Guards a loaded network that forgets what its folder says (issue 22, 12): M, h,
    normalize and the training data's record, with the class table's values beside the
    weights (bit for bit), come back as attributes; ``extra`` wins over the attributes; a
    record without values (older saves) still loads."""
    from fma_fast.io.features import FeatureSet, data_record

    table = torch.nn.functional.normalize(torch.randn(5, 24), dim=-1)
    model.steps, model.step_size, model.normalize = 4, 0.125, False
    model.trained_on = data_record(FeatureSet(torch.randn(2, 24), None, table, list("abcde")))
    fma_fast.save(model, tmp_path / "run")
    loaded = fma_fast.load(tmp_path / "run")
    assert (loaded.steps, loaded.step_size, loaded.normalize) == (4, 0.125, False)
    assert loaded.trained_on["class_names"] == list("abcde")
    assert torch.equal(loaded.trained_on["class_table"], table)
    config = fma_fast.load_config(tmp_path / "run")
    assert "class_table" not in config["data"] and config["data"]["classes"] == 5
    fma_fast.save(loaded, tmp_path / "given", extra={"steps": 2})
    assert fma_fast.load(tmp_path / "given").steps == 2
    record = {k: v for k, v in model.trained_on.items() if k != "class_table"}
    fma_fast.save(fma_fast.VelocityNet(24, blocks=3, width=40), tmp_path / "old",
                  extra={"data": record})
    assert "class_table" not in fma_fast.load(tmp_path / "old").trained_on
    with pytest.raises(ValueError, match="normalize must be true or false"):
        fma_fast.save(model, tmp_path / "bad", extra={"normalize": "yes"})


def test_identical_saves_write_identical_bytes(tmp_path):
    """Run in fresh processes: safetensors' own writer orders metadata keys at random per
    process, so two saves in one process could agree by chance (three processes catch two
    keys in random order three times in four)."""
    script = (
        "import sys, torch, fma_fast\n"
        "torch.manual_seed(0)\n"
        "net = fma_fast.VelocityNet(8, blocks=1)\n"
        "fma_fast.save(net, sys.argv[1], extra={'steps': 3, 'note': 'x'})\n"
    )
    folders = [tmp_path / f"run{i}" for i in range(3)]
    for folder in folders:
        subprocess.run([sys.executable, "-c", script, str(folder)], check=True)
    for name in ("model.safetensors", "config.json"):
        contents = {(folder / name).read_bytes() for folder in folders}
        assert len(contents) == 1, f"{name} differs between identical runs"


def test_non_finite_weights_are_refused_on_load(model, tmp_path):
    fma_fast.save(model, tmp_path / "run")
    weights = tmp_path / "run" / "model.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata()
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    state["final_layer.linear.bias"][1] = float("inf")
    files.save_safetensors(weights, state, metadata)
    with pytest.raises(fma_fast.CheckpointError, match="final_layer.linear.bias contains NaN"):
        fma_fast.load(tmp_path / "run")


def test_orphaned_temporary_files_are_removed_by_the_next_write(model, tmp_path):
    """A save killed with SIGKILL leaves its temporary file; the next save removes it, and
    leaves alone the temporary file of a writer that still runs."""
    target = tmp_path / "run"
    script = (
        "import os, sys, torch, fma_fast\n"
        "from fma_fast.io import files\n"
        "def killed(tensor):\n"
        "    os.kill(os.getpid(), 9)\n"
        "files._tensor_bytes = killed\n"
        "fma_fast.save(fma_fast.VelocityNet(8, blocks=1), sys.argv[1])\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(target)])
    assert done.returncode == -9
    orphans = [p.name for p in target.iterdir() if p.name.endswith(".tmp")]
    assert len(orphans) == 1, f"expected one orphaned temporary file, found {orphans}"
    alive = target / f".config.json.{files._HOST}.{os.getpid()}.0123abcd.tmp"
    alive.write_text("a writer that still runs")
    fma_fast.save(model, target)
    left = sorted(p.name for p in target.iterdir())
    assert left == sorted(["config.json", "model.safetensors", alive.name]), left


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.uint8])
def test_our_safetensors_writer_round_trips(tmp_path, dtype):
    tensors = {
        "b": (torch.arange(12).reshape(3, 4) * 3).to(dtype),
        "a": torch.ones(5, dtype=torch.uint8),
        "empty": torch.zeros(0, 7, dtype=dtype),
        "scalar": torch.tensor(2.5),
        "strided": torch.arange(20.0).reshape(4, 5).T,
    }
    files.save_safetensors(tmp_path / "t.safetensors", tensors, {"k": "v", "a": "b"})
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(str(tmp_path / "t.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"k": "v", "a": "b"}


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


def test_a_model_folder_whose_chosen_m_is_zero_is_saved_loaded_and_used(tmp_path, capsys):
    """M = 0 (the zero-shot rows win on val) is a legitimate choice, not a missing one: train
    with --max-steps 0 records steps 0, and eval, score and a re-save read it back as 0
    (where a falsy check would say "no M chosen" or fall back to another M)."""
    from fma_fast.cli import main

    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["synth", "--out", str(data), "--classes", "4", "--dim", "16", "--shots", "2"]
                ) == 0
    assert main(["train", str(data / "train.safetensors"), "--val", str(data / "val.safetensors"),
                 "--out", str(run), "--blocks", "1", "--epochs", "2", "--max-steps", "0",
                 "--quiet"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["steps"] == 0 and not isinstance(config["steps"], bool), config.get("steps")
    assert checkpoint.load_config(run)["steps"] == 0
    capsys.readouterr()
    assert main(["eval", str(data / "test.safetensors"), "--model", str(run)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 0 and summary["accuracy"] == summary["accuracy_at_m0"], summary

    summary = fma_fast.score(run, [data / "test.safetensors"], data / "test.safetensors",
                             tmp_path / "scored", progress=False)
    assert summary.accuracy == summary.accuracy_at_m0
    job = json.loads((tmp_path / "scored" / "job.json").read_text())
    assert job["settings"]["steps"] == 0, job

    model = fma_fast.load(run)
    again = tmp_path / "again"
    fma_fast.save(model, again, extra={"steps": 0})
    assert checkpoint.load_config(again)["steps"] == 0


HOSTILE_JSON = {
    "escaped quotes": '"\\' * 500_000,
    "open strings in a list": '["\\' * 350_000,
    "unterminated after brackets": "[" * 10 + '"' + "\\\"[" * 300_000,
}


def test_hostile_json_is_refused_at_once():
    """Guards a quadratic depth pre-scan: about 1 MB of '"\\' (strings that never end) ran
    for more than a minute before the parser saw it. Each document is refused as invalid JSON
    (the subprocess's timeout bounds the run; no timing is asserted)."""
    script = (
        "import json, sys\n"
        "from fma_fast.io.files import JsonError, loads_json\n"
        "for name, text in json.loads(sys.stdin.read()).items():\n"
        "    try:\n"
        "        loads_json(text, name)\n"
        "    except JsonError as error:\n"
        "        print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], input=json.dumps(HOSTILE_JSON),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert len(lines) == len(HOSTILE_JSON), lines
    for name, line in zip(HOSTILE_JSON, lines):
        assert line.startswith((f"{name} is not valid JSON", f"{name} nests JSON")), line


def test_json_depth_counts_brackets_outside_strings_only():
    """The depth limit counts the document's nesting, not brackets inside strings (escaped
    quotes and backslashes included), and still refuses deep documents by their depth."""
    inside = json.dumps(["[[[[" * 40, '"[{' * 40, "\\" * 7, {"a": ["\\\"" * 9, "]]]"]}])
    assert files.loads_json(inside, "doc") == json.loads(inside)
    depth = files.JSON_MAX_DEPTH + 1
    with pytest.raises(files.JsonError, match=f"doc nests JSON {depth + 1} levels deep"):
        files.loads_json('{"x": "]]]", "y": ' + "[" * depth + "]" * depth + "}", "doc")
    assert files.loads_json("[" * files.JSON_MAX_DEPTH + "]" * files.JSON_MAX_DEPTH, "doc")
