"""The fma-fast command: demo, synth -> train -> eval, and one-line errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fma_fast.cli import main

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
