"""The CLI's promise: bad devices, backends, paths, files and disks exit 2 with one line that
names the problem, before any training or encoding starts, and nothing saved is lost."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from support import one_line_error

from fma_fast.batch import evaluate as batch_evaluate
from fma_fast.cli import main, options
from fma_fast.experiments import demo
from fma_fast.io import files
from fma_fast.io.features import save_features
from fma_fast.train import files as train_files

TRAIN = ["--blocks", "1", "--epochs", "1", "--quiet"]
NO_DATASET = ["--dataset", "nowhere", "--model", "ViT-B-32"]


@pytest.fixture(scope="module")
def work() -> Path:
    """A folder every user can enter (for the unprivileged cases) with synthetic train/val/test
    files, a trained model, an ordinary file and a folder."""
    folder = Path(tempfile.mkdtemp(prefix="fma-fast-cli-"))
    folder.chmod(0o755)
    data = folder / "data"
    assert main(["synth", "--out", str(data), "--classes", "4", "--dim", "16", "--shots", "2"]) == 0
    command = ["train", str(data / "train.safetensors"), "--val", str(data / "val.safetensors")]
    assert main([*command, "--out", str(folder / "model"), *TRAIN, "--max-steps", "2"]) == 0
    (folder / "afile").write_text("not a folder")
    (folder / "adir").mkdir()
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield folder
    shutil.rmtree(folder)


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if training or solving starts: the checks must come first."""

    def started(*args, **kwargs):
        raise AssertionError("work started before the arguments were checked")

    for module in (options, train_files, demo):  # every command's fit
        monkeypatch.setattr(module, "fit", started)
    monkeypatch.setattr(batch_evaluate, "solve", started)


def data_files(work: Path) -> dict[str, str]:
    data = work / "data"
    return {name: str(data / f"{name}.safetensors") for name in ("train", "val", "test")}


CASES = {
    "demo --device nonexistent": (
        lambda w, d: ["demo", "--device", "nonexistent", *TRAIN], "device must be a torch device"
    ),
    "train --device nonexistent": (
        lambda w, d: ["train", d["train"], "--out", str(w / "m"), "--device", "bogus:0", *TRAIN],
        "device must be a torch device",
    ),
    "eval --device nonexistent": (
        lambda w, d: ["eval", d["test"], "--model", str(w / "model"), "--device", "nonexistent"],
        "device must be a torch device",
    ),
    "extract --device nonexistent": (
        lambda w, d: ["extract", *NO_DATASET, "--device", "bogus", "--out", str(w / "x")],
        "device must be a torch device",
    ),
    "run --device nonexistent": (
        lambda w, d: ["run", *NO_DATASET, "--device", "bogus", "--out", str(w / "x")],
        "device must be a torch device",
    ),
    "train --out is a file": (
        lambda w, d: ["train", d["train"], "--out", str(w / "afile"), *TRAIN],
        "is an existing file, not a folder",
    ),
    "train --out under a file": (  # missing parents are created; a file cannot be
        lambda w, d: ["train", d["train"], "--out", str(Path(d["train"]) / "such" / "m"),
                      *TRAIN],
        "is a file, not a folder",
    ),
    "train --out holds another program's config.json": (
        lambda w, d: ["train", d["train"], "--out", str(w / "released"), *TRAIN],
        "config.json there is not an fma_fast model file; refusing to overwrite it",
    ),
    "synth --out is a file": (
        lambda w, d: ["synth", "--out", str(w / "afile")], "is an existing file, not a folder"
    ),
    "synth --out holds a foreign train.safetensors": (
        lambda w, d: ["synth", "--out", str(w / "foreign")],
        "exists and is not a feature file; refusing to overwrite it",
    ),
    "eval --out is a folder": (
        lambda w, d: ["eval", d["test"], "--model", str(w / "model"), "--out", str(w / "adir")],
        "is a folder; give a file name",
    ),
    "eval --out is the test feature file": (
        lambda w, d: ["eval", d["test"], "--model", str(w / "model"), "--out", d["test"]],
        "exists and is not a predictions file",
    ),
    "eval --out under a file": (
        lambda w, d: ["eval", d["test"], "--model", str(w / "model"),
                      "--out", str(Path(d["test"]) / "no" / "p.json")],
        "is a file, not a folder",
    ),
    "eval features is a folder": (
        lambda w, d: ["eval", str(w / "adir"), "--model", str(w / "model")],
        "is a directory, not a file",
    ),
    "eval --model is a file": (
        lambda w, d: ["eval", d["test"], "--model", str(w / "afile")], "is a file; a model is"
    ),
    "extract --out is a file": (
        lambda w, d: ["extract", *NO_DATASET, "--out", str(w / "afile")],
        "is an existing file, not a folder",
    ),
    "run --out is a file": (
        lambda w, d: ["run", *NO_DATASET, "--out", str(w / "afile")],
        "is an existing file, not a folder",
    ),
    "run --seeds 1 1": (
        lambda w, d: ["run", *NO_DATASET, "--seeds", "1", "2", "1", "--out", str(w / "r")],
        "seeds must differ: 1 given twice",
    ),
    "extract --seed 3 3": (
        lambda w, d: ["extract", *NO_DATASET, "--seed", "3", "3", "--out", str(w / "r")],
        "seeds must differ: 3 given twice",
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_bad_paths_and_devices_exit_2_before_any_work(work, capsys, no_work, case):
    (work / "released").mkdir(exist_ok=True)
    (work / "released" / "config.json").write_text('{"blocks": 12}')
    (work / "foreign").mkdir(exist_ok=True)
    (work / "foreign" / "train.safetensors").write_bytes(b"my own notes")
    make_argv, message = case
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    err = one_line_error(capsys, make_argv(work, data_files(work)))
    assert message in err, err
    after = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    assert after == before, "a refused command changed files"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize(
    "make_argv",
    [
        lambda w, d: ["demo", "--device", "cuda", *TRAIN],
        lambda w, d: ["train", d["train"], "--out", str(w / "m"), "--device", "cuda:1", *TRAIN],
        lambda w, d: ["eval", d["test"], "--model", str(w / "model"), "--device", "cuda"],
        lambda w, d: ["extract", *NO_DATASET, "--device", "cuda", "--out", str(w / "x")],
        lambda w, d: ["run", *NO_DATASET, "--device", "cuda", "--out", str(w / "x")],
    ],
    ids=["demo", "train", "eval", "extract", "run"],
)
def test_cuda_without_a_gpu(work, capsys, no_work, make_argv):
    err = one_line_error(capsys, make_argv(work, data_files(work)))
    assert "no CUDA GPU is available here" in err, err


@pytest.mark.parametrize("command", ["eval", "run"])
def test_triton_backend_where_it_cannot_run(work, capsys, no_work, monkeypatch, command):
    """Without a GPU and without the interpreter the kernels cannot run: said up front."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if command == "eval":
        argv = ["eval", data_files(work)["test"], "--model", str(work / "model"),
                "--backend", "triton"]
    else:
        argv = ["run", *NO_DATASET, "--solve-backend", "triton", "--out", str(work / "r")]
    if torch.cuda.is_available():
        argv += ["--device", "cpu"]
    err = one_line_error(capsys, argv)
    assert "backend='triton' requested but the kernels cannot run" in err, err


def as_unprivileged(capsys, argv: list[str], chmod: list[tuple[Path, int]]) -> tuple[int, str]:
    """Run ``main(argv)`` as a user who cannot read or write what ``chmod`` locks: directly
    when not root, else in a forked child that drops to uid 65534 (root ignores modes)."""
    for path, mode in chmod:
        path.chmod(mode)
    try:
        if os.geteuid() != 0:
            code = main(argv)
            return code, capsys.readouterr().err.strip()
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no pytest machinery from here on, only os._exit
            signal.alarm(120)  # OpenMP is not fork-safe: a child that starts computing may hang
            torch.set_num_threads(1)
            sys.stderr = os.fdopen(write_end, "w")
            try:
                os.setgid(65534)
                os.setuid(65534)
                code = main(argv)
            except BaseException as error:  # reported to the parent as a failure
                print(f"child failed: {error!r}", file=sys.stderr)
                code = 99
            sys.stderr.flush()
            os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end) as reader:
            err = reader.read().strip()
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), err
    finally:
        for path, _ in chmod:
            path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.mark.parametrize("what", ["features", "model weights", "model config"])
def test_unreadable_files_say_permission_denied(work, capsys, what):
    data = data_files(work)
    locked = {
        "features": Path(data["test"]),
        "model weights": work / "model" / "model.safetensors",
        "model config": work / "model" / "config.json",
    }[what]
    argv = ["eval", data["test"], "--model", str(work / "model")]
    code, err = as_unprivileged(capsys, argv, [(locked, 0o000)])
    assert code == 2 and len(err.splitlines()) == 1, (code, err)
    assert "permission denied" in err and "no such file" not in err, err


@pytest.mark.parametrize("what", ["features", "model weights", "model config"])
def test_fifos_are_refused_without_blocking(work, capsys, tmp_path, what):
    """Guards blocking for ever on a FIFO in place of a file (opening one for reading waits
    for a writer): the file type is checked first; exit 2, one line."""
    import threading

    data = data_files(work)
    model = tmp_path / "model"
    shutil.copytree(work / "model", model)
    fifo = {"features": tmp_path / "test.safetensors",
            "model weights": model / "model.safetensors",
            "model config": model / "config.json"}[what]
    fifo.unlink(missing_ok=True)
    os.mkfifo(fifo)
    features = str(fifo) if what == "features" else data["test"]
    outcome = {}
    worker = threading.Thread(target=lambda: outcome.setdefault(
        "code", main(["eval", features, "--model", str(model)])), daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), f"eval blocked on a FIFO as the {what}"
    err = capsys.readouterr().err.strip()
    assert outcome["code"] == 2 and len(err.splitlines()) == 1, err
    assert "a FIFO, not a regular file" in err, err


def test_unwritable_output_folders_are_refused_before_training(work, capsys):
    locked = work / "locked"
    locked.mkdir(exist_ok=True)
    argv = ["train", data_files(work)["train"], "--out", str(locked / "m"), *TRAIN]
    code, err = as_unprivileged(capsys, argv, [(locked, 0o555)])
    assert code == 2 and "cannot write in" in err and "permission denied" in err, (code, err)
    argv = ["eval", data_files(work)["test"], "--model", str(work / "model"),
            "--out", str(locked / "p.json")]
    code, err = as_unprivileged(capsys, argv, [(locked, 0o555)])
    assert code == 2 and "cannot write in" in err, (code, err)


def full_disk(monkeypatch, after_bytes: int) -> None:
    """Every file write fails with ENOSPC once ``after_bytes`` were written to it."""
    real = files.atomic_write

    def atomic_write(path, write):
        def filling(temp):
            write(temp)
            if temp.stat().st_size > after_bytes:
                with open(temp, "r+b") as handle:
                    handle.truncate(after_bytes)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(temp))

        return real(path, filling)

    monkeypatch.setattr(files, "atomic_write", atomic_write)


def test_a_full_disk_is_one_line_and_keeps_what_was_saved(work, capsys, monkeypatch):
    model = work / "model"
    saved = {p.name: p.read_bytes() for p in model.iterdir()}
    predictions = work / "pred.json"
    data = data_files(work)
    assert main(["eval", data["test"], "--model", str(model), "--out", str(predictions)]) == 0
    written = predictions.read_bytes()
    capsys.readouterr()
    full_disk(monkeypatch, after_bytes=100)
    err = one_line_error(capsys, ["train", data["train"], "--out", str(model), *TRAIN])
    assert "no space left on device" in err and "nothing was half-written" in err, err
    err = one_line_error(
        capsys, ["eval", data["test"], "--model", str(model), "--topk", "3",
                 "--out", str(predictions)]
    )
    assert "no space left on device" in err, err
    assert {p.name: p.read_bytes() for p in model.iterdir()} == saved
    assert predictions.read_bytes() == written
    assert not [p for p in work.rglob("*.tmp")], "temporary files were left behind"


def test_too_little_space_for_the_model_is_refused_before_training(work, capsys, no_work,
                                                                    monkeypatch):
    usage = shutil.disk_usage(work)
    monkeypatch.setattr(options.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    err = one_line_error(capsys, ["train", data_files(work)["train"], "--out", str(work / "m2"),
                                  *TRAIN])
    assert "not enough disk space for the model" in err, err


# ------------------------------------------------------------------ mixed provenance


@pytest.fixture(scope="module")
def two_tasks(work) -> dict[str, dict[str, str]]:
    """Two synthetic tasks of the same shape (seeds 1 and 2: other class tables)."""
    tasks = {}
    for seed in (1, 2):
        out = work / f"task{seed}"
        argv = ["synth", "--out", str(out), "--classes", "4", "--dim", "16", "--shots", "2",
                "--seed", str(seed)]
        assert main(argv) == 0
        tasks[seed] = {name: str(out / f"{name}.safetensors") for name in ("train", "val", "test")}
    return tasks


def test_train_refuses_val_of_another_source(two_tasks, work, capsys, no_work):
    argv = ["train", two_tasks[1]["train"], "--val", two_tasks[2]["val"],
            "--out", str(work / "mixed"), *TRAIN]
    err = one_line_error(capsys, argv)
    assert "come from different sources (seed 1 vs 2)" in err, err


def test_eval_refuses_test_files_of_another_source_or_class_table(two_tasks, work, capsys):
    model = work / "model1"
    assert main(["train", two_tasks[1]["train"], "--out", str(model), *TRAIN]) == 0
    capsys.readouterr()
    err = one_line_error(capsys, ["eval", two_tasks[2]["test"], "--model", str(model),
                                  "--steps", "1"])
    assert "come from different sources" in err, err
    # Files made by hand carry no provenance: their class tables are compared instead.
    from fma_fast.io.features import load_features

    test = load_features(two_tasks[1]["test"])
    bare = work / "bare"
    bare.mkdir(exist_ok=True)
    table = test.class_features.clone()
    table[2, 5] += 1e-3
    save_features(bare / "values.safetensors", test.features, table, test.labels,
                  test.class_names)
    err = one_line_error(capsys, ["eval", str(bare / "values.safetensors"),
                                  "--model", str(model), "--steps", "1"])
    assert "different class tables (same size, other values: class 2 differs by" in err, err
    names = list(test.class_names)
    names[1], names[3] = names[3], names[1]
    save_features(bare / "names.safetensors", test.features, test.class_features, test.labels,
                  names)
    err = one_line_error(capsys, ["eval", str(bare / "names.safetensors"),
                                  "--model", str(model), "--steps", "1"])
    assert "different class names (class 1:" in err, err
    save_features(bare / "same.safetensors", test.features, test.class_features, test.labels,
                  test.class_names)
    assert main(["eval", str(bare / "same.safetensors"), "--model", str(model),
                 "--steps", "1"]) == 0


DEEP_JSON = "[" * 100_000 + "]" * 100_000


def call_within(call, seconds: float = 60, fifo: Path | None = None):
    """``call()``'s result, or a failure when it is still running after ``seconds`` (then a
    writer opens and closes ``fifo`` so that a reader blocked on it returns)."""
    import threading

    outcome = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as error:  # handed to the test
            outcome["error"] = error

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive() and fifo is not None:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
        pytest.fail(f"blocked on the FIFO {fifo}")
    assert not worker.is_alive(), "still running"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def test_json_files_are_read_by_the_one_reader(work, capsys, tmp_path):
    """Guards JSON files the CLI read past io.files.read_json: eval --out naming an existing
    FIFO blocked for ever (read_text opened it), a deeply nested file there and a deep
    report.json for report --render-only raised RecursionError (a traceback): exit 2, one
    line, the existing file untouched."""
    data = data_files(work)
    fifo = tmp_path / "predictions.json"
    os.mkfifo(fifo)
    eval_into = ["eval", data["test"], "--model", str(work / "model"), "--out"]
    code = call_within(lambda: main([*eval_into, str(fifo)]), fifo=fifo)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"--out {fifo} exists and is not a predictions file" in err, err
    deep = tmp_path / "deep.json"
    deep.write_text(DEEP_JSON)
    err = one_line_error(capsys, [*eval_into, str(deep)])
    assert f"--out {deep} exists and is not a predictions file" in err, err
    assert deep.read_text() == DEEP_JSON
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.json").write_text(DEEP_JSON)
    err = one_line_error(capsys, ["report", "--out", str(report), "--render-only"])
    assert "report results" in err and "nests JSON 100000 levels deep" in err, err
