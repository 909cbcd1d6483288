"""``fma-fast predict`` / :func:`fma_fast.clip.predict_images` on a tiny random open_clip model
saved as a local file and generated PNGs: ``run`` -> classifier folder -> predict on an
unlabelled folder of 210 images; the predictions equal ``eval`` on features ``extract`` wrote
for the same images; labelled inputs (class folders, CSV) give eval's accuracy; a SIGKILLed
job resumes to the same bytes, two torchrun processes write them too; undecodable images are
skipped and counted, or refused; another classifier's folder is refused; stages overlap."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

open_clip = pytest.importorskip(
    "open_clip", reason="SKIPPED, not passed: open_clip missing (pip install fma_fast[clip])"
)
pytest.importorskip("PIL.Image")

from clip_support import (  # noqa: E402
    colour_image,
    save_random_weights,
    tiny_architecture,
    write_architecture,
)
from safetensors import safe_open  # noqa: E402
from support import child_environment, kill_after_parts  # noqa: E402

import fma_fast  # noqa: E402
from fma_fast.cli import main  # noqa: E402
from fma_fast.clip import (  # noqa: E402
    CollapseWarning,
    FewShotClassifier,
    predict_images,
    register_model_config,
)
from fma_fast.clip import images as image_lists  # noqa: E402
from fma_fast.clip import predict as predict_module  # noqa: E402
from fma_fast.core.progress import progress as progress_bar  # noqa: E402
from fma_fast.io.features import load_features  # noqa: E402

MODEL = "fma-fast-tiny-predict-test"
CLASSES = ["circle", "square", "star"]
TEST_PER_CLASS = 70  # 210 test images
TRAIN = [*("--blocks", "1", "--epochs", "40", "--lr", "2e-3", "--batch-size", "16"),
         *("--max-steps", "10", "--quiet")]


def _quiet_main(argv: list[str]) -> int:
    with contextlib.redirect_stdout(io.StringIO()):
        return main(argv)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """A tiny architecture and random weights file; a dataset with train/ (8 per class) and
    test/ (70 per class) class folders; ``fma-fast run`` -> its classifier folder;
    ``fma-fast extract`` -> test.safetensors; the test images copied flat (unlabelled)."""
    root = tmp_path_factory.mktemp("predict")
    config = write_architecture(root, MODEL, tiny_architecture())
    register_model_config(config)
    weights = save_random_weights(open_clip, MODEL, root / "weights.pt", seed=2)
    import numpy as np

    rng = np.random.default_rng(0)
    data = root / "shapes"
    for split, count in (("train", 8), ("test", TEST_PER_CLASS)):
        for label, name in enumerate(CLASSES):
            (data / split / name).mkdir(parents=True)
            for i in range(count):
                colour_image(label, i, rng).save(data / split / name / f"{name}_{i:03d}.png")
    flat = root / "unlabelled"
    flat.mkdir()
    for path in sorted((data / "test").rglob("*.png")):
        shutil.copy(path, flat / path.name)
    source = ["--dataset", str(data), "--model", MODEL, "--model-config", str(config),
              "--checkpoint", str(weights), "--shots", "4", "--views", "2", "--seeds", "1"]
    assert _quiet_main(["run", *source, *TRAIN, "--out", str(root / "run")]) == 0
    assert _quiet_main(["extract", *source, "--quiet", "--out", str(root / "feats")]) == 0
    return {"root": root, "data": data, "flat": flat, "weights": weights,
            "classifier": root / "run" / "classifiers" / "k4-seed1"}


@pytest.fixture(scope="module")
def evaluated(tiny) -> dict:
    """``fma-fast eval`` of the extracted test features with the classifier folder, top-3."""
    out = tiny["root"] / "eval.json"
    assert _quiet_main(["eval", str(tiny["root"] / "feats" / "test.safetensors"), "--model",
                        str(tiny["classifier"]), "--topk", "3", "--out", str(out)]) == 0
    found = json.loads(out.read_text())
    features = load_features(tiny["root"] / "feats" / "test.safetensors")
    found["labels"] = features.labels.tolist()
    return found


def _csv_rows(out: Path) -> list[dict[str, str]]:
    rows = []
    for path in sorted(out.glob("*.part*.csv")):
        with open(path, newline="") as handle:
            rows += list(csv.DictReader(handle))
    return rows


def _safetensors_parts(out: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    arrays: dict[str, list[torch.Tensor]] = {}
    paths: list[str] = []
    for path in sorted(out.glob("*.part*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                arrays.setdefault(key, []).append(handle.get_tensor(key))
            paths += json.loads(handle.metadata()["paths"])
    return {key: torch.cat(values) for key, values in arrays.items()}, paths


def test_unlabelled_folder_to_csv_equals_eval_on_extracted_features(tiny, evaluated, tmp_path):
    """Guards rows, paths, names or cosines out of line with the images, and features
    different from extract's (preprocessing, encoder, solve): predict's CSV of 210 unlabelled
    images against eval of the same images' extracted features, by file name."""
    out = tmp_path / "out"
    assert _quiet_main(["predict", str(tiny["classifier"]), str(tiny["flat"]), "--out",
                        str(out), "--topk", "2", "--format", "csv", "--part-size", "64",
                        "--encode-batch-size", "25", "--quiet"]) == 0
    rows = _csv_rows(out)
    assert len(rows) == 3 * TEST_PER_CLASS >= 200
    assert list(rows[0]) == ["row", "path", "class_1", "name_1", "cosine_1", "class_2",
                             "name_2", "cosine_2"]
    order = sorted((tiny["data"] / "test").rglob("*.png"))  # extract's order: class, file
    position = {path.name: number for number, path in enumerate(order)}
    assert [row["path"] for row in rows] == [str(tiny["flat"] / p.name)
                                           for p in sorted(order, key=lambda p: p.name)]
    assert [int(row["row"]) for row in rows] == list(range(len(rows)))
    for row in rows:
        expected = position[Path(row["path"]).name]
        indices = evaluated["topk_indices"][expected][:2]
        assert [int(row["class_1"]), int(row["class_2"])] == indices, row
        assert [row["name_1"], row["name_2"]] == [CLASSES[c] for c in indices]
        cosines = [float(row["cosine_1"]), float(row["cosine_2"])]
        assert cosines == pytest.approx(evaluated["topk_values"][expected][:2], abs=2e-6)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["images"] == manifest["rows"] == len(rows) and manifest["bad_images"] == 0
    assert manifest["labelled_rows"] == 0 and manifest["accuracy"] is None
    assert manifest["class_names"] == CLASSES and len(manifest["inputs"][0]["parts"]) == 4
    assert len({row["class_1"] for row in rows}) > 1  # the field learnt the colours


def test_labelled_folders_and_csv_give_evals_accuracy_and_recall(tiny, evaluated, tmp_path):
    """Guards labels taken from the wrong folder or CSV cell and wrong accuracy sums: class
    folders and a CSV of the same images (labels by class name) give eval's predictions,
    accuracy and M=0 accuracy; top-3 and per-class recall are recomputed here from eval's."""
    labels = torch.tensor(evaluated["labels"])
    top = torch.tensor(evaluated["topk_indices"])
    recall = {name: float((top[labels == c, 0] == c).double().mean())
              for c, name in enumerate(CLASSES)}
    order = sorted((tiny["data"] / "test").rglob("*.png"))
    listing = tmp_path / "images.csv"
    with open(listing, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["label", "path"])
        for path in order:
            writer.writerow([path.parent.name, os.path.relpath(path, tmp_path)])
    for name, given in (("folders", tiny["data"] / "test"), ("csv", listing)):
        out = tmp_path / name
        summary = predict_images(tiny["classifier"], [given], out, topk=1, part_images=50,
                                 progress=False)
        arrays, paths = _safetensors_parts(out)
        assert torch.equal(arrays["labels"], labels), name
        assert torch.equal(arrays["topk_indices"][:, 0], top[:, 0]), name
        assert len(paths) == len(order)
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["accuracy"] == pytest.approx(evaluated["accuracy"]) == summary.accuracy
        assert manifest["accuracy_at_m0"] == pytest.approx(evaluated["accuracy_at_m0"])
        assert manifest["top5_accuracy"] == pytest.approx(
            float((top == labels[:, None]).any(1).double().mean()))
        assert manifest["top5_classes"] == 3
        assert manifest["per_class_recall"] == pytest.approx(recall)
        assert manifest["mean_per_class_recall"] == pytest.approx(sum(recall.values()) / 3)
        assert manifest["labelled_rows"] == len(order)
    assert summary.line().count("accuracy") == 1


def _command(tiny, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "fma_fast.cli", "predict", str(tiny["classifier"]),
            str(tiny["flat"]), "--out", str(out), "--part-size", "10", "--encode-batch-size",
            "5", "--device", "cpu", "--quiet", *extra]


def _same_files(one: Path, two: Path) -> None:
    names = sorted(p.name for p in one.iterdir())
    assert sorted(p.name for p in two.iterdir()) == names
    for name in names:
        if name != "manifest.json":
            assert (one / name).read_bytes() == (two / name).read_bytes(), name


def test_a_job_killed_with_sigkill_resumes_to_the_same_bytes(tiny, tmp_path):
    """SIGKILL while parts are being written, then the same command: every image classified
    once, the files those of a job never killed, no temporary file left."""
    env = child_environment()
    done = subprocess.run(_command(tiny, tmp_path / "whole"), env=env, timeout=300,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    at_kill = kill_after_parts(_command(tiny, tmp_path / "killed"), tmp_path / "killed", env)
    assert 0 < at_kill < 21, f"{at_kill} of 21 parts were done at the kill"
    done = subprocess.run(_command(tiny, tmp_path / "killed"), env=env, timeout=300,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{at_kill} of 21 parts already done" in done.stdout or at_kill == 0, done.stdout
    _same_files(tmp_path / "whole", tmp_path / "killed")
    assert not [p.name for p in (tmp_path / "killed").iterdir() if p.name.endswith(".tmp")]


def test_torchrun_writes_the_bytes_of_one_process(tiny, tmp_path):
    """Two gloo processes take parts round-robin and write the files of one process."""
    env = child_environment()
    one, two = tmp_path / "one", tmp_path / "two"
    done = subprocess.run(_command(tiny, one, "--format", "npy"), env=env, timeout=300,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", *_command(tiny, two, "--format", "npy")[1:]],
                          env=env, timeout=300, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("predicted") == 1, done.stdout
    _same_files(one, two)
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["this_run"]["processes"] == 2
    assert manifest["this_run"]["images_by_rank"] == [110, 100]  # parts 0, 2, ... and 1, 3, ...
    paths = [str(p) for p in sorted(two.glob("*.paths.npy"))]
    assert len(paths) == 21


def _small_folder(tiny, folder: Path, count: int = 12) -> Path:
    """``count`` test images of every class in turn, copied into ``folder``."""
    folder.mkdir()
    for i in range(count):
        name = f"{CLASSES[i % 3]}_{i // 3:03d}.png"
        shutil.copy(tiny["flat"] / name, folder / name)
    return folder


def test_undecodable_images_are_skipped_and_counted_or_refused(tiny, tmp_path, capsys):
    """Guards a broken file stopping or silently shortening the job: a junk file and a
    truncated PNG are skipped, named with their reason on stderr and in the manifest, and the
    other images keep their predictions; --on-bad-image fail is one line, exit 2, and refuses
    a folder whose earlier run skipped one."""
    folder = _small_folder(tiny, tmp_path / "images")
    good = predict_images(tiny["classifier"], [folder], tmp_path / "clean", topk=2,
                          progress=False)
    (folder / "zz_junk.png").write_bytes(b"not an image")
    whole = (folder / "circle_000.png").read_bytes()
    (folder / "circle_000b.png").write_bytes(whole[: len(whole) // 2])
    out = tmp_path / "out"
    assert main(["predict", str(tiny["classifier"]), str(folder), "--out", str(out), "--topk",
                 "2", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("skipped undecodable image") == 2 and "zz_junk.png" in err, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["bad_images"] == 2 and manifest["images"] == 14 and manifest["rows"] == 12
    assert sorted(Path(p).name for p, _ in manifest["bad"]) == ["circle_000b.png",
                                                                "zz_junk.png"]
    assert all(reason for _, reason in manifest["bad"])
    arrays, paths = _safetensors_parts(out)
    clean, clean_paths = _safetensors_parts(tmp_path / "clean")
    assert paths == clean_paths and torch.equal(arrays["topk_indices"], clean["topk_indices"])
    assert arrays["row_ids"].tolist() == [0, 2, *range(3, 13)]  # circle_000b.png is row 1
    assert good.bad_images == []
    for target in (tmp_path / "fail", out):
        code = main(["predict", str(tiny["classifier"]), str(folder), "--out", str(target),
                     "--topk", "2", "--on-bad-image", "fail", "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "cannot decode image" in err, err
        assert "circle_000b.png" in err and "--on-bad-image skip" in err


def test_another_classifier_is_refused_and_changed_images_recomputed(tiny, tmp_path, capsys):
    """Guards outputs mixed from two classifiers or from old image bytes: another classifier
    into the same folder is refused, naming the classifier; an image rewritten since is
    classified again (only its part), giving a fresh job's bytes."""
    folder = _small_folder(tiny, tmp_path / "images")
    out = tmp_path / "out"
    first = predict_images(tiny["classifier"], [folder], out, part_images=4, progress=False)
    assert first.parts == 3
    classifier = FewShotClassifier.load(tiny["classifier"])
    other = FewShotClassifier(encoder=classifier.encoder, field=classifier.field,
                              class_features=classifier.class_features,
                              class_names=classifier.class_names,
                              templates=classifier.templates, steps=classifier.steps + 1)
    other.save(tmp_path / "other")
    code = main(["predict", str(tmp_path / "other"), str(folder), "--out", str(out), "--quiet",
                 "--part-size", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "holds the outputs of another" in err and "classifier" in err, err
    images = sorted(folder.glob("*.png"))
    shutil.copy(tiny["flat"] / "star_000.png", images[5])  # part 1 (images 4-7) changes
    again = predict_images(tiny["classifier"], [folder], out, part_images=4, progress=False)
    assert again.parts_skipped == 2 and again.images_done == 4
    fresh = predict_images(tiny["classifier"], [folder], tmp_path / "fresh", part_images=4,
                           progress=False)
    assert fresh.images_done == 12
    _same_files(tmp_path / "fresh", out)


def test_all_predictions_in_one_class_warn(tiny, tmp_path, capsys):
    """A classifier whose class table puts every image in one class: the library warns
    (CollapseWarning), the CLI prints one warning line, the manifest names the class."""
    classifier = FewShotClassifier.load(tiny["classifier"])
    folder = _small_folder(tiny, tmp_path / "images")
    features = classifier.encoder.encode_images(torch.stack(
        [classifier.preprocess.centre(image_lists.open_image(p)) for p in folder.glob("*.png")]))
    centre = torch.nn.functional.normalize(features.mean(0), dim=0)
    table = torch.stack([-centre, centre, -centre])
    broken = FewShotClassifier(encoder=classifier.encoder, field=classifier.field,
                               class_features=table, class_names=CLASSES,
                               templates=classifier.templates, steps=0)
    broken.save(tmp_path / "broken")
    with pytest.warns(CollapseWarning, match="all 12 predictions are class 'square'"):
        summary = predict_images(broken, [folder], tmp_path / "lib", progress=False)
    assert summary.collapsed == "square"
    assert main(["predict", str(tmp_path / "broken"), str(folder), "--out",
                 str(tmp_path / "cli"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: all 12 predictions are class 'square'") == 1, err
    assert json.loads((tmp_path / "cli" / "manifest.json").read_text())["collapsed"] == "square"
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)  # the fitted classifier does not warn
        assert predict_images(classifier, [folder], tmp_path / "ok", progress=False).collapsed \
            is None


def test_decoding_encoding_and_solving_overlap(tiny, tmp_path, monkeypatch):
    """Guards a pipeline that runs its stages one after the other: the first encode waits
    for the next batch's decoding to start, the first solve for the next batch's encoding;
    run in sequence, neither would happen and the waits time out."""
    classifier = FewShotClassifier.load(tiny["classifier"])
    folder = _small_folder(tiny, tmp_path / "images", count=20)
    decoded_second, encoded_second = threading.Event(), threading.Event()
    seen = {"encode": 0, "solve": 0}
    overlapped = []
    real_decode, real_encode = image_lists.decode, classifier.encoder.encode_images
    real_solve = classifier.solve

    def decode(entry, preprocess):
        if Path(entry.shown).name >= sorted(p.name for p in folder.iterdir())[5]:
            decoded_second.set()
        return real_decode(entry, preprocess)

    def encode(pixels):
        seen["encode"] += 1
        if seen["encode"] == 1:
            overlapped.append(("decode", decoded_second.wait(20)))
        elif seen["encode"] == 2:
            encoded_second.set()
        return real_encode(pixels)

    def solve(*args, **kwargs):
        seen["solve"] += 1
        if seen["solve"] == 1:
            overlapped.append(("encode", encoded_second.wait(20)))
        return real_solve(*args, **kwargs)

    monkeypatch.setattr(predict_module, "decode", decode)
    monkeypatch.setattr(classifier.encoder, "encode_images", encode)
    monkeypatch.setattr(classifier, "solve", solve)
    predict_images(classifier, [folder], tmp_path / "out", encode_batch_size=5, workers=2,
                   progress=False)
    assert overlapped == [("decode", True), ("encode", True)]


def test_an_error_in_a_stage_stops_the_job_without_hanging(tiny, tmp_path, monkeypatch):
    """Guards threads left blocked on full queues: an encoder failing on the second batch
    raises its own error in the caller, the stage threads end, and no part is recorded for
    the failed batch's part."""
    classifier = FewShotClassifier.load(tiny["classifier"])
    folder = _small_folder(tiny, tmp_path / "images", count=20)
    calls = []

    def encode(pixels):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("encoder broke")
        return torch.nn.functional.normalize(torch.randn(pixels.shape[0], 16), dim=-1)

    monkeypatch.setattr(classifier.encoder, "encode_images", encode)
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(RuntimeError, match="encoder broke"):
        predict_images(classifier, [folder], tmp_path / "out", encode_batch_size=2,
                       part_images=2, progress=False)
    time.sleep(0.2)
    left = {t.name for t in threading.enumerate()} - before
    assert not [name for name in left if name.startswith("fma-fast")], left
    assert len(list((tmp_path / "out").glob("*.done.json"))) == 1

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(predict_module, "write_part", full_disk)
    calls.clear()
    with pytest.raises(OSError, match="No space") as failed:  # the traceback keeps the frames
        predict_images(classifier, [folder], tmp_path / "disk", encode_batch_size=2,
                       part_images=2, progress=False)
    left = {t.name for t in threading.enumerate() if t.is_alive()} - before
    assert failed.value and not [name for name in left if name.startswith("fma-fast")], left


def test_progress_lines_when_not_on_a_terminal(tiny, tmp_path, monkeypatch, capsys):
    """A log (not a terminal) gets one-line progress with the rate and an ETA, from predict
    and from score."""
    monkeypatch.setenv("FMA_FAST_PROGRESS_SECONDS", "0")
    stream = io.StringIO()
    progress = progress_bar(total=10, desc="predict", unit="images", stream=stream)
    progress.update(4)
    progress.close()
    assert stream.getvalue().startswith("predict: 4/10 images (40%), ")
    assert "images/s, elapsed " in stream.getvalue() and ", ETA " in stream.getvalue()
    silent = io.StringIO()
    progress_bar(total=10, desc="x", unit="images", stream=silent, enabled=False).update(5)
    assert silent.getvalue() == ""
    folder = _small_folder(tiny, tmp_path / "images")
    predict_images(tiny["classifier"], [folder], tmp_path / "out", encode_batch_size=4)
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("predict: ")]
    assert lines[-1].startswith("predict: 12/12 images (100%)") and len(lines) >= 3, lines
    classifier = FewShotClassifier.load(tiny["classifier"])  # score reports the same way
    rows = torch.nn.functional.normalize(torch.randn(50, classifier.field.dim), dim=-1)
    import numpy as np

    np.save(tmp_path / "rows.npy", rows.numpy())
    fma_fast.score(classifier.field, [tmp_path / "rows.npy"], classifier.class_features,
                   tmp_path / "scored")
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("score: ")]
    assert lines and lines[-1].startswith("score: 50/50 rows (100%), "), lines


def test_inputs_are_checked_before_any_work(tiny, tmp_path, capsys):
    """Bad lists, CSVs, options and inputs given twice are one line and exit 2, and nothing is
    written."""
    listing = tmp_path / "bad.csv"
    listing.write_text("path,label\na.png,dog\n")
    nolabel = tmp_path / "nopath.csv"
    nolabel.write_text("file\na.png\n")
    text = tmp_path / "list.txt"
    text.write_text("# comment\n\n")
    cases = [
        ([str(listing)], "label 'dog' is not one of the classifier's 3 classes"),
        ([str(nolabel)], "with a 'path' column"),
        ([str(text)], "lists no images"),
        ([str(tiny["flat"]), str(tiny["flat"])], "is given twice"),
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(tiny["flat"]), "--topk", "4"], "topk must be <= the classifier's 3 classes"),
    ]
    for argv, fragment in cases:
        out = tmp_path / "out"
        code = main(["predict", str(tiny["classifier"]), *argv, "--out", str(out), "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and fragment in err, (argv, err)
        assert not out.exists()
