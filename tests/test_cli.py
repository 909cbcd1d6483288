"""The fma-fast command: demo, synth -> train -> eval, and one-line errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fma_fast.cli import main
from fma_fast.solver import routing

TINY = [
    "--classes",
    "4",
    "--dim",
    "16",
    "--shots",
    "2",
    "--blocks",
    "1",
    "--epochs",
    "2",
    "--max-steps",
    "3",
    "--quiet",
]


def test_demo_prints_the_accuracy_table(capsys):
    assert main(["demo", *TINY]) == 0
    out = capsys.readouterr().out
    assert "val acc  test acc" in out and "<- chosen on val" in out
    assert "test accuracy: M=0 (zero-shot)" in out


def test_synth_train_eval_round_trip(tmp_path, capsys):
    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--classes", "4", "--dim", "16", "--shots", "2"]) == 0
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                str(data / "train.safetensors"),
                "--val",
                str(data / "val.safetensors"),
                "--out",
                str(run),
                "--blocks",
                "1",
                "--epochs",
                "2",
                "--max-steps",
                "3",
                "--quiet",
            ]
        )
        == 0
    )
    config = json.loads((run / "config.json").read_text())
    assert 0 <= config["steps"] <= 3 and len(config["data"]["class_names"]) == 4
    capsys.readouterr()
    predictions = tmp_path / "pred.json"
    assert (
        main(
            [
                "eval",
                str(data / "test.safetensors"),
                "--model",
                str(run),
                "--topk",
                "2",
                "--out",
                str(predictions),
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == config["steps"] and 0 <= summary["accuracy"] <= 1
    written = json.loads(predictions.read_text())
    assert len(written["pred"]) == summary["rows"] and len(written["topk_indices"][0]) == 2
    assert summary["path"].startswith("folded-fp32"), summary["path"]
    for precision, backend, path in (("bf16", "auto", "folded-bf16"),
                                     ("fp32", "reference", "reference")):
        command = ["eval", str(data / "test.safetensors"), "--model", str(run),
                   "--precision", precision, "--backend", backend]
        if precision == "bf16" and not routing.cpu_bf16_units():  # refused, one line
            assert main(command) == 2
            assert "needs a CPU with BF16 units" in capsys.readouterr().err
            continue
        assert main(command) == 0
        assert json.loads(capsys.readouterr().out)["path"].startswith(path), (precision, backend)


def test_train_without_val_needs_steps_at_eval(tmp_path, capsys):
    data = tmp_path / "data"
    main(["synth", "--out", str(data), "--classes", "3", "--dim", "8", "--shots", "1"])
    main(
        [
            "train",
            str(data / "train.safetensors"),
            "--out",
            str(tmp_path / "run"),
            "--blocks",
            "1",
            "--epochs",
            "1",
            "--quiet",
        ]
    )
    capsys.readouterr()
    assert main(["eval", str(data / "test.safetensors"), "--model", str(tmp_path / "run")]) == 2
    assert "pass --steps" in capsys.readouterr().err


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda p: ["eval", str(p / "missing.safetensors"), "--model", str(p)], "missing"),
        (
            lambda p: ["train", str(p / "garbage.safetensors"), "--out", str(p / "o")],
            "not a readable safetensors file",
        ),
        (lambda p: ["demo", *TINY[:-1], "--difficulty", "3"], "difficulty must lie in"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, make_args, message):
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    assert main(make_args(tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_console_script_help_runs():
    completed = subprocess.run(
        [sys.executable, "-m", "fma_fast.cli", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0 and "demo" in completed.stdout


def test_train_and_eval_normalise_feature_rows_unless_asked_not_to(tmp_path, capsys):
    """Guards raw rows reaching the field through the CLI: train and eval L2-normalise feature
    files by default (the model records it, eval follows), --no-normalize keeps them raw."""
    import torch

    from fma_fast.io import checkpoint
    from fma_fast.io.features import load_features, save_features

    data = tmp_path / "data"
    assert main(["synth", "--out", str(data), "--classes", "4", "--dim", "16", "--shots", "2"]) == 0
    scaled = {}
    for split in ("train", "test"):
        unit = load_features(data / f"{split}.safetensors")
        scale = torch.linspace(0.5, 3.0, unit.features.shape[0])[:, None]
        scale[::7] = 1.0  # some rows stay unit
        scaled[split] = int((scale != 1).sum())
        save_features(tmp_path / f"raw-{split}.safetensors", unit.features * scale,
                      unit.class_features, unit.labels, unit.class_names, unit.provenance)
    common = ["--blocks", "1", "--epochs", "3", "--quiet", "--seed", "4"]
    capsys.readouterr()
    for name, flag in (("unit", []), ("raw", ["--no-normalize"]), ("normalised", [])):
        raw = tmp_path / "raw-train.safetensors"
        source = data / "train.safetensors" if name == "unit" else raw
        assert main(["train", str(source), "--out", str(tmp_path / name), *common, *flag]) == 0
        printed = capsys.readouterr().out
        assert ("L2-normalised" in printed) == (name == "normalised"), printed
    weights = {name: checkpoint.load(tmp_path / name).state_dict()
               for name in ("unit", "raw", "normalised")}
    # normalised raw rows train the same field as the unit rows; raw rows another one
    for key, value in weights["unit"].items():
        torch.testing.assert_close(weights["normalised"][key], value, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(weights["raw"][k], v) for k, v in weights["unit"].items())
    assert checkpoint.load_config(tmp_path / "raw")["normalize"] is False

    def evaluate(model, *flag):
        assert main(["eval", str(tmp_path / "raw-test.safetensors"), "--model",
                     str(tmp_path / model), "--steps", "2", *flag]) == 0
        return json.loads(capsys.readouterr().out)

    assert evaluate("normalised")["normalized_rows"] == scaled["test"]
    assert evaluate("raw")["normalized_rows"] == 0  # as that model was trained
    assert evaluate("raw", "--normalize")["normalized_rows"] == scaled["test"]


def test_every_out_creates_its_missing_parents(tmp_path, capsys):
    """`--out runs/a` works when `runs/` does not exist yet (as ``save()`` does), for folders
    and files alike; a file in the way is still refused in one line."""
    task, model = tmp_path / "a/b/task", tmp_path / "c/d/model"
    assert main(["synth", "--out", str(task), "--classes", "4", "--dim", "16",
                 "--shots", "2"]) == 0
    assert main(["train", str(task / "train.safetensors"), "--val", str(task / "val.safetensors"),
                 "--out", str(model), "--blocks", "1", "--epochs", "1", "--quiet"]) == 0
    assert main(["eval", str(task / "test.safetensors"), "--model", str(model),
                 "--out", str(tmp_path / "e/f/predictions.json")]) == 0
    assert main(["score", str(model), str(task / "test.safetensors"), "--classes",
                 str(task / "test.safetensors"), "--out", str(tmp_path / "g/h/scores"),
                 "--quiet"]) == 0
    assert (model / "model.safetensors").is_file()
    assert json.loads((tmp_path / "e/f/predictions.json").read_text())["rows"] > 0
    assert (tmp_path / "g/h/scores/manifest.json").is_file()
    (tmp_path / "blocker").write_text("a file")
    capsys.readouterr()
    assert main(["eval", str(task / "test.safetensors"), "--model", str(model),
                 "--out", str(tmp_path / "blocker/x/predictions.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("blocker is a file, not a folder") and "\n" not in err, err


@pytest.mark.parametrize("command", ["extract", "run"])
def test_the_encoder_autocast_has_its_own_name_and_the_old_one_is_read(command):
    """extract/run's encoder autocast is --encoder-amp (train's is --amp, eval/score's
    --precision is the solver's); the name it had, --precision, still reads into it."""
    from fma_fast.cli.main import build_parser

    parser = build_parser()
    base = [command, "--dataset", "oxford_pets", "--root", "r", "--model", "ViT-B-32",
            "--checkpoint", "c.pt"]
    assert parser.parse_args([*base, "--encoder-amp", "bf16"]).encoder_amp == "bf16"
    assert parser.parse_args([*base, "--precision", "fp32"]).encoder_amp == "fp32"
    assert parser.parse_args(base).encoder_amp == "auto"
    helps = parser._subparsers._group_actions[0].choices[command].format_help()
    assert "--encoder-amp" in helps and "[--precision" not in helps


@pytest.mark.parametrize("command", ["demo", "report"])
def test_defaults_that_differ_from_fits_say_so_in_help(command):
    """One set of training defaults (fit's, the released code's) in train and run; demo and
    report differ on purpose, and each differing option's --help names fit's value and why."""
    from fma_fast.cli.main import build_parser
    from fma_fast.train.fit import FitSettings

    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    released = FitSettings()
    differing = [action for action in sub._actions
                 if action.dest in ("blocks", "epochs", "batch_size", "lr", "gamma")
                 and action.default != getattr(released, action.dest)]
    assert differing, f"{command}: no default differs from fit's; drop this test's premise"
    for action in differing:
        assert f": {getattr(released, action.dest)}" in action.help, (action.dest, action.help)
        assert "released code's" in action.help, action.help
    train = parser._subparsers._group_actions[0].choices["train"]
    for action in train._actions:
        if action.dest in ("blocks", "epochs", "batch_size", "lr", "gamma", "weight_decay"):
            assert action.default == getattr(released, action.dest), action.dest
