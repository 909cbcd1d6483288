"""Batch scoring (``fma_fast.score`` / ``fma-fast score``): outputs equal the in-memory solve on
every input kind, a killed job resumes to the same bytes, another job's folder is refused, bad
inputs are one line, and two torchrun processes write the bytes one process writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

import fma_fast
from fma_fast import batch, synthetic
from fma_fast._io import save_safetensors
from fma_fast.cli import main
from fma_fast.features_io import data_record, load_features, save_features
from fma_fast.policy import TOLERANCES

DIM, CLASSES, STEPS = 24, 9, 3


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> dict:
    """A saved model with a non-trivial field, a class table, and inputs of every kind: a
    labelled feature file (odd rows), a .npy array, and a cache-style folder of shards with
    3 views per image."""
    root = tmp_path_factory.mktemp("score")
    torch.manual_seed(0)
    model = fma_fast.VelocityNet(DIM, blocks=2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.08)
    fma_fast.save(model, root / "model", extra={"steps": STEPS})
    task = synthetic.make_task(num_classes=CLASSES, dim=DIM, shots=2, difficulty=0.6,
                               test_per_class=70, seed=4)
    table = task.class_features
    x, y = task.test.features[:617], task.test.labels[:617]
    save_features(root / "test.safetensors", x, table, y, [f"class {c}" for c in range(CLASSES)])
    np.save(root / "extra.npy", task.test.features[617:].numpy())
    cache = root / "cache-test"
    cache.mkdir()
    views, images = 3, 200
    rows = torch.nn.functional.normalize(torch.randn(images * views, DIM,
                                                     generator=torch.Generator().manual_seed(5)),
                                         dim=-1)
    labels = torch.arange(images) % CLASSES
    for shard in range(2):
        part = slice(shard * 100, shard * 100 + 100)
        stamp = {"common": {"views": views}, "shard": shard}
        save_safetensors(cache / f"shard-{shard:05d}-of-00002.safetensors",
                         {"features": rows[part.start * views: part.stop * views],
                          "labels": labels[part], "image_index": torch.arange(images)[part]},
                         {"fma_fast_cache": json.dumps(stamp)})
    return {"root": root, "model": model, "table": table, "x": x, "y": y,
            "extra": task.test.features[617:], "cache_rows": rows,
            "cache_labels": labels.repeat_interleave(views),
            "cache_ids": torch.arange(images).repeat_interleave(views)}


def _inputs(job) -> list[Path]:
    root = job["root"]
    return [root / "test.safetensors", root / "extra.npy", root / "cache-test"]


def _read_outputs(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every part's arrays, by part stem, parts of a shard in order."""
    parts = {}
    for path in sorted(out.glob("*.part*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            parts[path.name] = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    return parts


def _joined(parts: dict, prefix: str) -> dict[str, torch.Tensor]:
    chosen = [v for k, v in sorted(parts.items()) if k.startswith(prefix)]
    return {key: torch.cat([p[key] for p in chosen]) for key in chosen[0]}


def test_outputs_equal_the_in_memory_solve_on_every_input_kind(job, tmp_path, monkeypatch):
    """Guards wrong row offsets between chunks, parts and shards, views' labels and ids taken
    from the wrong image (parts and chunks that start inside an image's views), and accuracy
    from the wrong rows: small parts (250 rows) and odd chunks (97 rows) against one in-memory
    solve of each input, and the accuracies recomputed here."""
    monkeypatch.setattr(batch, "SCORE_PART_ROWS", 250)
    summary = fma_fast.score(job["root"] / "model", _inputs(job), job["root"] / "test.safetensors",
                             tmp_path / "out", topk=4, batch_size=97, progress=False)
    parts = _read_outputs(tmp_path / "out")
    assert len(parts) == summary.parts == 3 + 1 + 4  # 617 rows in parts of 250; 13; 2 x 300
    rtol, atol = TOLERANCES[torch.float32]
    cases = [("test-", job["x"], job["y"], torch.arange(617)),
             ("extra-", job["extra"], None, torch.arange(job["extra"].shape[0])),
             ("shard-", job["cache_rows"], job["cache_labels"], job["cache_ids"])]
    correct = correct_m0 = labelled = 0
    for prefix, x, y, ids in cases:
        got = _joined(parts, prefix)
        want = fma_fast.solve(x, job["model"], STEPS, class_features=job["table"], topk=4,
                              zero_shot=True)
        assert torch.equal(got["row_ids"], ids), prefix
        assert torch.equal(got["topk_indices"], want.topk_indices), prefix
        torch.testing.assert_close(got["topk_values"], want.topk_values, rtol=rtol, atol=atol)
        if y is None:
            assert "labels" not in got
            continue
        assert torch.equal(got["labels"], y), prefix
        correct += int((want.pred == y).sum())
        correct_m0 += int((want.zero_shot_pred == y).sum())
        labelled += y.shape[0]
    assert summary.rows == 617 + job["extra"].shape[0] + 600
    assert summary.accuracy == pytest.approx(correct / labelled)
    assert summary.accuracy_at_m0 == pytest.approx(correct_m0 / labelled)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["settings"]["steps"] == STEPS and manifest["rows"] == summary.rows
    assert manifest["path"].startswith("folded-fp32")


def test_solve_scores_m0_in_the_same_pass(job):
    """``zero_shot=True`` gives the M=0 prediction (what eval used a second solve for)."""
    x, model, table = job["x"], job["model"], job["table"]
    result = fma_fast.solve(x, model, STEPS, class_features=table, zero_shot=True, batch_size=100)
    untransported = fma_fast.solve(x, model, 0, class_features=table)
    assert torch.equal(result.zero_shot_pred, untransported.pred)
    assert not torch.equal(result.zero_shot_pred, result.pred)
    with pytest.raises(ValueError, match="zero_shot needs class_features"):
        fma_fast.solve(x, model, 1, zero_shot=True)


def test_an_interrupted_job_resumes_to_the_same_bytes(job, tmp_path, monkeypatch):
    """Guards rows scored twice or never after a crash: a job stopped after 2 parts, run again,
    writes only the rest and ends with the bytes of an uninterrupted job."""
    monkeypatch.setattr(batch, "SCORE_PART_ROWS", 250)
    args = (job["root"] / "model", _inputs(job), job["root"] / "test.safetensors")
    fma_fast.score(*args, tmp_path / "whole", progress=False)
    real, written = batch._write_part, []

    def crash_after_two(*a, **k):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(a[1].stem)
        return real(*a, **k)

    monkeypatch.setattr(batch, "_write_part", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        fma_fast.score(*args, tmp_path / "resumed", progress=False)
    monkeypatch.setattr(batch, "_write_part", real)
    summary = fma_fast.score(*args, tmp_path / "resumed", progress=False)
    assert summary.parts_skipped == 2 and summary.rows_scored == summary.rows - 500
    whole = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == whole
    for name in whole:
        if name.endswith(".safetensors") or name.endswith(".done.json"):
            assert (tmp_path / "resumed" / name).read_bytes() == \
                (tmp_path / "whole" / name).read_bytes(), name


def test_a_changed_input_is_scored_again_and_other_settings_are_refused(job, tmp_path):
    """Guards stale outputs: an input rewritten since is scored again; a rerun with another M,
    top-k or format into the same folder is refused, naming what differs."""
    root = job["root"]
    data = tmp_path / "data.npy"
    np.save(data, job["extra"].numpy())
    args = (root / "model", [data], root / "test.safetensors", tmp_path / "out")
    fma_fast.score(*args, progress=False)
    assert fma_fast.score(*args, progress=False).rows_scored == 0
    np.save(data, job["extra"].flip(0).numpy())
    os.utime(data, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert fma_fast.score(*args, progress=False).rows_scored == job["extra"].shape[0]
    with pytest.raises(ValueError, match=r"another scoring job \(steps 3 vs 2\)"):
        fma_fast.score(*args, steps=2, progress=False)
    with pytest.raises(ValueError, match="topk 1 vs 2"):
        fma_fast.score(*args, topk=2, progress=False)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no scoring job"):
        fma_fast.score(*args[:3], tmp_path / "foreign", progress=False)
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"


def test_text_outputs_carry_class_names_and_are_for_small_jobs(job, tmp_path, monkeypatch):
    root = job["root"]
    args = (root / "model", [root / "test.safetensors"], root / "test.safetensors")
    fma_fast.score(*args, tmp_path / "csv", topk=2, output_format="csv", progress=False)
    lines = (tmp_path / "csv" / next(p.name for p in (tmp_path / "csv").glob("*.csv"))
             ).read_text().splitlines()
    assert lines[0] == "row,label,class_1,name_1,cosine_1,class_2,name_2,cosine_2"
    want = fma_fast.solve(job["x"], job["model"], STEPS, class_features=job["table"], topk=2)
    row, label, c1, name1, v1, *_ = lines[5].split(",")
    assert (int(row), int(label), int(c1)) == (4, int(job["y"][4]), int(want.topk_indices[4, 0]))
    assert name1 == f"class {c1}" and float(v1) == pytest.approx(float(want.topk_values[4, 0]),
                                                                 abs=1e-6)
    fma_fast.score(*args, tmp_path / "jsonl", output_format="jsonl", progress=False)
    first = json.loads(next((tmp_path / "jsonl").glob("*.jsonl")).read_text().splitlines()[0])
    assert first["topk"][0][:2] == [int(want.topk_indices[0, 0]),
                                    f"class {int(want.topk_indices[0, 0])}"]
    monkeypatch.setattr(batch, "SCORE_TEXT_ENTRIES", 1000)
    with pytest.raises(ValueError, match="csv output is for small jobs"):
        fma_fast.score(*args, tmp_path / "big", topk=2, output_format="csv", progress=False)


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_inputs_are_one_line_and_exit_2(job, tmp_path, capsys):
    root = job["root"]
    base = ["score", str(root / "model"), "--classes", str(root / "test.safetensors"), "--out"]
    broken = tmp_path / "cache"
    broken.mkdir()
    for name in ("shard-00000-of-00003.safetensors", "shard-00002-of-00003.safetensors"):
        (broken / name).write_bytes((root / "cache-test" / "shard-00000-of-00002.safetensors")
                                    .read_bytes())
    err = _error(capsys, [*base, str(tmp_path / "o1"), str(broken)])
    assert "shard 1 of 3 is missing" in err
    np.save(tmp_path / "wide.npy", np.zeros((5, DIM + 1), np.float32))
    err = _error(capsys, [*base, str(tmp_path / "o2"), str(tmp_path / "wide.npy")])
    assert f"rows have dim {DIM + 1} but the model expects {DIM}" in err
    bad = job["extra"].clone()
    bad[11, 3] = float("nan")
    np.save(tmp_path / "nan.npy", bad.numpy())
    err = _error(capsys, [*base, str(tmp_path / "o3"), str(tmp_path / "nan.npy")])
    assert "nan.npy: row 11 contains NaN or Inf" in err
    data = (root / "test.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    err = _error(capsys, [*base, str(tmp_path / "o4"), str(tmp_path / "cut.safetensors")])
    assert "shorter than its header says" in err or "not a safetensors file" in err
    err = _error(capsys, [*base, str(tmp_path / "o5"), str(tmp_path / "nothing.npy")])
    assert "cannot read input" in err and "no such file" in err
    other = tmp_path / "other.safetensors"
    save_features(other, job["x"], job["table"].flip(0), job["y"])
    err = _error(capsys, [*base, str(tmp_path / "o6"), str(other)])
    assert "carries another class table than the classes given" in err
    trained = tmp_path / "trained"
    fma_fast.save(job["model"], trained,
                  extra={"steps": STEPS, "data": data_record(load_features(other))})
    err = _error(capsys, ["score", str(trained), str(root / "extra.npy"), "--classes",
                          str(root / "test.safetensors"), "--out", str(tmp_path / "o8")])
    assert f"are not the class table {trained} was trained with" in err
    # the job folder and what was written before survive a bad rerun
    assert main([*base, str(tmp_path / "o7"), str(root / "extra.npy"), "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "o7").iterdir()}
    _error(capsys, [*base, str(tmp_path / "o7"), str(root / "extra.npy"), "--steps", "1"])
    assert {p.name: p.read_bytes() for p in (tmp_path / "o7").iterdir()} == before


def _command(job, out: Path, *extra: str) -> list[str]:
    root = job["root"]
    return ["-m", "fma_fast.cli", "score", str(root / "model"), *map(str, _inputs(job)),
            "--classes", str(root / "test.safetensors"), "--out", str(out), "--topk", "3",
            "--device", "cpu", "--quiet", *extra]


def _environment() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}


def test_torchrun_writes_the_bytes_of_one_process(job, tmp_path):
    """Two gloo processes take whole input shards each and write the files one process writes,
    byte for byte (the manifest's timings aside)."""
    one, two = tmp_path / "one", tmp_path / "two"
    done = subprocess.run([sys.executable, *_command(job, one)], capture_output=True, text=True,
                          timeout=240, env=_environment())
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", *_command(job, two)], capture_output=True,
                          text=True, timeout=240, env=_environment())
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("scored") == 1, done.stdout
    names = sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in two.iterdir()) == names
    for name in names:
        if name != "manifest.json":
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["this_run"]["processes"] == 2
    by_rank = manifest["this_run"]["rows_by_rank"]
    assert len(by_rank) == 2 and min(by_rank) > 0 and sum(by_rank) == manifest["rows"], by_rank
    assert manifest["accuracy"] == json.loads((one / "manifest.json").read_text())["accuracy"]


def test_a_job_killed_with_sigkill_resumes_to_the_bytes_of_an_uninterrupted_run(tmp_path):
    """SIGKILL while parts are being written, then the same command again: every row scored
    once, the outputs those of a run never killed."""
    torch.manual_seed(1)
    model = fma_fast.VelocityNet(64, blocks=2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.05)
    fma_fast.save(model, tmp_path / "model", extra={"steps": 8})
    table = torch.nn.functional.normalize(torch.randn(50, 64), dim=-1)
    np.save(tmp_path / "classes.npy", table.numpy())
    inputs = []
    for number in range(16):
        rows = torch.nn.functional.normalize(torch.randn(6000, 64), dim=-1)
        inputs.append(tmp_path / f"in{number:02d}.npy")
        np.save(inputs[-1], rows.numpy())

    def command(out):
        return [sys.executable, "-m", "fma_fast.cli", "score", str(tmp_path / "model"),
                *map(str, inputs), "--classes", str(tmp_path / "classes.npy"), "--out", str(out),
                "--quiet", "--device", "cpu"]

    env = _environment()
    assert subprocess.run(command(tmp_path / "whole"), env=env, timeout=300).returncode == 0
    process = subprocess.Popen(command(tmp_path / "killed"), env=env)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((tmp_path / "killed").glob("*.done.json"))) < 3:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_at_kill = len(list((tmp_path / "killed").glob("*.done.json")))
    assert 0 < done_at_kill < 16, f"{done_at_kill} of 16 parts were done at the kill"
    assert subprocess.run(command(tmp_path / "killed"), env=env, timeout=300).returncode == 0
    for path in sorted((tmp_path / "whole").iterdir()):
        if path.name != "manifest.json":
            assert (tmp_path / "killed" / path.name).read_bytes() == path.read_bytes(), path.name
    leftovers = [p.name for p in (tmp_path / "killed").iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


def test_a_failing_solve_raises_instead_of_hanging(job, tmp_path, monkeypatch):
    """Guards the reader thread blocking on a full queue after the consumer stopped: the
    solve of a small job (13 rows in 3 chunks: the queue is full when the reader finishes)
    fails, and score raises at once."""
    import threading

    def failing(*args, **kwargs):
        time.sleep(0.3)  # let the reader fill the queue
        raise RuntimeError("solve failed")

    monkeypatch.setattr(batch, "solve", failing)
    outcome = {}

    def run():
        try:
            fma_fast.score(job["root"] / "model", [job["root"] / "extra.npy"],
                           job["root"] / "test.safetensors", tmp_path / "out", batch_size=5,
                           progress=False)
        except RuntimeError as error:
            outcome["error"] = str(error)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "score hung after its solve failed"
    assert outcome == {"error": "solve failed"}
