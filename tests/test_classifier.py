"""FewShotClassifier on a tiny random open_clip model and a class-per-folder PNG set: fit,
save, load in a fresh process, predict; the predictions equal ``fma-fast eval`` on features
``fma-fast extract`` wrote for the same images. Mixed or mismatched folders are refused."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

open_clip = pytest.importorskip(
    "open_clip", reason="SKIPPED, not passed: open_clip missing (pip install fma_fast[clip])"
)
Image = pytest.importorskip("PIL.Image")

from clip_support import (  # noqa: E402
    save_random_weights,
    tiny_architecture,
    write_architecture,
    write_class_folders,
)

from fma_fast import CheckpointError, VelocityNet  # noqa: E402
from fma_fast.cli import main  # noqa: E402
from fma_fast.clip import (  # noqa: E402
    ClassifierError,
    FewShotClassifier,
    load_dataset,
    load_encoder,
    register_model_config,
)
from fma_fast.io.features import load_features  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = "fma-fast-tiny-classifier-test"
CLASSES = ["circle", "square", "star"]
FIT = {"blocks": 1, "epochs": 40, "lr": 2e-3, "batch_size": 16}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Architecture, random weights as a local file, 10 images per class in class folders
    (split 5/2/3 per class into train/val/test by load_dataset)."""
    folder = tmp_path_factory.mktemp("classifier")
    config = write_architecture(folder, MODEL, tiny_architecture())
    register_model_config(config)
    weights = save_random_weights(open_clip, MODEL, folder / "weights.pt", seed=2)
    data = write_class_folders(folder / "shapes", CLASSES, per_class=10)
    return {"folder": folder, "config": config, "weights": weights, "data": data}


@pytest.fixture(scope="module")
def fitted(tiny):
    encoder = load_encoder(MODEL, tiny["weights"], device="cpu")
    classifier = FewShotClassifier.fit(tiny["data"], encoder=encoder, shots=4, seed=1, views=2,
                                       max_steps=10, **FIT)
    folder = classifier.save(tiny["folder"] / "clf")
    return classifier, folder


def test_fitted_classifier_holds_what_inference_needs(fitted, tiny):
    classifier, folder = fitted
    assert classifier.class_names == CLASSES and classifier.templates == ["a photo of a {}."]
    assert 0 <= classifier.steps <= 10
    assert classifier.record["training"]["images"] == 4 * 3  # K shots x classes
    assert classifier.record["training"]["rows"] == 4 * 3 * 2  # x views
    description = json.loads((folder / "classifier.json").read_text())
    encoder = description["encoder"]
    assert encoder["model"] == MODEL and encoder["checkpoint"].startswith("sha256:")
    assert encoder["weights_file"] == str(tiny["weights"].resolve())
    assert encoder["architecture"] == tiny_architecture()
    assert encoder["preprocessing"]["size"] == [32, 32]
    assert set(os.listdir(folder)) == {"classifier.json", "classes.safetensors",
                                       "model.safetensors", "config.json"}


def test_predict_in_a_fresh_process_equals_eval_on_extracted_features(fitted, tiny, tmp_path):
    """Load in a new interpreter (the architecture is not registered there: the folder's copy
    is), predict the test images by path, and compare with extract -> eval on the same
    images, run through the command line."""
    _, folder = fitted
    dataset = load_dataset(tiny["data"])
    paths = [str(dataset.image_root / item.path) for item in dataset.test]
    script = (
        "import json, sys\n"
        "from fma_fast.clip import FewShotClassifier\n"
        "clf = FewShotClassifier.load(sys.argv[1], device='cpu')\n"
        "found = clf.predict(json.loads(sys.argv[2]), topk=2)\n"
        "print(json.dumps({'indices': found.indices.tolist(), 'cosines': found.cosines.tolist(),"
        " 'names': found.names, 'paths': found.paths, 'path': found.path}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, str(folder), json.dumps(paths)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    feats = tmp_path / "feats"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["extract", "--dataset", str(tiny["data"]), "--model", MODEL,
                     "--model-config", str(tiny["config"]), "--checkpoint", str(tiny["weights"]),
                     "--shots", "4", "--views", "2", "--seeds", "1", "--quiet",
                     "--out", str(feats)]) == 0
        assert main(["eval", str(feats / "test.safetensors"), "--model", str(folder),
                     "--topk", "2", "--out", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    test = load_features(feats / "test.safetensors")
    assert len(paths) == test.features.shape[0] == 9
    assert fresh["paths"] == paths
    assert fresh["indices"] == evaluated["topk_indices"]
    torch.testing.assert_close(torch.tensor(fresh["cosines"]),
                               torch.tensor(evaluated["topk_values"]), rtol=0, atol=1e-5)
    assert fresh["names"] == [[CLASSES[c] for c in row] for row in evaluated["topk_indices"]]
    assert evaluated["steps"] == fitted[0].steps
    # the field learnt the colour-coded classes: not one class for every image
    assert len({row[0] for row in fresh["indices"]}) > 1


def test_predict_takes_paths_folders_pil_images_and_pixels(fitted, tiny, tmp_path):
    classifier, _ = fitted
    folder = tiny["data"] / "star"
    files = sorted(folder.glob("*.png"))
    by_folder = classifier.predict(folder, topk=3)
    assert by_folder.paths == [str(f) for f in files]
    by_files = classifier.predict([str(f) for f in files], topk=3)
    images = [Image.open(f) for f in files]
    by_pil = classifier.predict(images, topk=3)
    pixels = torch.stack([classifier.preprocess.centre(image.convert("RGB")) for image in images])
    by_pixels = classifier.predict(pixels, topk=3)
    for found in (by_files, by_pil, by_pixels):
        assert torch.equal(found.indices, by_folder.indices)
        torch.testing.assert_close(found.cosines, by_folder.cosines, rtol=0, atol=1e-6)
    assert by_pil.paths == [None] * len(files) and by_folder.names[0][0] in CLASSES
    assert list(next(by_folder.rows())) == ["path", "indices", "names", "cosines"]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        classifier.predict([str(files[0]), str(tmp_path / "broken.png")])
    skipping = classifier.predict([str(files[0]), str(tmp_path / "broken.png")], on_error="skip")
    assert skipping.skipped == [str(tmp_path / "broken.png")] and len(skipping) == 1
    with pytest.raises(ValueError, match=r"preprocessed to \[3, 32, 32\]"):
        classifier.predict(torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="use predict_features"):
        classifier.predict(torch.zeros(4, 16))


def _hand_made(encoder, seed: int) -> FewShotClassifier:
    torch.manual_seed(seed)
    field = VelocityNet(16, blocks=1)
    table = torch.nn.functional.normalize(torch.randn(3, 16), dim=-1)
    return FewShotClassifier(encoder=encoder, field=field, class_features=table,
                             class_names=CLASSES, templates=["a {}."], steps=seed)


def test_a_folder_mixed_from_two_saves_is_refused(tiny, tmp_path):
    encoder = load_encoder(MODEL, tiny["weights"], device="cpu")
    one, two = tmp_path / "one", tmp_path / "two"
    _hand_made(encoder, 1).save(one)
    _hand_made(encoder, 2).save(two)
    assert FewShotClassifier.load(one).steps == 1  # a whole folder loads
    cases = {
        "classes.safetensors": "holds another class table",
        "model.safetensors": "come from different saves",  # checkpoint's own save-id check
        "config.json": "belongs to field save",
        "classifier.json": "belongs to field save",
    }
    for name, fragment in cases.items():
        mixed = tmp_path / f"mixed-{name}"
        shutil.copytree(one, mixed)
        shutil.copy(two / name, mixed / name)
        with pytest.raises(CheckpointError, match=fragment):  # ClassifierError is one too
            FewShotClassifier.load(mixed)
    (tmp_path / "partial").mkdir()
    shutil.copy(one / "model.safetensors", tmp_path / "partial")
    shutil.copy(one / "config.json", tmp_path / "partial")
    with pytest.raises(ClassifierError, match="classifier.json is missing"):
        FewShotClassifier.load(tmp_path / "partial")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "classifier.json").write_text('{"mine": true}')
    with pytest.raises(ValueError, match="refusing to overwrite"):
        _hand_made(encoder, 1).save(foreign)
    assert (foreign / "classifier.json").read_text() == '{"mine": true}'
    assert sorted(os.listdir(foreign)) == ["classifier.json"]


def test_an_encoder_other_than_the_fitted_one_is_refused(tiny, tmp_path):
    encoder = load_encoder(MODEL, tiny["weights"], device="cpu")
    folder = _hand_made(encoder, 3).save(tmp_path / "clf")
    other_weights = save_random_weights(open_clip, MODEL, tmp_path / "other.pt", seed=9)
    with pytest.raises(ClassifierError, match="fitted with encoder checkpoint 'sha256:"):
        FewShotClassifier.load(folder, checkpoint_file=other_weights)
    with pytest.raises(ClassifierError, match="fitted with encoder checkpoint"):
        FewShotClassifier.load(folder, encoder=load_encoder(MODEL, device="cpu"))
    moved = tmp_path / "moved.pt"
    shutil.copy(tiny["weights"], moved)
    description = json.loads((folder / "classifier.json").read_text())
    description["encoder"]["weights_file"] = str(tmp_path / "gone.pt")
    (folder / "classifier.json").write_text(json.dumps(description))
    with pytest.raises(ClassifierError, match="pass checkpoint_file="):
        FewShotClassifier.load(folder)
    assert FewShotClassifier.load(folder, checkpoint_file=moved).steps == 3


def test_a_peft_classifier_reloads_its_source_and_checks_the_file(tiny, tmp_path):
    """A classifier on CLIP-Adapter features keeps the adapter file's digest and path; load
    rebuilds the source from it (or from peft_checkpoint= when moved) and refuses another."""
    from fma_fast.clip import PeftEncoder, load_peft

    generator = torch.Generator().manual_seed(4)

    def adapter(path):
        torch.save({"fc.0.weight": torch.randn(4, 16, generator=generator),
                    "fc.2.weight": torch.randn(16, 4, generator=generator)}, path)
        return path

    encoder = load_encoder(MODEL, tiny["weights"], device="cpu")
    source = load_peft("adapter", adapter(tmp_path / "adapter.pt"), encoder, CLASSES)
    classifier = _hand_made(PeftEncoder(source), 2)
    folder = classifier.save(tmp_path / "clf")
    images = sorted((tiny["data"] / "circle").glob("*.png"))
    expected = classifier.predict(images, topk=2)
    plain = _hand_made(encoder, 2).predict(images, topk=2)
    assert not torch.allclose(plain.cosines, expected.cosines)  # the adapter changes features
    loaded = FewShotClassifier.load(folder)
    assert loaded.encoder.source.method == "adapter"
    found = loaded.predict(images, topk=2)
    assert torch.equal(found.indices, expected.indices)
    torch.testing.assert_close(found.cosines, expected.cosines, rtol=0, atol=0)
    moved = tmp_path / "moved.pt"
    (tmp_path / "adapter.pt").rename(moved)
    with pytest.raises(ClassifierError, match="pass peft_checkpoint="):
        FewShotClassifier.load(folder)
    assert FewShotClassifier.load(folder, peft_checkpoint=moved).steps == 2
    with pytest.raises(ClassifierError, match="fitted with adapter checkpoint sha256"):
        FewShotClassifier.load(folder, peft_checkpoint=adapter(tmp_path / "other.pt"))
    with pytest.raises(ClassifierError, match="fitted with encoder checkpoint"):
        FewShotClassifier.load(folder, peft_checkpoint=moved,
                               encoder=load_encoder(MODEL, device="cpu"))
